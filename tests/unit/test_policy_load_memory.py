"""A reload gives back the policy it replaced and holds on to nothing else.

`load_policy` freezes what is alive at its end (gc.freeze: never collected, so the
collector does not rescan a big policy); a reference cycle alive then stays for good.
The loader's recursive closure was one (each load kept its loader and YAML nodes,
~200 objects), and so was any garbage cycle the process held at that moment: a
gateway that reloads for months grew by both each time (bench/soak_service.py)."""

from __future__ import annotations

import contextlib
import gc
import weakref

from sandgate.proxy.policy import PolicyError, load_policy

RULES = """\
version: 1
profiles:
  base:
    rules:
      - allow: example.com
  default:
    extends: base
    rules:
      - allow: "*.example.org"
        methods: [GET]
"""


def test_loads_in_a_row_freeze_nothing_more(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    policy = load_policy([rules])
    frozen = gc.get_freeze_count()
    for _ in range(20):
        policy = load_policy([rules])
    assert policy.profiles["default"].rules
    assert gc.get_freeze_count() <= frozen + 5


def test_a_broken_file_between_loads_freezes_nothing_more(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    load_policy([rules])
    frozen = gc.get_freeze_count()
    for i in range(10):
        rules.write_text(RULES + ("      - allow: '*'\n" if i % 2 else ""))
        with contextlib.suppress(PolicyError):
            load_policy([rules])
    assert gc.get_freeze_count() <= frozen + 5


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_garbage_alive_at_a_load_is_still_collected(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    garbage = _Cycle()
    gone = weakref.ref(garbage)
    del garbage  # a cycle: only the cyclic collector frees it
    load_policy([rules])
    gc.collect()
    assert gone() is None
