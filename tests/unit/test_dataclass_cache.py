"""The compiled dataclass methods kept for the embedded start (enforcer/dataclass_cache.py):
classes made through it are the classes `dataclasses` makes; the file is trusted only
when private, and one that is planted, broken or stale is compiled around."""

from __future__ import annotations

import dataclasses
import marshal
import os
import sys
import textwrap
import types
from pathlib import Path

import pytest
from sandgate.enforcer import dataclass_cache

# Every kind of method dataclasses writes: __init__ with defaults, factories,
# InitVar, kw_only and __post_init__; __repr__, __eq__, order, frozen's
# __setattr__/__delattr__, __hash__, slots.
SHAPES = textwrap.dedent(
    """
    from __future__ import annotations
    import dataclasses
    from dataclasses import InitVar, dataclass, field

    @dataclass
    class Plain:
        a: int
        b: str = "b"
        c: list = field(default_factory=list)

    @dataclass(frozen=True, order=True)
    class Frozen:
        x: int
        y: tuple = ()

    @dataclass(slots=True, kw_only=True)
    class Slotted:
        name: str
        size: int = 0

    @dataclass
    class Derived:
        base: int
        scale: InitVar[int] = 2
        total: int = field(init=False, default=0)

        def __post_init__(self, scale):
            self.total = self.base * scale

    @dataclass(eq=True, unsafe_hash=True)
    class Hashed:
        k: str
    """
)


def make_shapes() -> dict:
    """SHAPES made afresh, as a module (string annotations are looked up in it)."""
    module = types.ModuleType("shapes_under_test")
    sys.modules[module.__name__] = module
    try:
        exec(compile(SHAPES, "shapes_under_test.py", "exec"), vars(module))  # noqa: S102 - the test's own source
    finally:
        del sys.modules[module.__name__]
    return vars(module)


