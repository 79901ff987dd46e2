"""Timers around the steps of a warm attach, in every process it crosses.

Not imported by sandgate. bench_attach.py `--breakdown` copies this file into its
throwaway venv as `sgbench_probe.py`, with a `.pth` line that imports it at every
interpreter start there, and sets SGBENCH_MARKS for the service it starts and the
runs it times. A .pth, not a wrapper script: the zygote is started as `python -I -m
...` (no PYTHON* variables, no script of ours), and warm runners are its forks.

With SGBENCH_MARKS unset this module does nothing. With it set, it wraps the steps
below (after their module is imported: a finder on sys.meta_path), and every call
appends one line to that file: `pid label start_ns end_ns` on CLOCK_MONOTONIC, the
clock of the bench's own timers. One write(2) with O_APPEND a call (a few us), so
the lines of concurrent processes never mix.
"""

import os
import sys
import time
from importlib.machinery import PathFinder  # frozen already: nothing is loaded for it

CO_COROUTINE = 0x80  # inspect's flag, without importing inspect (~5 ms at every start)

_P = "sandgate.enforcer."
# module -> [(attribute path, label)]; the label's prefix says whose process it is in.
STEPS = {
    _P + "handoff": [
        ("_offer", "client: offer (connect, request, claim, stdio)"),
        ("_follow", "client: follow (until the exit code)"),
    ],
    _P + "zygote": [
        ("claim_run", "runner: claim the run"),
        ("become", "runner: become the caller's run"),
        ("of_peer", "runner: the caller's /proc (umask, limits)"),
        ("_stdio", "runner: the caller's stdio"),
        ("Caller.exit", "runner: exit code to the caller"),
        ("_seed", "runner: init seed (next run, after fork)"),
        ("Pool._fork", "pool: fork a runner"),
    ],
    _P + "cli.run": [("_run_attached", "runner: _run_attached (options)")],
    _P + "attach": [
        ("run_attached", "runner: run_attached"),
        ("InitSeed.usable", "runner: seed usable"),
        ("_prepare", "runner: _prepare"),
        ("ForkedInit.__init__", "runner: start the init (seed's spec)"),
        ("_wait", "runner: _wait (the sandbox and the task)"),
        ("_ready", "runner: the attach's second line (the sandbox served)"),
        ("_detach", "runner: detach round trip"),
        ("_close_all_but", None),  # keeps the marks' fd in the seed and the init
    ],
    _P + "sandbox.init": [
        ("main", "seed: the init (spec to its exit code)"),
        ("enter_namespaces", "init: enter the namespaces (setns, unshare)"),
        ("build_view", "init: build the file view"),
        ("wait_joined", "init: wait for the join"),
        ("mount_cgroups", "init: mount the cgroups"),
        ("run_init", "pid 1: its life (proc, user namespace, the task, reaping)"),
        ("become_task", "task: become the task (ids, caps, Landlock, seccomp)"),
    ],
    _P + "sandbox.prepare": [
        ("missing_features", "runner: missing_features (while the service attaches)"),
        ("PreparedSandbox.collect", "runner: collect the init's report"),
        ("PreparedSandbox.limits_hit", "runner: limits hit"),
        ("PreparedSandbox.check_workspace", "runner: check the workspace"),
        ("PreparedSandbox.remove", "runner: remove (after the exit code)"),
    ],
    _P + "sandbox.seccomp": [("build_filter", "runner: prepare: seccomp filter")],
    _P + "sandbox.spec": [("file_view", "runner: prepare: file view")],
    _P + "sandbox.id_slots": [("claim", "runner: prepare: id slot")],
    _P + "sandbox.cgroup": [("TaskCgroup.set_limits", "runner: prepare: cgroup limits")],
    # The service's requests to its workers, and a worker's handling of one (the worker
    # runs as `-m sandgate.proxy.worker`, which no finder sees; its link module it imports).
    "sandgate.proxy.worker_link": [
        ("Link.request", "service: its requests to a worker (register, retire)"),
        ("Link._answer", "worker: its answer to a request"),
    ],
    _P + "control": [
        ("ControlClient.connect", "runner: control connect"),
        ("ControlClient.request", "runner: control request {cmd}"),
    ],
    _P + "service": [
        ("GatewayService._attach", "service: attach"),
        ("GatewayService._detach", "service: detach"),
        ("GatewayService._serve_attached", "service: serve the attached sandbox"),
        ("GatewayService._write_task_files", "service: task files"),
        ("GatewayService._apply_table", "service: table"),
        ("GatewayService._new_network", "service: new spare network"),
    ],
    _P + "run": [
        ("claim_run_id", "service: new network: claim a run id"),
        ("_host_addresses", "service: new network: the host's addresses"),
    ],
    _P + "netns": [
        ("_create_netns", "service: new network: create the netns"),
        ("create_sandbox_net", "service: new network: create_sandbox_net"),
        ("_wait_until_up", "service: new network: wait for a link up"),
    ],
    _P + "sandbox.mounts": [
        ("make_private", "init: mounts: make private"),
        ("detach_trees", "init: mounts: detach trees"),
        ("set_attr", "init: mounts: set attributes"),
        ("clone_tree", "init: mounts: clone a tree"),
        ("clone_fd", "init: mounts: clone an opened source"),
        ("open_exact", "init: mounts: open a source or target exactly"),
    ],
}

