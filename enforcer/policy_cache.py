"""The compiled policy of an earlier `sandgate run`, kept, for the embedded start.

Compiling the rules cost a run 15-30 ms of its ~250-350 (bench_start in turn, docs/
performance.md "Session 38"): importing PyYAML (its C parser needs its pure-Python
reader, scanner, emitter, ... and their regexes) and the compiler, then parsing and
checking the files. The same files give the same policy: `load` keeps the
CompiledPolicy pickled in the state directory with what it was made from, and gives
it again, unpickled (~0.4 ms for the default rules), only while all of it is the same:

- what was at every path the compiler read or tried (`CompiledPolicy.inputs`: the
  top files by both their given and real names, includes, presets, the approvals
  overlay present or not), as the compiler saw it, checked at every start: a file's
  sha256, where a name led, no file. An edited, replaced, created or removed file, a
  symlink pointed elsewhere, all compile afresh; a policy whose files changed while
  it was compiled is not kept;
- the files given (as absolute paths: a relative one names another file from another
  directory), SANDGATE_RULES_DIR (where presets are), the time zone (a date's expiry
  instant);
- the compiler's code and PyYAML's (their files' sizes and mtimes) and the interpreter;
- the day, and no rule's expiry passed since (a load then reports it as expired).

Not the working directory: a task usually starts in a directory of its own (its
workspace), and keyed by it every run compiled afresh (+12 ms from a new directory
each round: docs/performance.md, "Session 41"). What depends on it is
the policy's `files`, the files' names as an admin types them (relative to it if
below it: files.display_path); a kept policy gets them made again from `inputs`
(`_files`), and one whose `files` that would not give is not kept.

Rules with problems raise as `load_policy` does and are never kept. The file holds a
pickle, read as root, so it is trusted as the dataclass methods are
(private_cache.py: only when it and its directory belong to root and nobody else can
write them); one that does not load or does not match is compiled around and
replaced. Only `sandgate run` uses it: the service compiles once for a long life.
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import os
import pickle
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import sandgate.proxy.policy
from sandgate.enforcer import private_cache
from sandgate.enforcer.dataclass_cache import CACHE_DIR
from sandgate.proxy.policy import CompiledPolicy
from sandgate.proxy.policy.files import RULES_DIR, display_path, input_now

_FORMAT = 2  # of the kept entry: a change makes every kept file a miss
# Entries kept (one per set of rule files: a host whose runs each name files of their
# own makes one a run); the oldest written go.
KEEP_FILES = 64


def load(paths: list[Path], directory: str = CACHE_DIR, now: float | None = None) -> CompiledPolicy:
    """`load_policy(paths)`, or the policy it made from the same files (see above)."""
    now = time.time() if now is None else now
    as_root = os.geteuid() == 0  # the state directory is root's
    path = os.path.join(directory, f"policy-{_key(paths)}.pickle")
    policy = _kept(path, now) if as_root else None
    if policy is not None:
        return policy
    from sandgate.proxy.policy import load_policy

    policy = load_policy(paths, now=now)
    # Kept only if the files are still what the compiler read (none changed meanwhile).
    if (
        as_root
        and policy.inputs
        and _inputs_now(policy) == policy.inputs
        and _files(policy) == policy.files
    ):
        entry = (_FORMAT, _code_stamp(), policy)
        private_cache.write(path, pickle.dumps(entry, protocol=pickle.HIGHEST_PROTOCOL))
        private_cache.keep_newest(directory, "policy-*.pickle", KEEP_FILES)
    return policy


def _key(paths: list[Path]) -> str:
    """The entry's name: what the policy is asked for, where, and how dates read."""
    asked = (
        [os.path.abspath(p) for p in paths],
        str(RULES_DIR),
        time.tzname,
        time.timezone,
        time.altzone,
    )
    return hashlib.sha256(repr(asked).encode()).hexdigest()[:24]


def _kept(path: str, now: float) -> CompiledPolicy | None:
    data = private_cache.read(path)
    if not data:
        return None
    # As load_policy: no cyclic GC over the objects as they are made, then frozen.
    collecting = gc.isenabled()
    gc.disable()
    try:
        entry = pickle.loads(data)
    except Exception:  # noqa: BLE001 - a kept file that does not load is compiled around
        return None
    finally:
        if collecting:
            gc.enable()
    if not (isinstance(entry, tuple) and len(entry) == 3 and entry[0] == _FORMAT):
        return None
    _, code, policy = entry
    if not isinstance(policy, CompiledPolicy) or code != _code_stamp():
        return None
    expiry = policy.next_expiry_at
    if policy.loaded_on != datetime.date.fromtimestamp(now) or (
        expiry is not None and now >= expiry
    ):
        return None
    if not policy.inputs or _inputs_now(policy) != policy.inputs:
        return None
    files = _files(policy)
    if files != policy.files:  # kept from another working directory
        # This process's own object, just unpickled, not yet seen by anything: the
        # frozen dataclass's __init__ would build its indexes again.
        object.__setattr__(policy, "files", files)
    gc.freeze()  # as load_policy (without its collect: a start has made little garbage yet)
    return policy


def _files(policy: CompiledPolicy) -> tuple[str, ...]:
    """`policy.files` as the compiler would name them from this working directory: the
    files it read (an input's sha256), in the order it read them."""
    return tuple(
        display_path(Path(path))
        for path, found in policy.inputs
        if found is not None and found.startswith("sha256:")
    )


def _inputs_now(policy: CompiledPolicy) -> tuple[tuple[str, str | None], ...]:
    return tuple((path, input_now(Path(path))) for path, _ in policy.inputs)


def _code_stamp() -> tuple:
    """The interpreter, and the size and mtime of each module of the compiler, of
    PyYAML and of the Public Suffix List's package (its list is a module): an upgrade
    of any (or an edited checkout) compiles afresh."""
    directories = [os.path.dirname(sandgate.proxy.policy.__file__)]
    for package in ("yaml", "publicsuffixlist"):
        spec = find_spec(package)
        directories.append(os.path.dirname(spec.origin) if spec and spec.origin else "")
    stamp: list = [sys.hexversion]
    for directory in directories:
        try:
            with os.scandir(directory) as entries:
                files = sorted(
                    (e.name, e.stat()) for e in entries if e.name.endswith((".py", ".so", ".dat"))
                )
        except OSError:
            files = []
        stamp.append((directory, [(name, st.st_size, st.st_mtime_ns) for name, st in files]))
    return tuple(stamp)
