"""The compiled policy `sandgate run` keeps (enforcer/policy_cache.py): given again only
while everything it was made from is the same, compiled afresh otherwise.

Each test loads once (compiled and kept), changes one thing, and loads again: the
second load must compile (the real compiler is counted) and give the policy of the
files as they are now. The control, nothing changed, gives the kept one without
compiling and without importing PyYAML (a process of its own)."""

from __future__ import annotations

import datetime
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sandgate.proxy.policy
from sandgate.enforcer import policy_cache
from sandgate.proxy.policy import PolicyError

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the state directory is root's")

ALLOW = """version: 1
profiles:
  default:
    rules:
      - allow: example.test
        id: first
"""


class Counted:
    """The real compiler, counted."""

    def __init__(self):
        self.calls = 0
        self.real = sandgate.proxy.policy.load_policy

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.real(*args, **kwargs)


@pytest.fixture
def compiler(monkeypatch) -> Counted:
    counted = Counted()
    monkeypatch.setattr(sandgate.proxy.policy, "load_policy", counted)
    return counted


@pytest.fixture
def cache(tmp_path) -> str:
    directory = tmp_path / "cache"
    directory.mkdir(mode=0o700)
    return str(directory)


def rule_ids(policy) -> list[str]:
    return [r.id for r in policy.profiles["default"].rules]


def load_twice(rules: Path, cache: str, change, compiler: Counted, **second) -> tuple:
    first = policy_cache.load([rules], cache)
    assert compiler.calls == 1
    change()
    again = policy_cache.load([rules], cache, **second)
    return first, again


def test_the_same_files_give_the_kept_policy_without_compiling(tmp_path, cache, compiler):
    rules = tmp_path / "rules.yaml"
    rules.write_text(ALLOW)
    first, again = load_twice(rules, cache, lambda: None, compiler)
    assert compiler.calls == 1
    assert (again.hash, rule_ids(again), again.paths) == (first.hash, ["first"], first.paths)


def test_a_kept_policy_loads_without_the_compiler_or_pyyaml(tmp_path, cache):
    rules = tmp_path / "rules.yaml"
    rules.write_text(ALLOW)
    code = (
        "import sys; from pathlib import Path; from sandgate.enforcer import policy_cache; "
        f"p = policy_cache.load([Path({str(rules)!r})], {cache!r}); "
        "print(p.hash, 'yaml' in sys.modules, 'sandgate.proxy.policy.load' in sys.modules)"
    )
    runs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        for _ in range(2)
    ]
    outs = [r.stdout.split() for r in runs]
    assert [r.returncode for r in runs] == [0, 0], [r.stderr for r in runs]
    assert outs[0][1:] == ["True", "True"]  # compiled
    assert outs[1] == [outs[0][0], "False", "False"]  # kept: the same policy, no compiler


def test_an_edited_file_of_the_same_size_and_mtime_is_compiled_afresh(tmp_path, cache, compiler):
    rules = tmp_path / "rules.yaml"
    rules.write_text(ALLOW)
    before = rules.stat()

    def edit():
        rules.write_text(ALLOW.replace("id: first", "id: other"))
        os.utime(rules, ns=(before.st_atime_ns, before.st_mtime_ns))

    _, again = load_twice(rules, cache, edit, compiler)
    assert compiler.calls == 2
    assert rule_ids(again) == ["other"]


def test_an_edited_include_is_compiled_afresh(tmp_path, cache, compiler):
    rules, part = tmp_path / "rules.yaml", tmp_path / "part.yaml"
    rules.write_text("version: 1\nprofiles:\n  default:\n    include: [part.yaml]\n")
    part.write_text("version: 1\nrules:\n  - allow: a.test\n    id: part-a\n")
    _, again = load_twice(
        rules,
        cache,
        lambda: part.write_text(part.read_text().replace("part-a", "part-b")),
        compiler,
    )
    assert compiler.calls == 2
    assert rule_ids(again) == ["part-b"]


