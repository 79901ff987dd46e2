"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

import os

import pytest
from sandgate.enforcer.demo.fakenet import FakeInternet, cleanup_prefix, fresh_prefix
from support.sandbox import STATE_DIR


@pytest.fixture(scope="session")
def fakenet(tmp_path_factory: pytest.TempPathFactory):
    """One fake internet for the whole session (startup is cheap but not free).

    The prefix is fresh (`sgt` + 4 hex digits) and only it is cleaned up: a
    blanket cleanup of "sgt" would tear down a test run going on in parallel.

    Tests share it, so a test that counts what the servers saw calls
    `fakenet.clear_logs()` first. The final `cleanup_prefix` also removes any
    sandbox namespace a test made with the same prefix and forgot.
    """
    prefix = fresh_prefix()
    try:
        with FakeInternet(prefix, tmp_path_factory.mktemp(prefix)) as fn:
            yield fn
    finally:
        cleanup_prefix(prefix)


@pytest.fixture
def net(fakenet):
    """The session's fake internet, with its server logs read from here on."""
    fakenet.clear_logs()
    return fakenet


@pytest.fixture(autouse=True)
def _journals_of_this_test_removed(request):
    """A run that ended while its audit log could not be written (a full test disk, a
    spent --audit-budget) keeps its audit journal for the next open of that log
    (proxy/telemetry/audit.py): a test's log goes with its directory, so what it left
    in the state directory is removed here (16 MiB each), after its own teardown."""
    if "tmp_path" not in request.fixturenames:
        yield
        return
    under = str(request.getfixturevalue("tmp_path").resolve()) + "/"
    yield
    journals = STATE_DIR / "audit-journal"
    for pointer in journals.glob("*.log"):
        try:
            if not os.path.realpath(pointer.read_text().strip()).startswith(under):
                continue
        except OSError:
            continue
        for part in journals.glob(pointer.name.removesuffix(".log") + ".*"):
            part.unlink(missing_ok=True)
