"""Races between runs started at once (a CI fan-out), each forced by hand: two makers
interleaved at the point where they used to collide. tests/e2e/test_run_storm.py runs
the burst itself."""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from ipaddress import IPv4Network

import pytest
import yaml
from sandgate.enforcer import netns, nft, service_state
from sandgate.enforcer import run as runner
from sandgate.enforcer.approvals_control import always_writer, handle
from sandgate.proxy.approvals.holder import Approvals
from sandgate.proxy.approvals.pending import AskKey
from sandgate.proxy.policy.model import ApprovalSettings

# --- run ids ---------------------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "RUN_DIR", tmp_path / "run")
    # gc's passes over the host's id slots and services' state dirs are their own
    # modules' tests (test_id_slots, test_service_state): none of the host's here.
    monkeypatch.setattr(runner.id_slots, "sweep", lambda pool, dry_run=False: [])
    monkeypatch.setattr(service_state, "collect", lambda drop, keep: None)
    return tmp_path / "run"


def draws(monkeypatch, *ids: str) -> None:
    """secrets.token_hex gives these ids, in this order."""
    given = iter(ids)
    monkeypatch.setattr(runner.secrets, "token_hex", lambda n: next(given))


def test_two_runs_that_draw_one_id_get_two(run_dir, monkeypatch):
    draws(monkeypatch, "aaaa0001", "aaaa0001", "bbbb0002")
    first = runner.claim_run_id(runner.secrets.token_hex(4))
    second = runner.claim_run_id(runner.secrets.token_hex(4))
    assert (first, second) == ("aaaa0001", "bbbb0002")
    assert sorted(p.name for p in run_dir.iterdir()) == ["aaaa0001", "bbbb0002"]


def test_an_id_whose_audit_log_is_kept_is_not_drawn_again(run_dir, monkeypatch):
    """A run's default audit log (AUDIT_DIR/<id>.jsonl) outlives it: a later run of the
    same id would append its events to that task's file."""
    kept = {"cccc0003"}
    draws(monkeypatch, "dddd0004")
    assert runner.claim_run_id("cccc0003", lambda r: r in kept) == "dddd0004"
    assert not (run_dir / "cccc0003").exists()


def test_no_free_id_is_one_line(run_dir, monkeypatch):
    monkeypatch.setattr(runner.secrets, "token_hex", lambda n: "eeee0005")
    (run_dir / "eeee0005").mkdir(parents=True)
    with pytest.raises(runner.RunError, match=r"^no free run id in .* draws"):
        runner.claim_run_id()


def test_a_run_that_lost_its_id_leaves_the_winners_state_alone(run_dir, monkeypatch):
    """TaskRun's teardown after a failed claim unwires nothing and removes no dir: the
    id's netns, table and state dir are the other run's."""
    from sandgate.proxy.policy import load_policy
    from sandgate.proxy.policy.load import RULES_DIR

    unwired = []
    monkeypatch.setattr(runner, "unwire", lambda *a, **kw: unwired.append(a) or {})
    monkeypatch.setattr(runner, "dns_upstreams", lambda given: ["192.0.2.53"])
    monkeypatch.setattr(runner.secrets, "token_hex", lambda n: "ffff0006")
    (run_dir / "ffff0006").mkdir(parents=True)
    (run_dir / "ffff0006" / "pid").write_text("theirs")
    policy = load_policy([RULES_DIR / "examples" / "demo.yaml"])
    opts = runner.RunOptions(command=["true"], policy=policy, quiet=True, metrics_listen=None)
    opts.audit_log = run_dir.parent / "audit.jsonl"
    with pytest.raises(runner.RunError, match="no free run id"):
        asyncio.run(runner.TaskRun(opts).run())
    assert unwired == []
    assert (run_dir / "ffff0006" / "pid").read_text() == "theirs"


# --- sandbox addresses -------------------------------------------------------------------


def fake_net(run_id, gateway_ip, sandbox_ip) -> netns.SandboxNet:
    return netns.SandboxNet(
        netns.netns_name(run_id), netns.host_if_name(run_id), "eth0", gateway_ip, sandbox_ip, 30
    )


