"""approved.yaml is written as root in the rules' directory, which a deploy user may own:
no link planted there is ever followed (rt45 F6). The temporary file has a random
name and is created new (O_CREAT|O_EXCL|O_NOFOLLOW); approved.yaml itself is never
read through a link."""

from __future__ import annotations

import os
import tempfile

import pytest
from sandgate.proxy.approvals.overlay import append_approved, restore
from sandgate.proxy.approvals.pending import AskKey, PendingStore

PRECIOUS = "precious root-only content\n"


@pytest.fixture
def found():
    store = PendingStore(lambda: 1000.0)
    key = AskKey.make(
        task_id="t1", sandbox="10.213.0.2", profile="p", name="a.test", port=443, protocol="tls"
    )
    pending, _ = store.ask(key, expire_pending=60, max_pending=5)
    return pending


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim"
    path.write_text(PRECIOUS)
    path.chmod(0o600)
    return path


def _plant(rules_dir, name, victim):
    link = rules_dir / name
    os.symlink(victim, link)
    return link


@pytest.mark.parametrize(
    "planted",
    [
        pytest.param([".approved.yaml.tmp"], id="the-old-fixed-name"),
        pytest.param([".approved.yaml.guessed.tmp"], id="the-next-random-name"),
        pytest.param([".approved.yaml.a.tmp", ".approved.yaml.b.tmp"], id="several"),
    ],
)
def test_a_link_planted_in_the_rules_directory_is_never_followed(
    tmp_path, found, victim, monkeypatch, planted
):
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    links = [_plant(rules_dir, name, victim) for name in planted]
    # The names tempfile would try next are the planted ones (as if guessed), then fresh.
    guessed = [name.removeprefix(".approved.yaml.").removesuffix(".tmp") for name in planted]
    names = iter([*guessed, "fresh1", "fresh2", "fresh3"])
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: names)
    overlay = rules_dir / "approved.yaml"
    previous = append_approved(overlay, found, "uid 0 (root)")
    names = iter([*guessed, "fresh4", "fresh5", "fresh6"])
    restore(overlay, "version: 1\n")  # restore writes the same way
    assert victim.read_text() == PRECIOUS
    assert previous is None and overlay.read_text() == "version: 1\n"
    assert not overlay.is_symlink()
    for link in links:
        assert link.is_symlink() and os.readlink(link) == str(victim)
    assert sorted(p.name for p in rules_dir.iterdir()) == sorted(
        ["approved.yaml", *planted]
    )  # no temporary file left


def test_approved_yaml_that_is_a_link_is_refused_not_read(tmp_path, found, victim):
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    victim.write_text("version: 1\nsecret: root's\n")
    overlay = _plant(rules_dir, "approved.yaml", victim)
    with pytest.raises(OSError):
        append_approved(overlay, found, "uid 0 (root)")
    assert victim.read_text() == "version: 1\nsecret: root's\n"
    assert overlay.is_symlink() and sorted(os.listdir(rules_dir)) == ["approved.yaml"]
