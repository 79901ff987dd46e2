"""Soak of `sandgate gateway`: does anything grow per attached run and stay?

    sudo .venv/bin/python bench/soak_service.py [--runs 1000] [--sample 100]
        [--reloads 300] [--approvals 200] [--worker-kills 3] [--embedded 200]

Not a test (it asserts nothing and is not in the test run); it prints one table.
Root; a fake internet of its own (enforcer/demo/fakenet.py, prefix `sgpsoak<hex>`,
removed in `finally`) and one `sandgate gateway --workers 2` in its host netns
(tests/support/service.py). Then `--runs` short attached runs, in a row:

- most: a DNS query (getaddrinfo), an allowed HTTPS request, a denied one
  (forbidden.test: refused at DNS, then by address);
- every 10th: the runner (`sandgate run --gateway`) SIGKILLed mid-run;
- every 10th (offset 5): the runner SIGTERMed mid-run (what a `timeout` wrapper does);
- spread over the runs: `--reloads` rule reloads (every other one a broken file),
  `--approvals` runs of the `asker` profile whose request is held for a human, who
  approves, denies or leaves it to expire, and `--worker-kills` SIGKILLs of a worker.

Every `--sample` runs it records the service's and each worker's RSS, open
descriptors and threads, the service's own tables and each worker's (`status
--json`: sandbox registry, DNS bindings, connection counts, memos, leaf caches,
approvals, flood buckets, asyncio tasks ...), the /metrics line count, the host's
netns, veth links and nft tables of this service's runs, its cgroups, the files
under its run dir, the audit log's size, the warm runners, and the mean wall time
of the last runs (attach latency drift). The table gives each resource at the
first and last sample and the growth per run between them. Then `--embedded`
`sandgate run` (embedded gateway) in a row, each checked with the e2e harness's
`leftovers()`.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from sandgate.enforcer.demo.fakenet import FakeInternet, cleanup_prefix  # noqa: E402
from support import sandbox  # noqa: E402
from support.service import GatewayProcess  # noqa: E402
from support.soak import ASK_TASK, BROKEN, RULES, TASK, metrics_series, proc_figures  # noqa: E402

METRICS_PORT = 9464


def cgroups_of(run_ids: set[str]) -> int:
    """sandgate-<id> cgroups of these runs left in any hierarchy (v1 and unified)."""
    names = {f"sandgate-{r}" for r in run_ids}
    found = 0
    for root in ("memory", "pids", "unified", "cpu"):
        for _, dirs, _ in os.walk(f"/sys/fs/cgroup/{root}"):
            found += sum(1 for d in dirs if d in names)
    return found


def warm_cgroups(zygote_pid: int | None) -> int:
    """sandgate-warm-* cgroups under the runner pool's memory cgroup."""
    if zygote_pid is None:
        return 0
    try:
        line = next(
            x
            for x in Path(f"/proc/{zygote_pid}/cgroup").read_text().splitlines()
            if ":memory:" in x
        )
    except (OSError, StopIteration):
        return 0
    path = Path("/sys/fs/cgroup/memory" + line.split(":", 2)[2])
    if path.name == "sandgate.self":
        path = path.parent
    return sum(1 for d in path.glob("sandgate-warm-*"))


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