_fd = -1
_ident = None


def _mark(label: str, start: int, end: int) -> None:
    try:  # the init closes fds it does not know: never write to a number reused since
        st = os.fstat(_fd)
        if (st.st_dev, st.st_ino) == _ident:
            os.write(_fd, f"{os.getpid()} {label} {start} {end}\n".encode())
    except OSError:
        pass


def _timed(fn, label: str):
    needs_cmd = "{cmd}" in label
    if fn.__code__.co_flags & CO_COROUTINE:

        async def timed_async(*args, **kwargs):
            start = time.monotonic_ns()
            try:
                return await fn(*args, **kwargs)
            finally:
                _mark(label, start, time.monotonic_ns())

        return timed_async

    def timed(*args, **kwargs):
        start = time.monotonic_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            name = label.format(cmd=args[1] if len(args) > 1 else "?") if needs_cmd else label
            _mark(name, start, time.monotonic_ns())

    return timed


def _keeping_marks(fn):
    """attach._close_all_but, keeping the marks' fd open (close-on-exec: not the task's)."""

    def close_all_but(keep):
        fn((*keep, _fd))
        if _fd not in keep:
            os.set_inheritable(_fd, False)

    return close_all_but


def _wrap(module, name: str | None = None) -> None:
    for path, label in STEPS[name or module.__name__]:
        if label is None:
            setattr(module, path, _keeping_marks(getattr(module, path)))
            continue
        owner_path, _, attr = path.rpartition(".")
        owner = module
        for part in owner_path.split(".") if owner_path else ():
            owner = getattr(owner, part)
        fn = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
        if isinstance(fn, classmethod):
            setattr(owner, attr, classmethod(_timed(fn.__func__, label)))
        else:
            setattr(owner, attr, _timed(fn, label))


class _Loader:
    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def get_code(self, name):
        """For `python -m` (the zygote): runpy runs the code as __main__ itself, so
        the steps are wrapped by a line put before its `if __name__ == "__main__":`."""
        source = self._loader.get_source(name)
        hook = f"__import__('sgbench_probe')._wrap(sys.modules[__name__], {name!r})\n"
        main = 'if __name__ == "__main__":'
        return compile(source.replace(main, hook + main), self._loader.get_filename(name), "exec")

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _wrap(module)


class _Finder:
    def find_spec(self, name, path, target=None):
        if name not in STEPS:
            return None
        spec = PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    global _fd, _ident
    path = os.environ.get("SGBENCH_MARKS")
    if not path:
        return
    _fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    st = os.fstat(_fd)
    _ident = (st.st_dev, st.st_ino)
    sys.meta_path.insert(0, _Finder())


install()