def test_two_runs_that_draw_one_slash30_at_once_get_two(monkeypatch, tmp_path):
    """Both draw /30 number 5; the first assigns it while the second looks. Picked
    and assigned apart, both found it free and took it."""
    assigned: dict[str, str] = {}  # gateway address -> run id: the host's interfaces
    drawn = itertools.chain([5, 5], itertools.count(7))
    draw_lock = threading.Lock()

    def randrange(n):
        with draw_lock:
            return next(drawn)

    def create_sandbox_net(run_id, gateway_ip, sandbox_ip):
        time.sleep(0.2)  # netns, veth, addresses: the second run picks meanwhile
        assigned.setdefault(str(gateway_ip), run_id)
        return fake_net(run_id, gateway_ip, sandbox_ip)

    monkeypatch.setattr(runner, "ADDRESS_LOCK", tmp_path / "addresses.lock")
    monkeypatch.setattr(runner.random, "randrange", randrange)
    monkeypatch.setattr(runner, "_host_addresses", lambda: set(assigned))
    monkeypatch.setattr(netns, "create_sandbox_net", create_sandbox_net)
    made = {}

    def make(run_id):
        made[run_id] = runner.make_sandbox_net(run_id, str(netns.DEFAULT_POOL))

    threads = [threading.Thread(target=make, args=(r,)) for r in ("aaaa0001", "bbbb0002")]
    for t in threads:
        t.start()
        time.sleep(0.05)  # the first is inside its creation when the second picks
    for t in threads:
        t.join(10)
    gateways = {str(net.gateway_ip) for net in made.values()}
    assert len(gateways) == 2, made
    assert sorted(assigned.values()) == ["aaaa0001", "bbbb0002"]
    pool = IPv4Network(netns.DEFAULT_POOL)
    assert str(netns.allocate_addresses(pool, 5)[0]) in gateways


