/* The `sandgate` command's native front: hands `sandgate run --gateway ...` to a warm
 * runner of the gateway service, as enforcer/handoff.py does, without starting Python.
 *
 * Why it exists: the interpreter's start is most of what an attached run waits for.
 * On this project's 2-core host `python -c pass` in a venv takes 12-14 ms and a warm
 * attach 45-55 ms in all; this program starts in ~1 ms (docs/performance.md,
 * "Session 27"). Mercurial's chg fronts its command server so, for the same reason.
 *
 * What it does itself, and only that: the hand-over when the caller is root, asks for
 * `run --gateway`, none of its stdin, stdout and stderr is its controlling terminal
 * (a task on a terminal gets a pty that the Python client relays), and a runner
 * takes the run. Everything else, and a run no runner took, goes to the Python
 * command installed beside this one (`sandgate-python`, the same arguments), with
 * SANDGATE_HANDOFF_TRIED=1 when runners were offered the run already, so that it
 * does not offer it again (it takes that variable out of its environment).
 *
 * The protocol is handoff.py's, byte for byte, and so are its choices: which socket
 * `--gateway` names (control_path), the claim token and its timeout, the stdio line,
 * the signals forwarded, the exit code. The request's strings are JSON as Python's
 * json.dumps writes os.environ's and sys.argv's: a byte that is not UTF-8 becomes
 * the lone surrogate U+DC80+byte (surrogateescape), which the runner's os.fsencode
 * turns back into that byte, so the task gets the caller's bytes exactly.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#define SUFFIX ".z-"
#define DEFAULT_CONTROL "/run/sandgate/gateway.sock"
#define CLAIM_TIMEOUT_MS 200
#define MAX_LINE (1 << 20)
#define MAX_ENV 16384 /* more variables than this: the Python command offers the run */
#define EXIT_SETUP 125
#define TRIED "SANDGATE_HANDOFF_TRIED"
#define PYTHON_COMMAND "sandgate-python"

extern char **environ;

struct buf {
    char *p;
    size_t n, cap;
};

