"""Never silently weaker: a missing kernel feature stops the run with its name and fix,
unless --allow-weaker-sandbox, which carries each gap on to a sandbox_weakened event."""

from __future__ import annotations

import pytest
from sandgate.enforcer.sandbox import cgroup, prepare, seccomp, spec


@pytest.fixture
def no_seccomp(monkeypatch):
    monkeypatch.setattr(
        seccomp,
        "available",
        lambda: "this kernel has no seccomp filters; fix: CONFIG_SECCOMP_FILTER",
    )
    monkeypatch.setattr(cgroup, "check", lambda limits, **_: [])


def test_a_missing_feature_refuses_the_run_naming_it_and_the_fix(no_seccomp, tmp_path):
    with pytest.raises(spec.SandboxError) as refused:
        prepare.prepare(
            tmp_path,
            "t1",
            spec.SandboxOptions(),
            cgroup.Limits(pids=None, memory_bytes=None),
            netns="/run/netns/none",
            argv=["true"],
            env={},
            file_binds=[],
            hidden=[],
            protected=[],
        )
    message = str(refused.value)
    assert (
        "seccomp" in message
        and "CONFIG_SECCOMP_FILTER" in message
        and "--allow-weaker-sandbox" in message
    )
    assert not (tmp_path / "sandbox.json").exists()  # nothing was prepared


def test_allow_weaker_goes_on_and_records_the_gap(no_seccomp, tmp_path):
    prepared = prepare.prepare(
        tmp_path,
        "t2",
        spec.SandboxOptions(allow_weaker=True),
        cgroup.Limits(pids=None, memory_bytes=None),
        netns="/run/netns/none",
        argv=["true"],
        env={},
        file_binds=[],
        hidden=[],
        protected=[],
    )
    try:
        assert [g.feature for g in prepared.gaps] == ["seccomp"]
        document = (tmp_path / "sandbox.json").read_text()
        assert (
            '"seccomp": null' in document and '"userns": true' in document
        )  # the rest still applies
    finally:
        prepared.started()
        prepared.collect()
        prepared.remove()  # its id slot, released: else the slot's record outlives pytest
