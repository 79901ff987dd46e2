"""Suite-wide gate for end-to-end tests.

e2e tests need root (namespaces, nftables) and real tools. On a developer machine
without them the tests are skipped, so the unit tests stay usable; in CI (env CI
set) they fail instead, because a CI run that silently skips the end-to-end tests
would report green without testing the data path (see DESIGN.md, Testing). In
CI any other skip fails too (`pytest_runtest_makereport`).

Every test cleans up what it made: after the session, `sandgate gc --dry-run` names
nothing that was not there before it (`pytest_sessionfinish`), or the run fails.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import time

import pytest
from support.sandbox import SANDGATE, id_slots_held, run_dirs_held

E2E_TOOLS = {
    "ip": "iproute2",
    "nft": "nftables",
    "nginx": "nginx-light",
    "dnsmasq": "dnsmasq-base",
    "curl": "curl",
    "dig": "dnsutils",
    "socat": "socat",
    "chromium": "chromium",  # the approvals page's browser test
    "chromedriver": "chromium-driver",
}


@functools.cache
def e2e_problems() -> tuple[str, ...]:
    """What keeps e2e tests from running here; empty when they can run."""
    problems = []
    if os.geteuid() != 0:
        problems.append(f"root privileges (running as uid {os.geteuid()})")
    path = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"
    missing = [tool for tool in E2E_TOOLS if shutil.which(tool, path=path) is None]
    if missing:
        packages = " ".join(sorted({E2E_TOOLS[tool] for tool in missing}))
        problems.append(f"tools {', '.join(missing)} (apt-get install {packages})")
    return tuple(problems)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("e2e") is None or not e2e_problems():
        return
    message = "end-to-end test needs " + "; ".join(e2e_problems())
    if in_ci():
        pytest.fail(message + " -- CI must run e2e tests, so this is a failure", pytrace=False)
    pytest.skip(message)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    """In CI a skip anywhere is a failure: a test that skipped itself (a
    parametrisation that does not apply, a missing tool) would report green
    without running, and the machine CI runs on has everything."""
    outcome = yield
    report = outcome.get_result()
    if in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which must run every test: {report.longrepr}"


_LEFT_BEFORE = pytest.StashKey[set]()  # what gc would remove at the session's start
GC_SETTLE_S = 10.0  # a runner whose caller a test killed may still be tearing its run down


def _left_for_gc() -> set[str]:
    """What `sandgate gc --dry-run` would remove now: run dirs, netns, cgroups and id
    slots of runs whose process is gone (one line each; empty without root)."""
    if os.geteuid() != 0 or not os.path.exists(SANDGATE):  # not root, or not installed
        return set()
    done = subprocess.run([SANDGATE, "gc", "--dry-run"], capture_output=True, text=True, timeout=60)
    left = {line for line in done.stdout.splitlines() if line.startswith("would remove")}
    # gc leaves alone what a live process holds: this one, for a test's own claim or attach
    for slot in id_slots_held(os.getpid()):
        left.add(f"id slot {slot}, claimed by the test process and never released")
    for run_dir in run_dirs_held(os.getpid()):
        left.add(f"run dir {run_dir}, attached by the test process and never removed")
    return left


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_LEFT_BEFORE] = _left_for_gc()


@pytest.hookimpl(trylast=True)  # after the session fixtures' teardown (the fake internet's)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before = session.config.stash.get(_LEFT_BEFORE, set())
    if session.testscollected == 0 or session.config.option.collectonly:
        return
    deadline = time.monotonic() + GC_SETTLE_S
    while (left := _left_for_gc() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    if left:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = "\n".join(sorted(left))
        message = f"the tests left what `sandgate gc` would remove:\n{lines}\n"
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_sep("=", "leftovers", red=True)
            reporter.write(message)
        else:
            print(message, file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