def test_a_symlink_pointed_at_another_file_is_compiled_afresh(tmp_path, cache, compiler):
    """The file it led to is unchanged: only where the name leads differs."""
    rules, a, b = tmp_path / "rules.yaml", tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(ALLOW)
    b.write_text(ALLOW.replace("id: first", "id: from-b"))
    rules.symlink_to(a)

    def repoint():
        rules.unlink()
        rules.symlink_to(b)

    _, again = load_twice(rules, cache, repoint, compiler)
    assert compiler.calls == 2
    assert rule_ids(again) == ["from-b"]


def test_an_approvals_overlay_that_appears_is_compiled_in(tmp_path, cache, compiler):
    """approved.yaml did not exist at the first load: its creation is a change."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(ALLOW)
    overlay = tmp_path / "approved.yaml"
    text = "version: 1\napproved:\n  default:\n    - allow: b.test\n      id: approved-b\n"
    first, again = load_twice(rules, cache, lambda: overlay.write_text(text), compiler)
    assert compiler.calls == 2
    assert first.hash != again.hash
    assert "approved-b" in [r.id for p in again.profiles.values() for r in p.rules]


def test_a_removed_include_is_an_error_not_the_kept_policy(tmp_path, cache, compiler):
    rules, part = tmp_path / "rules.yaml", tmp_path / "part.yaml"
    rules.write_text("version: 1\nprofiles:\n  default:\n    include: [part.yaml]\n")
    part.write_text("version: 1\nrules:\n  - allow: a.test\n")
    policy_cache.load([rules], cache)
    part.unlink()
    with pytest.raises(PolicyError, match="part.yaml"):
        policy_cache.load([rules], cache)


def test_a_rule_expiring_since_is_compiled_afresh(tmp_path, cache, compiler):
    rules = tmp_path / "rules.yaml"
    soon = datetime.datetime.now(datetime.UTC).replace(microsecond=0) + datetime.timedelta(
        minutes=5
    )
    rules.write_text(ALLOW + f"        expires: '{soon.isoformat()}'\n")
    later = soon.timestamp() + 1
    if datetime.date.fromtimestamp(later) != datetime.date.today():
        pytest.skip("the expiry falls on tomorrow: the day's check would decide alone")
    _, again = load_twice(rules, cache, lambda: None, compiler, now=later)
    assert compiler.calls == 2
    assert rule_ids(again) == [] and [r.id for r in again.expired] == ["first"]


def test_the_next_day_is_compiled_afresh(tmp_path, cache, compiler):
    rules = tmp_path / "rules.yaml"
    rules.write_text(ALLOW)
    _, again = load_twice(rules, cache, lambda: None, compiler, now=time.time() + 86400)
    assert compiler.calls == 2
    assert again.loaded_on == datetime.date.today() + datetime.timedelta(days=1)


def test_rules_with_problems_raise_and_are_not_kept(tmp_path, cache, compiler):
    rules = tmp_path / "rules.yaml"
    rules.write_text("version: 1\nprofiles:\n  default:\n    rules:\n      - allow: [\n")
    for _ in range(2):
        with pytest.raises(PolicyError):
            policy_cache.load([rules], cache)
    assert compiler.calls == 2
    assert os.listdir(cache) == []


def test_files_changed_while_compiling_are_not_kept(tmp_path, cache, monkeypatch):
    rules = tmp_path / "rules.yaml"
    rules.write_text(ALLOW)
    real = sandgate.proxy.policy.load_policy

    def edited_meanwhile(*args, **kwargs):
        policy = real(*args, **kwargs)
        rules.write_text(ALLOW.replace("id: first", "id: meanwhile"))
        return policy

    monkeypatch.setattr(sandgate.proxy.policy, "load_policy", edited_meanwhile)
    assert rule_ids(policy_cache.load([rules], cache)) == ["first"]
    assert os.listdir(cache) == []  # its inputs are not the files now: nothing kept
    monkeypatch.setattr(sandgate.proxy.policy, "load_policy", real)
    assert rule_ids(policy_cache.load([rules], cache)) == ["meanwhile"]


@pytest.mark.parametrize("spoil", ["group-writable", "garbage", "another-format", "other-code"])
def test_a_kept_file_that_cannot_be_trusted_or_used_is_compiled_around(
    tmp_path, cache, compiler, spoil
):
    rules = tmp_path / "rules.yaml"
    rules.write_text(ALLOW)
    policy_cache.load([rules], cache)
    (kept,) = Path(cache).iterdir()
    if spoil == "group-writable":
        kept.chmod(0o660)
    elif spoil == "garbage":
        kept.write_bytes(b"\x80\x05not a pickle")
    else:
        _, code, policy = pickle.loads(kept.read_bytes())
        entry = (0, code, policy) if spoil == "another-format" else (1, ("old",), policy)
        kept.write_bytes(pickle.dumps(entry))
    again = policy_cache.load([rules], cache)
    assert compiler.calls == 2
    assert rule_ids(again) == ["first"]


def test_another_working_directory_gets_the_kept_policy_its_files_named_from_there(
    tmp_path, cache, compiler, monkeypatch
):
    """A task usually starts in a directory of its own: the kept policy is given there
    too, with its file names (`files`, relative to the working directory if below it)
    as a compile there names them, the include's too."""
    (tmp_path / "rules").mkdir()
    rules, part = tmp_path / "rules" / "rules.yaml", tmp_path / "rules" / "part.yaml"
    rules.write_text("version: 1\nprofiles:\n  default:\n    include: [part.yaml]\n")
    part.write_text("version: 1\nrules:\n  - allow: a.test\n    id: part-a\n")
    monkeypatch.chdir(tmp_path)
    here = policy_cache.load([rules], cache)
    for elsewhere in ("/", tmp_path / "rules", cache):
        monkeypatch.chdir(elsewhere)
        there = policy_cache.load([rules], cache)
        assert compiler.calls == 1
        assert there.files == compiler.real([rules]).files  # (not counted)
        assert there.hash == here.hash and rule_ids(there) == ["part-a"]
    assert here.files == ("rules/rules.yaml", "rules/part.yaml")
    assert there.files == (str(rules), str(part))