def use(shapes: dict) -> list:
    """What the classes do, as comparable values."""
    plain = shapes["Plain"](1)
    frozen = shapes["Frozen"](1, (2,))
    slotted = shapes["Slotted"](name="n")
    derived = shapes["Derived"](3, 5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        frozen.x = 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        del frozen.x
    with pytest.raises(TypeError):
        shapes["Slotted"]("positional")
    return [
        repr(plain),
        plain == shapes["Plain"](1, "b", []),
        plain == shapes["Plain"](2),
        repr(frozen),
        frozen < shapes["Frozen"](2),
        hash(frozen) == hash(shapes["Frozen"](1, (2,))),
        repr(slotted),
        hasattr(slotted, "__dict__"),
        (derived.base, derived.total),
        hash(shapes["Hashed"]("k")) == hash(shapes["Hashed"]("k")),
        [f.name for f in dataclasses.fields(shapes["Derived"])],
        shapes["Plain"].__init__.__globals__ is shapes,
        shapes["Plain"].__init__.__annotations__,
        shapes["Plain"].__init__.__code__.co_filename,
    ]


@pytest.fixture
def cache_dir(tmp_path: Path):
    directory = tmp_path / "cache"
    directory.mkdir(mode=0o700)
    yield directory
    dataclass_cache.finish()
    assert "exec" not in vars(dataclasses)


def test_classes_made_through_the_cache_are_the_same(cache_dir: Path) -> None:
    expected = use(make_shapes())
    dataclass_cache.start(str(cache_dir))
    assert "exec" in vars(dataclasses)
    first = use(make_shapes())  # compiled, then written
    compiled, _ = dataclass_cache._active
    assert compiled.missed > 0
    dataclass_cache.finish()
    assert "exec" not in vars(dataclasses)
    path = Path(dataclass_cache.cache_path(str(cache_dir)))
    assert path.exists() and (path.stat().st_mode & 0o777) == 0o600

    dataclass_cache.start(str(cache_dir))
    second = use(make_shapes())  # every method from the file
    compiled, _ = dataclass_cache._active
    assert compiled.missed == 0 and len(compiled.used) >= 10
    assert first == second == expected


def test_a_start_that_missed_nothing_writes_nothing(cache_dir: Path) -> None:
    dataclass_cache.start(str(cache_dir))
    make_shapes()
    dataclass_cache.finish()
    path = Path(dataclass_cache.cache_path(str(cache_dir)))
    os.utime(path, (1, 1))
    dataclass_cache.start(str(cache_dir))
    make_shapes()
    dataclass_cache.finish()
    assert path.stat().st_mtime == 1


def test_entries_of_other_starts_are_kept_up_to_the_bound(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = Path(dataclass_cache.cache_path(str(cache_dir)))
    other = {"def other(): pass": compile("def other(): pass", "<string>", "exec")}
    path.write_bytes(marshal.dumps(other))
    path.chmod(0o600)
    dataclass_cache.start(str(cache_dir))
    make_shapes()
    dataclass_cache.finish()
    assert "def other(): pass" in marshal.loads(path.read_bytes())

    monkeypatch.setattr(dataclass_cache, "MAX_ENTRIES", 3)
    dataclass_cache.start(str(cache_dir))
    dataclasses.make_dataclass("Fresh", [("q", int)])  # a miss: written again, this start's only
    dataclass_cache.finish()
    kept = marshal.loads(path.read_bytes())
    assert "def other(): pass" not in kept and any("q" in text for text in kept)


def planted(cache_dir: Path, marker: Path) -> Path:
    """A cache file whose code for the shapes' every method writes `marker` instead."""
    dataclass_cache.start(str(cache_dir))
    make_shapes()
    texts = list(dataclass_cache._active[0].used)
    dataclass_cache.finish()
    evil = compile(f"open({str(marker)!r}, 'w').close()", "<string>", "exec")
    path = Path(dataclass_cache.cache_path(str(cache_dir)))
    path.write_bytes(marshal.dumps(dict.fromkeys(texts, evil)))
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("where", ["file", "directory"])
def test_a_cache_others_can_write_is_not_used(cache_dir: Path, tmp_path: Path, where: str) -> None:
    marker = tmp_path / "planted-code-ran"
    path = planted(cache_dir, marker)
    (path if where == "file" else cache_dir).chmod(0o666 if where == "file" else 0o777)
    expected = use(make_shapes())
    dataclass_cache.start(str(cache_dir))
    assert use(make_shapes()) == expected
    dataclass_cache.finish()
    assert not marker.exists()


def test_a_private_cache_is_what_runs(cache_dir: Path, tmp_path: Path) -> None:
    """The converse of the test above: it would pass if the file were never read."""
    marker = tmp_path / "planted-code-ran"
    planted(cache_dir, marker)
    dataclass_cache.start(str(cache_dir))
    with pytest.raises(Exception):  # noqa: B017, PT011 - the planted "methods" are no functions
        make_shapes()
    dataclass_cache.finish()
    assert marker.exists()


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xff\x00garbage", id="not-marshal"),
        pytest.param(marshal.dumps([1, 2, 3]), id="not-a-dict"),
        pytest.param(marshal.dumps({"def f(): pass": "not code", 3: b"x"}), id="wrong-types"),
    ],
)
def test_a_broken_cache_is_compiled_around(cache_dir: Path, content: bytes) -> None:
    path = Path(dataclass_cache.cache_path(str(cache_dir)))
    path.write_bytes(content)
    path.chmod(0o600)
    expected = use(make_shapes())
    dataclass_cache.start(str(cache_dir))
    assert use(make_shapes()) == expected
    dataclass_cache.finish()
    assert isinstance(marshal.loads(path.read_bytes()), dict)  # and written whole again


def test_the_file_name_carries_the_interpreter(cache_dir: Path, monkeypatch) -> None:
    here = dataclass_cache.cache_path(str(cache_dir))
    monkeypatch.setattr(sys, "hexversion", sys.hexversion + 1)
    assert dataclass_cache.cache_path(str(cache_dir)) != here


def test_not_root_changes_nothing(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    dataclass_cache.start(str(cache_dir))
    assert "exec" not in vars(dataclasses)
    make_shapes()
    dataclass_cache.finish()
    assert list(cache_dir.iterdir()) == []
