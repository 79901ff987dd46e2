"""Hot reload: load the rule files again, off the event loop, and swap the new policy
in; or, when they are broken, keep the last good one and say why.

What starts a reload is the caller's: the control socket's `reload` command, SIGHUP
(`install_sighup`), or a change of any file the policy was built from (`watch`: the
top files, includes and presets, polled by (mtime_ns, size, inode), so an editor's
rename-over is seen as well as an edit in place). Each reload:

1. loads the files in a worker thread (`asyncio.to_thread`): compiling 100k rules
   takes seconds, and the loop keeps deciding meanwhile, under the old policy
   (longest loop pause measured: 24 ms, bench/bench_reload.py; load_policy freezes
   the new policy's objects so that no GC pass scans them all at once);
2. on success, `gateway.swap_policy` puts the new policy in force in one step on the
   loop, emits `policy_loaded`, closes the open connections it denies (reason
   `policy_changed`) and drops DNS bindings it no longer allows;
3. on a PolicyError nothing changes: the errors (FILE:LINE:COL) go to the log, the
   result and a `policy_invalid` event (which the metrics count as
   `sandgate_policy_reloads_total{result="failure"}`).

Every reload first waits until the watched files have been quiet for SETTLE_S: a
file written in place (`cat > rules.yaml`, an editor that rewrites the file, a
config tool) passes through truncated and half-written states, and half a rule file
is often a valid one (an `allow: "*.example.com"` whose `deny: evil.example.com` is
not written yet). A file still changing after SETTLE_MAX_S, or one that changed
while it was being loaded, fails the reload: the last good policy stays. A writer
that pauses longer than SETTLE_S mid-file can still be read half-way: write rule
files by rename (docs/operations.md).

Reloads are serialised (one lock): two admins reloading at once get two complete
reloads, one after the other, never two swaps racing. Nothing here imports
mitmproxy: the gateway is anything with `policy`, `swap_policy` and `emit`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from sandgate.proxy.policy import CompiledPolicy, PolicyError, Problem, load_policy
from sandgate.proxy.policy.reasons import Reason, Verdict
from sandgate.proxy.telemetry.event import Event, EventKind

if TYPE_CHECKING:
    from sandgate.proxy.gateway import SwapReport

log = logging.getLogger("sandgate.reload")

# An event's detail is one line for a human; a hundred errors stay in the result and log.
MAX_DETAIL = 2000
# A rule file changed less than this long ago may be half-written: wait until it is not.
SETTLE_S = 0.5
# ... but not for ever: a file that keeps changing this long is not loaded.
SETTLE_MAX_S = 10.0


@dataclass(frozen=True)
class ReloadResult:
    """One reload's outcome, as the control socket's `reload` reply says it."""

    ok: bool
    trigger: str  # what started it: "control", "SIGHUP", "file change", ...
    policy_hash: str  # the policy in force afterwards: the old one after a failure
    rule_count: int  # of that policy
    errors: tuple[str, ...] = ()  # FILE:LINE:COL: message, one per problem (or why none load)
    ms: float = 0.0  # load and swap, wall time
    swap: SwapReport | None = None  # None after a failure
    rules_at_fault: bool = False  # failed on the files' content, not on the loader

    def to_dict(self) -> dict:
        return asdict(self) | {"errors": list(self.errors)}


class ReloadTarget(Protocol):
    """What the reloader needs of the gateway (proxy/gateway.py's Gateway)."""

    @property
    def policy(self) -> CompiledPolicy: ...
    def swap_policy(self, new: CompiledPolicy, *, cause: str = "") -> SwapReport: ...
    def emit(self, event: Event) -> None: ...


Signature = tuple[int, int, int] | None
"""(mtime_ns, size, inode) of a file, or None when it cannot be stat'ed."""


def file_signature(path: Path) -> Signature:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class PolicyReloader:
    """Reloads `rule_files` (the files given on the command line) into `gateway`.
    `load` is `load_policy` or a stand-in with its contract (tests, benchmarks)."""

    def __init__(
        self,
        rule_files: list[Path],
        gateway: ReloadTarget,
        *,
        load: Callable[[list[Path]], CompiledPolicy] = load_policy,
        settle: float = SETTLE_S,
        settle_max: float = SETTLE_MAX_S,
    ):
        self.rule_files = [Path(p) for p in rule_files]
        self.gateway = gateway
        self.load = load
        self.settle, self.settle_max = settle, settle_max
        self.last: ReloadResult | None = None
        self._lock = asyncio.Lock()
        self._failed_paths: tuple[Path, ...] = ()  # what the last failed load tried to read
        self._tasks: set[asyncio.Task] = set()  # SIGHUP reloads in flight

    async def reload(self, trigger: str, actor: str | None = None) -> ReloadResult:
        """Load, validate, swap; on errors keep the policy in force. Never raises
        (but for cancellation). `actor` says who asked ("uid 0", a changed file) and
        goes into the event's detail with `trigger`."""
        async with self._lock:
            started = time.perf_counter()
            cause = f"reload on {trigger}" + (f" by {actor}" if actor else "")
            try:
                new = await self._load_settled()
            except PolicyError as e:
                self._failed_paths = e.paths
                errors, at_fault = tuple(map(str, e.problems)), True
            except Exception as e:  # noqa: BLE001 - a loader failure is a failed reload, not a crash
                log.exception("sandgate: loading the rule files failed")
                # No FILE:LINE:COL: no line of the files is known to be at fault.
                at_fault, errors = (
                    False,
                    (
                        f"the rules could not be loaded from {', '.join(map(str, self.rule_files))}: "
                        f"{type(e).__name__}: {e} (an unexpected error, at no known line: its "
                        "traceback is in the log)",
                    ),
                )
            else:
                self._failed_paths = ()
                old = self.gateway.policy
                report = self.gateway.swap_policy(new, cause=cause)
                # Off the loop too: 100k rules; then refcounting can free `old`.
                await asyncio.to_thread(old.forget_decisions)
                result = ReloadResult(
                    True, trigger, new.hash, new.rule_count, ms=_ms_since(started), swap=report
                )
                log.info(
                    "sandgate: policy %s in force (%d rules; %s; %d connections closed, "
                    "%d DNS bindings dropped)",
                    new.hash,
                    new.rule_count,
                    cause,
                    report.connections_closed,
                    report.bindings_dropped,
                )
                self.last = result
                return result
            self.last = self._failed(trigger, cause, errors, at_fault, started)
            return self.last

    async def _load_settled(self) -> CompiledPolicy:
        """The policy of the files once none of them has changed for `settle` seconds,
        and none changed while they were loaded; PolicyError naming the files that
        would not stay still for `settle_max` seconds."""
        deadline = time.monotonic() + self.settle_max
        while True:
            before = await self._quiet_signatures(deadline)
            new = await asyncio.to_thread(self.load, list(self.rule_files))
            changed = [path for path, sig in before.items() if file_signature(path) != sig]
            if not changed:
                return new
            if time.monotonic() >= deadline:
                raise _still_changing(changed, self.settle_max)

    async def _quiet_signatures(self, deadline: float) -> dict[Path, Signature]:
        """The watched files' signatures once they have not changed for `settle`
        seconds: at once when each was last modified longer ago than that (by the
        wall clock, as the file system stamps it); else when two looks `settle`
        seconds apart agree (which also covers a modification time in the future,
        after the clock was set back)."""
        current = self._signatures()
        while True:
            recent = [
                path
                for path, sig in current.items()
                if sig and time.time_ns() - sig[0] < self.settle * 1e9
            ]
            if not recent:
                return current
            if time.monotonic() >= deadline:
                raise _still_changing(recent, self.settle_max)
            await asyncio.sleep(self.settle)
            previous, current = current, self._signatures()
            if current == previous:
                return current

    def _signatures(self) -> dict[Path, Signature]:
        return {path: file_signature(path) for path in self.watched_paths()}

    def _failed(
        self, trigger: str, cause: str, errors: tuple[str, ...], at_fault: bool, started: float
    ) -> ReloadResult:
        policy = self.gateway.policy
        log.error(
            "sandgate: %s failed; policy %s stays in force:\n  %s",
            cause,
            policy.hash,
            "\n  ".join(errors),
        )
        detail = f"{cause} failed; policy {policy.hash} stays in force: {'; '.join(errors)}"
        self.gateway.emit(
            Event(
                kind=EventKind.POLICY,
                verdict=Verdict.DENY,
                reason=Reason.POLICY_INVALID,
                detail=detail[:MAX_DETAIL],
            )
        )
        return ReloadResult(
            False,
            trigger,
            policy.hash,
            policy.rule_count,
            errors,
            ms=_ms_since(started),
            rules_at_fault=at_fault,
        )

    # --- what starts a reload -----------------------------------------------------------

    def watched_paths(self) -> list[Path]:
        """The files a change of which reloads: the top files, every file the policy in
        force was built from, and those a failed load tried (so that fixing a newly
        included file is noticed too). A top file is watched by the name it was given
        too: when that is a symlink swapped to another file (`ln -sfn`, a Kubernetes
        ConfigMap), its resolved target is unchanged, but the name's inode is not."""
        paths = [Path(os.path.abspath(p)) for p in self.rule_files]
        paths += [Path(os.path.realpath(p)) for p in self.rule_files]  # a loop: no RuntimeError
        paths += self.gateway.policy.paths + self._failed_paths
        return list(dict.fromkeys(paths))

    async def watch(self, interval: float = 1.0) -> None:
        """Poll the watched files every `interval` seconds and reload when one changed
        (edited, replaced, removed, unreadable: a file that cannot be read is a failed
        reload, reported as such). Runs until cancelled: start it as a task."""
        seen = {path: file_signature(path) for path in self.watched_paths()}
        while True:
            await asyncio.sleep(interval)
            try:
                current = {path: file_signature(path) for path in self.watched_paths()}
                # A path new to the set joined through another reload: nothing changed.
                changed = [p for p, sig in current.items() if p in seen and seen[p] != sig]
                # Signatures from before the reload: a file edited during the load is
                # seen as changed next time round.
                seen = current
                if changed:
                    await self.reload("file change", actor=", ".join(map(str, changed)))
                    for path in self.watched_paths():
                        seen.setdefault(path, file_signature(path))
            except Exception:  # noqa: BLE001 - the watcher must outlive any one failure
                log.exception("sandgate: watching the rule files failed; still watching")

    def install_sighup(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Reload on SIGHUP (the loop's signal handler: safe with asyncio)."""
        (loop or asyncio.get_running_loop()).add_signal_handler(signal.SIGHUP, self._on_sighup)

    def _on_sighup(self) -> None:
        task = asyncio.get_running_loop().create_task(self.reload("SIGHUP"))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _still_changing(changing: list[Path], settle_max: float) -> PolicyError:
    return PolicyError(
        [
            Problem(
                str(path),
                1,
                1,
                f"still being written: it kept changing for {settle_max:g} s; "
                "the file was not loaded (write rule files by rename)",
            )
            for path in changing
        ],
        tuple(changing),
    )


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)