static void put(struct buf *b, const void *s, size_t n) {
    if (b->n + n + 1 > b->cap) {
        size_t cap = (b->n + n + 1) * 2;
        char *p = realloc(b->p, cap);
        if (p == NULL) {
            fputs("sandgate: out of memory\n", stderr);
            _exit(EXIT_SETUP);
        }
        b->p = p, b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0';
}

static void puts_(struct buf *b, const char *s) { put(b, s, strlen(s)); }

/* The length of the UTF-8 sequence at s that Python's strict decoder takes (no
 * overlongs, no surrogates, nothing past U+10FFFF), or 0. */
static size_t utf8_length(const unsigned char *s) {
    unsigned char c = s[0], lo = 0x80, hi = 0xBF;
    size_t n;
    if (c >= 0xC2 && c <= 0xDF)
        n = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
        n = 3;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        n = 4;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else
        return 0;
    if (s[1] < lo || s[1] > hi) return 0;
    for (size_t i = 2; i < n; i++)
        if (s[i] < 0x80 || s[i] > 0xBF) return 0;
    return n;
}

/* `len` bytes of s as a JSON string (json.dumps of their surrogateescape decoding;
 * UTF-8 as is, which json.loads reads as json.dumps' \u escapes). */
static void put_string(struct buf *b, const char *s, size_t len) {
    const unsigned char *u = (const unsigned char *)s, *end = u + len;
    char esc[8];
    put(b, "\"", 1);
    while (u < end) {
        size_t n;
        if (*u == '"' || *u == '\\') {
            put(b, "\\", 1);
            put(b, u++, 1);
        } else if (*u < 0x20 || *u == 0x7F) {
            snprintf(esc, sizeof esc, "\\u%04x", *u++);
            puts_(b, esc);
        } else if (*u < 0x80) {
            put(b, u++, 1);
        } else if ((n = utf8_length(u)) != 0 && u + n <= end) {
            put(b, u, n);
            u += n;
        } else {
            snprintf(esc, sizeof esc, "\\udc%02x", *u++);
            puts_(b, esc);
        }
    }
    put(b, "\"", 1);
}

/* The control socket `--gateway` names, as argparse reads it (handoff.control_path). */
static const char *control_path(int argc, char **argv) {
    for (int i = 2; i < argc; i++) {
        const char *arg = argv[i];
        if (!strcmp(arg, "--") || !strcmp(arg, "-h") || !strcmp(arg, "--help")) return NULL;
        if (!strncmp(arg, "--gateway=", 10)) return arg + 10;
        if (!strcmp(arg, "--gateway")) {
            if (i + 1 < argc && argv[i + 1][0] != '-') return argv[i + 1];
            const char *set = getenv("SANDGATE_CONTROL");
            return set ? set : DEFAULT_CONTROL;
        }
    }
    return NULL;
}

/* {"argv": [...], "env": {...}, "cwd": "..."}\n, or 0 where Python should do it. */
static int request(struct buf *b, int argc, char **argv) {
    char *cwd = getcwd(NULL, 0);
    size_t count = 0, emitted = 0;
    if (cwd == NULL) return 0;
    puts_(b, "{\"argv\": [");
    for (int i = 1; i < argc; i++) {
        if (i > 1) puts_(b, ", ");
        put_string(b, argv[i], strlen(argv[i]));
    }
    puts_(b, "], \"env\": {");
    for (char **e = environ; *e != NULL; e++) {
        const char *eq = strchr(*e, '=');
        size_t key = eq ? (size_t)(eq - *e) : 0;
        int seen = 0;
        if (eq == NULL) continue; /* as os.environ: no '=', no variable */
        if (++count > MAX_ENV) return free(cwd), 0;
        for (char **f = environ; f != e && !seen; f++) /* the first of a name, as os.environ */
            seen = !strncmp(*f, *e, key + 1);
        if (seen) continue;
        if (emitted++) puts_(b, ", ");
        put_string(b, *e, key);
        puts_(b, ": ");
        put_string(b, eq + 1, strlen(eq + 1));
    }
    puts_(b, "}, \"cwd\": ");
    put_string(b, cwd, strlen(cwd));
    puts_(b, "}\n");
    free(cwd);
    return b->n <= MAX_LINE;
}

/* The runner's lines: one JSON object each, read from the connection. */
struct lines {
    int fd;
    struct buf in;
    size_t start;
};

/* The next line (NUL-terminated, without its newline); NULL at the end, on an error
 * (errno: EAGAIN for a timeout), or past MAX_LINE. Descriptors sent are closed. */
static char *next_line(struct lines *l) {
    for (;;) {
        char *nl = l->in.n > l->start ? memchr(l->in.p + l->start, '\n', l->in.n - l->start) : NULL;
        if (nl != NULL) {
            char *line = l->in.p + l->start;
            *nl = '\0';
            l->start = nl + 1 - l->in.p;
            return line;
        }
        if (l->in.n - l->start > MAX_LINE) return errno = EMSGSIZE, NULL;
        char chunk[4096], control[CMSG_SPACE(sizeof(int) * 4)];
        struct iovec iov = {chunk, sizeof chunk};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                             .msg_controllen = sizeof control};
        ssize_t got = recvmsg(l->fd, &msg, MSG_CMSG_CLOEXEC);
        if (got < 0 && errno == EINTR) continue;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); got >= 0 && c; c = CMSG_NXTHDR(&msg, c))
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
                for (size_t i = 0; i < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int); i++)
                    close(((int *)CMSG_DATA(c))[i]); /* only a terminal's pty: not ours */
        if (got <= 0) return got == 0 ? (errno = 0, NULL) : NULL;
        if (l->start > 0) { /* what was read already goes */
            memmove(l->in.p, l->in.p + l->start, l->in.n - l->start);
            l->in.n -= l->start, l->start = 0;
        }
        put(&l->in, chunk, (size_t)got);
    }
}

static const char *skip_space(const char *s) {
    while (*s == ' ' || *s == '\t' || *s == '\r' || *s == '\n') s++;
    return s;
}

/* A JSON string at s (strict, as json.loads): past its closing quote, or NULL. */
static const char *skip_string(const char *s) {
    if (*s++ != '"') return NULL;
    for (; *s != '"'; s++) {
        if ((unsigned char)*s < 0x20) return NULL;
        if (*s == '\\') {
            s++;
            if (*s == 'u') {
                for (int i = 1; i <= 4; i++)
                    if (!strchr("0123456789abcdefABCDEF", s[i]) || !s[i]) return NULL;
                s += 4;
            } else if (!*s || !strchr("\"\\/bfnrt", *s))
                return NULL;
        }
    }
    return s + 1;
}

/* In a line that is one flat JSON object of the runner's (strings, integers, true,
 * false, null), the value of `key` when it is `true` (1) or an integer (2, in *n);
 * 0 for anything else, -1 if the line is not such an object. */
