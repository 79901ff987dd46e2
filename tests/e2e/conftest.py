"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

import pytest
from sandgate.enforcer.demo.fakenet import FakeInternet, cleanup_prefix, fresh_prefix


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