def test_a_relative_rules_path_from_another_directory_is_another_file(
    tmp_path, cache, compiler, monkeypatch
):
    for name, rule_id in (("a", "first"), ("b", "second")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "rules.yaml").write_text(ALLOW.replace("first", rule_id))
    monkeypatch.chdir(tmp_path / "a")
    first = policy_cache.load([Path("rules.yaml")], cache)
    monkeypatch.chdir(tmp_path / "b")
    second = policy_cache.load([Path("rules.yaml")], cache)
    assert compiler.calls == 2
    assert (rule_ids(first), rule_ids(second)) == (["first"], ["second"])
    assert second.files == ("rules.yaml",)


def test_the_oldest_kept_policies_go(tmp_path, cache, compiler, monkeypatch):
    """One entry per set of rule files: a host whose runs each name a file of their
    own does not fill its state directory."""
    monkeypatch.setattr(policy_cache, "KEEP_FILES", 2)
    stamped = set()
    for n in range(4):
        (tmp_path / f"rules{n}.yaml").write_text(ALLOW)
        policy_cache.load([tmp_path / f"rules{n}.yaml"], cache)
        for entry in set(Path(cache).glob("policy-*.pickle")) - stamped:
            os.utime(entry, (1e9 + n, 1e9 + n))  # written in this order, whatever the clock's grain
            stamped.add(entry)
    assert len(list(Path(cache).glob("policy-*.pickle"))) == 2
    policy_cache.load([tmp_path / "rules3.yaml"], cache)
    policy_cache.load([tmp_path / "rules0.yaml"], cache)
    assert compiler.calls == 5  # the newest kept, the oldest compiled again