static int field(const char *line, const char *key, long *n) {
    const char *s = skip_space(line);
    int found = 0, first = 1;
    if (*s++ != '{') return -1;
    for (s = skip_space(s); *s != '}'; first = 0) {
        if (!first && *s++ != ',') return -1;
        const char *name = skip_space(s), *end = skip_string(name);
        if (end == NULL) return -1;
        int ours = (size_t)(end - name - 2) == strlen(key) && !strncmp(name + 1, key, strlen(key));
        s = skip_space(end);
        if (*s++ != ':') return -1;
        s = skip_space(s);
        if (*s == '"') {
            if ((s = skip_string(s)) == NULL) return -1;
            found = ours ? 0 : found;
        } else if (!strncmp(s, "true", 4) || !strncmp(s, "false", 5) || !strncmp(s, "null", 4)) {
            found = ours ? (*s == 't') : found;
            s += *s == 'f' ? 5 : 4;
        } else if (*s == '-' || (*s >= '0' && *s <= '9')) {
            char *after;
            errno = 0;
            long v = strtol(s, &after, 10);
            if (after == s || errno || *after == '.' || *after == 'e' || *after == 'E') return -1;
            if (ours) *n = v, found = 2;
            s = after;
        } else
            return -1;
        s = skip_space(s);
    }
    return *skip_space(s + 1) ? -1 : found;
}

static int send_fds(int conn, const char *data, size_t len, const int *fds, int count) {
    char control[CMSG_SPACE(sizeof(int) * 3)] = {0};
    struct iovec iov = {(void *)data, len};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                         .msg_controllen = CMSG_SPACE(sizeof(int) * count)};
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET, c->cmsg_type = SCM_RIGHTS, c->cmsg_len = CMSG_LEN(sizeof(int) * count);
    memcpy(CMSG_DATA(c), fds, sizeof(int) * count);
    ssize_t sent = sendmsg(conn, &msg, MSG_NOSIGNAL);
    while (sent >= 0 && (size_t)sent < len) { /* the rest of a long request */
        ssize_t more = send(conn, data + sent, len - sent, MSG_NOSIGNAL);
        sent = more < 0 ? more : sent + more;
    }
    return sent < 0 ? -1 : 0;
}

static void set_timeout(int fd, int ms) {
    struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
}

/* A connection to the runner at `path` that took the run (its lines in *l), or -1
 * (handoff._offer). */
static int offer(const char *path, const struct buf *req, struct lines *l) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    int conn = -1, token[2] = {-1, -1}, taken = 0;
    long unused;
    char *reply;
    static const int stdio[3] = {0, 1, 2};
    static const char stdio_line[] = "{\"stdio\": [0, 1, 2]}\n";
    if (strlen(path) >= sizeof addr.sun_path) return -1;
    strcpy(addr.sun_path, path);
    conn = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (conn < 0) return -1;
    set_timeout(conn, CLAIM_TIMEOUT_MS);
    *l = (struct lines){.fd = conn};
    if (connect(conn, (struct sockaddr *)&addr, sizeof addr) < 0) goto out;
    if (pipe2(token, O_NONBLOCK | O_CLOEXEC) < 0) goto out;
    if (write(token[1], "!", 1) != 1) goto out;
    close(token[1]), token[1] = -1;
    if (send_fds(conn, req->p, req->n, &token[0], 1) < 0) goto out;
    reply = next_line(l);
    if (reply == NULL && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        char byte;
        if (read(token[0], &byte, 1) == 1) goto out; /* taken back: that runner can never run it */
        set_timeout(conn, 0);                        /* it claimed the run in time: its answer is coming */
        reply = next_line(l);
    }
    set_timeout(conn, 0);
    if (reply != NULL && field(reply, "claimed", &unused) == 1) {
        if (send_fds(conn, stdio_line, sizeof stdio_line - 1, stdio, 3) < 0) goto out;
        reply = next_line(l);
    }
    taken = reply != NULL && field(reply, "taken", &unused) == 1;
out:
    for (int i = 0; i < 2; i++)
        if (token[i] >= 0) close(token[i]);
    if (taken) return conn;
    close(conn);
    free(l->in.p);
    return -1;
}

static int signal_pipe[2] = {-1, -1};

static void note_signal(int signum) {
    int saved = errno;
    unsigned char byte = (unsigned char)signum;
    (void)!write(signal_pipe[1], &byte, 1);
    errno = saved;
}

static void forward(int conn, int signum) {
    char line[32];
    int n = snprintf(line, sizeof line, "{\"signal\": %d}\n", signum);
    send(conn, line, (size_t)n, MSG_NOSIGNAL); /* a runner gone shows as the end of its lines */
}

static void handle(int signum) {
    struct sigaction sa = {.sa_handler = note_signal, .sa_flags = SA_RESTART};
    sigemptyset(&sa.sa_mask);
    sigaction(signum, &sa, NULL);
}

static int has_line(const struct lines *l) {
    return l->in.n > l->start && memchr(l->in.p + l->start, '\n', l->in.n - l->start) != NULL;
}

