"""The dataclass methods an embedded `sandgate run` keeps for its next start
(enforcer/dataclass_cache.py), end to end: the first run writes them into the state
directory, private to root; the next one starts from them and serves as before; a
file someone else could have written is never run, and is replaced."""

from __future__ import annotations

import marshal
import os
from pathlib import Path

import pytest
from support import sandbox
from support.sandbox import curl

pytestmark = pytest.mark.e2e

STEPS = {"allowed": curl("https://allowed.test/"), "denied": curl("https://denied.test/")}


def cache_file(state: Path) -> Path:
    (found,) = (state / "cache").glob("dataclass-methods-*.marshal")
    return found


def run_with(net, tmp_path: Path, state: Path, label: str) -> sandbox.RunResult:
    where = tmp_path / label
    where.mkdir()
    r = sandbox.run(net, where, STEPS, env={**os.environ, "SANDGATE_STATE_DIR": str(state)})
    assert r.returncode == 0, r.describe()
    assert r["allowed"].status == 200, r.describe()
    assert r["denied"].rc != 0 and r.verdicts(name="denied.test") == {
        ("deny", "no_rule", "default:fallback")
    }, r.describe()
    return r


def test_the_first_run_keeps_the_methods_and_the_next_starts_from_them(net, tmp_path):
    state = tmp_path / "state"
    run_with(net, tmp_path, state, "first")
    kept = cache_file(state)
    info, directory = kept.stat(), (state / "cache").stat()
    assert (info.st_uid, info.st_mode & 0o777) == (0, 0o600)
    assert (directory.st_uid, directory.st_mode & 0o777) == (0, 0o700)
    methods = marshal.loads(kept.read_bytes())
    assert len(methods) > 100 and all(text.startswith("def __create_fn__") for text in methods)

    os.utime(kept, (1, 1))
    run_with(net, tmp_path, state, "second")
    # Nothing the second start made was missing from the file: it was not written again.
    assert kept.stat().st_mtime == 1


@pytest.mark.parametrize("how", ["others-can-write", "not-roots"])
def test_a_kept_file_others_could_have_written_is_never_run(net, tmp_path, how):
    state = tmp_path / "state"
    run_with(net, tmp_path, state, "first")
    kept = cache_file(state)
    marker = tmp_path / "planted-code-ran"
    planted = compile(f"open({str(marker)!r}, 'w').close()", "<string>", "exec")
    kept.write_bytes(marshal.dumps(dict.fromkeys(marshal.loads(kept.read_bytes()), planted)))
    if how == "others-can-write":
        kept.chmod(0o666)
    else:
        os.chown(kept, 65534, 65534)

    run_with(net, tmp_path, state, "second")
    assert not marker.exists()
    info = kept.stat()  # replaced by one of the run's own
    assert (info.st_uid, info.st_mode & 0o777) == (0, 0o600)
    assert planted not in marshal.loads(kept.read_bytes()).values()