class Soak:
    def __init__(self, args, fakenet, workdir: Path):
        self.args, self.fakenet, self.workdir = args, fakenet, workdir
        self.rules = workdir / "rules.yaml"
        self.rules.write_text(RULES)
        self.gateway = GatewayProcess(
            fakenet, workdir, self.rules,
            "--workers", "2", "--metrics-listen", f"127.0.0.1:{METRICS_PORT}",
        )  # fmt: skip
        self.run_ids: set[str] = set()
        self.walls: list[float] = []
        self.samples: list[dict] = []
        self.approvals = {"approved": 0, "denied": 0, "expired": 0}

    def attach(self, i: int) -> None:
        kind = "kill" if i % 10 == 0 else "term" if i % 10 == 5 else "plain"
        ask = self.args.approvals and i % max(1, self.args.runs // self.args.approvals) == 3
        workdir = self.workdir / "runs" / str(i % 4)
        workdir.mkdir(parents=True, exist_ok=True)
        summary = workdir / "summary.json"
        summary.unlink(missing_ok=True)
        code, argv = (ASK_TASK, []) if ask else (TASK, ["3" if kind != "plain" else "0"])
        cmd = [
            sandbox.SANDGATE, "run", "--gateway", str(self.gateway.control),
            "--profile", "asker" if ask else "default", "--no-workspace",
            "--summary-json", str(summary), "--", sandbox.SANDBOX_PYTHON, "-c", code, *argv,
        ]  # fmt: skip
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if ask:
            self.decide_approval(i)
        elif kind != "plain":
            time.sleep(1.5)
            proc.send_signal(signal.SIGKILL if kind == "kill" else signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self.walls.append(time.monotonic() - started)

    def decide_approval(self, i: int) -> None:
        """Approve, deny or leave the run's approval to expire, by turns."""
        choice = ("approve", "deny", None)[(i // 7) % 3]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            listed = self.gateway.ask("approvals", "--json", "list")
            try:
                pending = json.loads(listed.stdout or "[]")
            except ValueError:
                pending = []
            items = pending.get("approvals", []) if isinstance(pending, dict) else pending
            fresh = [p for p in items if not p.get("task_ended")]
            if fresh:
                if choice is None:
                    self.approvals["expired"] += 1
                else:
                    self.gateway.ask("approvals", choice, fresh[0]["id"])
                    self.approvals["approved" if choice == "approve" else "denied"] += 1
                return
            time.sleep(0.05)

    def reload(self, n: int) -> None:
        self.rules.write_text(BROKEN if n % 2 else RULES + f"# reload {n}\n")
        self.gateway.ask("reload")

    def kill_worker(self) -> None:
        workers = self.gateway.status()["workers"]
        pid = workers[0]["pid"]
        if pid:
            os.kill(pid, signal.SIGKILL)
            sandbox.eventually(
                lambda: all(w["pid"] and w["pid"] != pid for w in self.gateway.status()["workers"]),
                timeout=20,
            )

    def sample(self, runs: int) -> None:
        time.sleep(1.2)  # the workers push their stats every second
        status = self.gateway.status()
        self.run_ids |= {e["task_id"] for e in self.gateway.events(kind="task") if e.get("task_id")}
        pid = status["pid"]
        row = {"runs": runs}
        row.update({f"service {k}": v for k, v in proc_figures(pid).items()})
        for w in status["workers"]:
            for k, v in proc_figures(w["pid"] or 0).items():
                row[f"worker{w['index']} {k}"] = v
            for k, v in w.get("tables", {}).items():
                row[f"worker{w['index']} {k}"] = v
        row.update({f"service {k}": v for k, v in status.get("tables", {}).items()})
        zygote = next(
            (c for c in children(pid) if b"zygote" in Path(f"/proc/{c}/cmdline").read_bytes()),
            None,
        )
        if zygote:
            row.update({f"zygote {k}": v for k, v in proc_figures(zygote).items()})
        row["warm runners"] = status["warm_runners"]
        row["warm cgroups"] = warm_cgroups(zygote)
        nets = {p.name for p in sandbox.NETNS_DIR.glob("sg-*")}
        live = {f"sg-{s}" for s in self.run_ids}
        row["netns (ended runs)"] = len(nets & live) - status["sandboxes"]
        links = self.fakenet.run_in_host(["ip", "-o", "link"], capture_output=True, text=True)
        row["veth sgh- (host)"] = links.stdout.count(": sgh-")
        tables = self.fakenet.run_in_host(["nft", "list", "tables"], capture_output=True, text=True)
        row["nft tables (host)"] = tables.stdout.count("sandgate_")
        row["cgroups (ended runs)"] = cgroups_of(self.run_ids)
        row["run dirs (ended runs)"] = (
            sum(1 for r in self.run_ids if (sandbox.RUN_DIR / r).exists()) - status["sandboxes"]
        )
        row["audit KiB"] = self.gateway.audit.stat().st_size // 1024
        row["metrics lines"] = metrics_series(self.fakenet, METRICS_PORT)
        last = self.walls[-self.args.sample :]
        row["run wall ms (mean of last)"] = int(1000 * sum(last) / max(1, len(last)))
        self.samples.append(row)
        print(f"sample at {runs} runs: {json.dumps(row)}", file=sys.stderr, flush=True)

    def soak(self) -> None:
        args = self.args
        self.gateway.start()
        reloads_per_run = args.reloads / args.runs
        kills_at = {
            int(args.runs * (k + 1) / (args.worker_kills + 1)) for k in range(args.worker_kills)
        }
        reloaded = 0.0
        self.sample(0)
        for i in range(1, args.runs + 1):
            self.attach(i)
            reloaded += reloads_per_run
            while reloaded >= 1:
                self.reload(int(reloaded * 1000) + i)
                reloaded -= 1
            if i in kills_at:
                self.kill_worker()
            if i % args.sample == 0:
                self.sample(i)
        self.rules.write_text(RULES)
        self.gateway.ask("reload")

    def embedded(self) -> list[str]:
        """`--embedded` `sandgate run` in a row; what each left behind."""
        left = []
        for i in range(self.args.embedded):
            summary = self.workdir / "embedded-summary.json"
            summary.unlink(missing_ok=True)
            rules = self.workdir / "embedded.yaml"
            rules.write_text(RULES)
            ran = self.fakenet.run_in_host(
                [
                    sandbox.SANDGATE, "run", "--rules", str(rules), "--no-workspace",
                    "--dns-upstream", self.fakenet.dns_ip, "--metrics-listen", "off",
                    "--extra-ca", str(self.fakenet.ca_cert),
                    "--summary-json", str(summary), "--",
                    sandbox.SANDBOX_PYTHON, "-c", TASK, "0",
                ],
                capture_output=True, timeout=60,
            )  # fmt: skip
            try:
                run_id = json.loads(summary.read_text())["task_id"]
            except (OSError, ValueError, KeyError):
                left.append(f"run {i}: no summary: {ran.stderr[-300:]!r}")
                continue
            left += sandbox.leftovers(self.fakenet, run_id)
        return left


def report(samples: list[dict]) -> None:
    first, last = samples[1] if len(samples) > 1 else samples[0], samples[-1]
    runs = max(1, last["runs"] - first["runs"])
    keys = [k for k in last if k != "runs"]
    width = max(len(k) for k in keys)
    print(f"| {'resource':{width}} | at 0 | at {first['runs']} | at {last['runs']} | per run |")
    print(f"|{'-' * (width + 2)}|---:|---:|---:|---:|")
    for k in keys:
        a, b = first.get(k, 0), last.get(k, 0)
        print(f"| {k:{width}} | {samples[0].get(k, 0)} | {a} | {b} | {(b - a) / runs:+.3f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--sample", type=int, default=100)
    parser.add_argument("--reloads", type=int, default=300)
    parser.add_argument("--approvals", type=int, default=200)
    parser.add_argument("--worker-kills", type=int, default=3)
    parser.add_argument("--embedded", type=int, default=200)
    args = parser.parse_args()
    prefix = f"sgpsoak{secrets.token_hex(2)}"
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    soak = None
    try:
        with FakeInternet(prefix, workdir / "net") as fakenet:
            soak = Soak(args, fakenet, workdir)
            try:
                soak.soak()
            finally:
                soak.gateway.stop()
            left = soak.embedded() if args.embedded else []
        report(soak.samples)
        print(f"approvals: {soak.approvals}")
        print(f"embedded runs: {args.embedded}, leftovers: {left or 'none'}")
    finally:
        cleanup_prefix(prefix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