def test_the_service_records_its_addresses_before_the_network_is_made(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(runner, "ADDRESS_LOCK", tmp_path / "addresses.lock")
    monkeypatch.setattr(runner, "_host_addresses", set)
    monkeypatch.setattr(
        netns, "create_sandbox_net", lambda r, g, s: seen.append("made") or fake_net(r, g, s)
    )
    runner.make_sandbox_net("aaaa0001", "10.213.0.0/29", lambda g, s: seen.append((str(g), str(s))))
    assert seen[1] == "made" and seen[0] in {
        ("10.213.0.1", "10.213.0.2"),
        ("10.213.0.5", "10.213.0.6"),
    }


# --- gc beside runs that start --------------------------------------------------------------


def test_gc_leaves_the_cgroup_of_a_run_that_starts_while_it_looks(run_dir, monkeypatch, tmp_path):
    """The run makes its state dir, netns, table and (empty) cgroup between gc's looks.
    Read first, the state dirs did not have it, and its cgroup was taken for an empty
    one of no run (its table too, where no netns showed it)."""
    run_dir.mkdir()
    removed = []
    task_cgroup = tmp_path / "cgroup" / f"{runner.cgroup.PREFIX}1234abcd"
    task_cgroup.mkdir(parents=True)
    (task_cgroup / "cgroup.procs").write_text("")  # the init joins it after

    def cgroups_as_a_run_starts():
        (run_dir / "1234abcd").mkdir()
        (run_dir / "1234abcd" / "pid").write_text(runner.process_stamp.stamp(os.getpid()))
        return [str(task_cgroup)]

    monkeypatch.setattr(nft, "list_tables", lambda prefix: [])
    monkeypatch.setattr(netns, "list_sandbox_nets", lambda: [])
    monkeypatch.setattr(runner.cgroup, "leftovers", cgroups_as_a_run_starts)
    monkeypatch.setattr(runner.cgroup, "remove_path", lambda path: removed.append(path))
    assert runner.gc().removed == [] and removed == []


def test_gc_says_nothing_of_a_run_that_ends_while_it_looks(run_dir, monkeypatch):
    """A run's netns and state dir are listed, then the run ends (both gone, as a run
    removes them) before gc reads who owns the dir: nothing of it is dead, or removed.
    Taken for dead, its netns and dir were "removed" (test_run_storm saw it: ~1 in 15)."""
    run_dir.mkdir()
    (run_dir / "1234abcd").mkdir()
    removed = []
    real_is_dir = type(run_dir).is_dir

    def listed_then_the_run_ends(path) -> bool:
        there = real_is_dir(path)
        if path.parent == run_dir and there:
            path.rmdir()
        return there

    monkeypatch.setattr(nft, "list_tables", lambda prefix: [])
    monkeypatch.setattr(runner.cgroup, "leftovers", lambda: [])
    monkeypatch.setattr(netns, "list_sandbox_nets", lambda: ["1234abcd"])
    monkeypatch.setattr(netns, "destroy_sandbox_net", lambda run_id: removed.append(run_id))
    monkeypatch.setattr(type(run_dir), "is_dir", listed_then_the_run_ends)
    assert runner.gc().removed == [] and removed == []


def test_gc_leaves_another_run_dirs_live_table_and_takes_a_lone_one(run_dir, monkeypatch):
    """`sandgate_<id>` with a netns `sg-<id>` and no state dir here: a run of another
    SANDGATE_RUN_DIR (another engineer's, another service's). Without a netns: a
    leftover."""
    run_dir.mkdir()
    removed = []
    monkeypatch.setattr(nft, "list_tables", lambda p: [f"{p}0000aaaa", f"{p}0000bbbb"])
    monkeypatch.setattr(nft, "delete_table", lambda table: removed.append(table))
    monkeypatch.setattr(netns, "list_sandbox_nets", lambda: ["0000aaaa"])
    monkeypatch.setattr(runner.cgroup, "leftovers", lambda: [])
    assert runner.gc().removed == ["nft table sandgate_0000bbbb"]
    assert removed == ["sandgate_0000bbbb"]


# --- approved.yaml from two processes ------------------------------------------------------


def test_two_gateways_writing_one_approved_yaml_keep_each_others_rule(tmp_path):
    """Two embedded runs on one rule file (two always_writers: each its own process's
    lock): A's reload fails while B appends and reloads; A then puts the file back.
    Without a lock between them, B's rule went with it, though B's request went on."""
    settings = ApprovalSettings(hold=5, expire_pending=60, max_pending_per_sandbox=5)
    overlay = tmp_path / "approved.yaml"

    def key(name, task):
        return AskKey.make(
            task_id=task, sandbox="10.213.0.2", profile="p", name=name, port=443, protocol="tls"
        )

    async def scenario():
        a_reloading = asyncio.Event()

        async def reload_a(actor):
            a_reloading.set()
            await asyncio.sleep(0.3)  # B approves meanwhile
            return ["rules.yaml:3:5: broken for a moment"]

        async def reload_b(actor):
            return []

        gateways = []
        for name, task, reload in (
            ("a.example.test", "t1", reload_a),
            ("b.example.test", "t2", reload_b),
        ):
            approvals = Approvals(lambda event: None, lambda profile: settings)
            approvals.on_always = always_writer(overlay, reload)
            gateways.append((approvals, await approvals.hold(key(name, task), "r", {})))

        async def approve(approvals, held, after=None):
            if after is not None:
                await after.wait()
            request = {"cmd": "approve", "id": held.pending.id, "scope": "always"}
            return await handle(approvals, request, "uid 1")

        (a, held_a), (b, held_b) = gateways
        return await asyncio.gather(approve(a, held_a), approve(b, held_b, a_reloading))

    first, second = asyncio.run(scenario())
    assert not first["ok"] and "did not load" in first["error"], first
    assert second["ok"], second
    approved = yaml.safe_load(overlay.read_text())["approved"]["p"]
    assert [r["allow"] for r in approved] == ["b.example.test"]


def test_gc_leaves_the_empty_cgroup_of_another_run_dirs_run_setting_up(
    run_dir, monkeypatch, tmp_path
):
    """Cgroups are the host's: `sandgate-<id>` with no state dir here, empty (its init
    has not joined yet) and a netns `sg-<id>`: a run of another SANDGATE_RUN_DIR."""
    run_dir.mkdir()
    removed = []
    paths = []
    for run_id in ("0000aaaa", "0000bbbb"):
        paths.append(tmp_path / "cgroup" / f"{runner.cgroup.PREFIX}{run_id}")
        paths[-1].mkdir(parents=True)
        (paths[-1] / "cgroup.procs").write_text("")
    monkeypatch.setattr(nft, "list_tables", lambda prefix: [])
    monkeypatch.setattr(netns, "list_sandbox_nets", lambda: ["0000aaaa"])
    monkeypatch.setattr(runner.cgroup, "leftovers", lambda: [str(p) for p in paths])
    monkeypatch.setattr(runner.cgroup, "remove_path", lambda path: removed.append(path))
    assert runner.gc().removed == [f"cgroup {paths[1]}"] and removed == [str(paths[1])]
