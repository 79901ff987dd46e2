"""`sandgate runners` (enforcer/cli/runners.py) and the one-pool-per-socket lock
(enforcer/zygote.py `claim`, read by the service's status): no process is forked here."""

from __future__ import annotations

import os

import pytest
from sandgate.enforcer import handoff, service, zygote
from sandgate.enforcer.cli import main


def test_runners_refuses_a_non_root_user_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert main(["runners", "--control", "/nonexistent/g.sock"]) == 125
    err = capsys.readouterr().err
    assert err == "sandgate: sandgate runners must run as root: its runners build task sandboxes\n"


@pytest.mark.parametrize("warm", ["0", "65", "two", "-1"])
def test_runners_takes_1_to_64_runners(warm, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["runners", "--warm", warm])
    assert exit_.value.code == 2
    assert "is not a number from 1 to 64" in capsys.readouterr().err


def test_one_pool_per_control_socket(tmp_path):
    control = str(tmp_path / "g.sock")
    assert service._pool_pid(control) is None  # no lock file yet
    lock = zygote.claim(control)
    try:
        assert service._pool_pid(control) == os.getpid()
        with pytest.raises(zygote.PoolError) as refused:
            zygote.claim(control)  # another open file: flock tells them apart
        assert str(refused.value) == (
            f"another pool of warm runners serves {control}: pid {os.getpid()}"
        )
        assert os.stat(control + handoff.LOCK_SUFFIX).st_mode & 0o777 == 0o600
    finally:
        os.close(lock)
    assert service._pool_pid(control) is None  # the file stays; its lock went with the pool
    os.close(zygote.claim(control))


def test_the_lock_is_not_a_runner_socket(tmp_path):
    control = str(tmp_path / "g.sock")
    os.close(zygote.claim(control))
    (tmp_path / f"g.sock{handoff.SUFFIX}ab12").touch()
    assert handoff.runner_sockets(control) == [f"{control}{handoff.SUFFIX}ab12"]