/* Until the runner sends the exit code: signals forwarded (handoff._follow). */
static int follow(int conn, struct lines *l) {
    static const int forwarded[] = {SIGINT, SIGTERM, SIGHUP, SIGCONT, SIGTSTP, SIGTTIN, SIGTTOU};
    if (pipe2(signal_pipe, O_NONBLOCK | O_CLOEXEC) < 0) return EXIT_SETUP;
    signal(SIGPIPE, SIG_IGN); /* as Python: a closed stderr is an error, not this process's end */
    for (size_t i = 0; i < sizeof forwarded / sizeof *forwarded; i++) handle(forwarded[i]);
    for (;;) {
        struct pollfd fds[2] = {{conn, POLLIN, 0}, {signal_pipe[0], POLLIN, 0}};
        if (!has_line(l) && poll(fds, 2, -1) < 0) continue; /* EINTR: the signal is in the pipe */
        unsigned char got[64];
        ssize_t n = fds[1].revents ? read(signal_pipe[0], got, sizeof got) : 0;
        for (ssize_t i = 0; i < n; i++) {
            forward(conn, got[i]);
            if (got[i] == SIGTSTP || got[i] == SIGTTIN || got[i] == SIGTTOU) {
                signal(got[i], SIG_DFL); /* the task first: stopped while this process is */
                raise(got[i]);           /* stops here, until SIGCONT (not at all in an orphaned group) */
                handle(got[i]);
                forward(conn, SIGCONT);
            }
        }
        if (has_line(l) || fds[0].revents) {
            long code;
            char *line = next_line(l);
            int kind = line ? field(line, "exit", &code) : -1;
            if (kind == 2) _exit((int)code);
            if (kind < 0) break; /* the end, or what no runner sends */
        }
    }
    fputs("sandgate: the gateway service's runner went away\n", stderr);
    return EXIT_SETUP;
}

/* The Python command beside this one (without /proc to say where this one is: the
 * first on PATH), with these arguments. */
static void python(char **argv, int tried) {
    char self[PATH_MAX], *slash;
    static const char name[] = "/" PYTHON_COMMAND;
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - sizeof name);
    if (tried) setenv(TRIED, "1", 1);
    if (n > 0 && (slash = memrchr(self, '/', (size_t)n)) != NULL) {
        memcpy(slash, name, sizeof name);
        execv(self, argv);
    } else {
        strcpy(self, PYTHON_COMMAND);
        execvp(self, argv);
    }
    fprintf(stderr, "sandgate: cannot run %s: %s\n", self, strerror(errno));
    _exit(EXIT_SETUP);
}

int main(int argc, char **argv) {
    const char *control;
    struct buf req = {0};
    /* Descriptors 0-2 the caller closed (`>&-`, a daemon's child) on /dev/null before
     * anything opens a file. Else Python's start takes their numbers for its own files,
     * its sys.stdout is None (a run failed before its task started), and the task
     * would inherit whatever held the number then. */
    for (int fd = 0; fd < 3; fd++)
        if (fcntl(fd, F_GETFD) < 0 && errno == EBADF && open("/dev/null", O_RDWR) != fd) _exit(EXIT_SETUP);
    if (argc < 2 || strcmp(argv[1], "run") || geteuid() != 0 || !(control = control_path(argc, argv)))
        python(argv, 0);
    for (int fd = 0; fd < 3; fd++)
        if (tcgetpgrp(fd) >= 0) python(argv, 0); /* a controlling terminal: the relay is Python's */
    if (!request(&req, argc, argv)) python(argv, 0);
    /* The runners' sockets, `<control>.z-<hex>` (handoff.runner_sockets). */
    const char *cut = strrchr(control, '/');
    char folder[PATH_MAX];
    size_t flen = cut ? (size_t)(cut - control) : 0;
    if (flen >= sizeof folder) python(argv, 0);
    memcpy(folder, control, flen);
    while (flen > 0 && folder[flen - 1] == '/') flen--; /* os.path.split keeps "/" alone */
    if (cut && flen == 0) folder[flen++] = '/';
    folder[flen] = '\0';
    const char *name = cut ? cut + 1 : control;
    DIR *dir = opendir(flen ? folder : ".");
    struct dirent *e;
    while (dir && (e = readdir(dir)) != NULL) {
        char path[PATH_MAX];
        struct lines l;
        if (strncmp(e->d_name, name, strlen(name)) || strncmp(e->d_name + strlen(name), SUFFIX, 3)) continue;
        if (snprintf(path, sizeof path, "%s%s%s", folder, flen && folder[flen - 1] != '/' ? "/" : "",
                     e->d_name) >= (int)sizeof path)
            continue;
        int conn = offer(path, &req, &l);
        if (conn >= 0) return follow(conn, &l);
    }
    python(argv, 1);
}
