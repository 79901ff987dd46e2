"""The table of ASCII readings (proxy/policy/ascii_folds.py) is `fold_of` over every
code point, and a path's characters are looked up in it, never computed: a task's
64 KiB path of them cost the gateway's loop a quarter of a second when they were."""

from __future__ import annotations

import unicodedata

import pytest
from sandgate.proxy.policy import ascii_folds
from sandgate.proxy.policy.names import path_readings
from sandgate.proxy.policy.request_head import path_problem


def test_the_table_is_fold_of_every_code_point():
    if unicodedata.unidata_version != "14.0.0":
        pytest.skip(f"the table is Unicode 14.0's; this Python has {unicodedata.unidata_version}")
    chars, folds = ascii_folds.table()
    assert (chars, folds) == (ascii_folds._CHARS, ascii_folds._FOLDS), (
        "python -m sandgate.proxy.policy.ascii_folds prints the table again"
    )


@pytest.mark.parametrize(
    ("char", "fold"),
    [
        ("\u0131", "i"),  # dotless i: Python's re.IGNORECASE, Java
        ("\u0130", "i"),  # capital I with a dot: lower-cased, i and a combining dot
        ("\u212a", "k"),  # the Kelvin sign: JavaScript's toLowerCase
        ("\u017f", "s"),  # long s
        ("\uff41", "a"),  # fullwidth a (NFKC)
        ("\ufb01", "fi"),  # a ligature
        ("\uff0f", "/"),  # fullwidth solidus: a separator, refused
        ("\u2025", ".."),  # two-dot leader: dotted, refused where it makes a dot segment
        ("\u0664", "4"),  # Arabic-Indic four: int() and Long.parseLong read it so
        ("\U0001d6a4", "i"),  # mathematical dotless i: NFKC, then upper case
    ],
)
def test_a_character_read_as_ascii(char, fold):
    assert ascii_folds.FOLDS[char] == fold == ascii_folds.fold_of(char)
    assert (char in ascii_folds.STRUCTURAL) == (not ascii_folds.SEPARATORS.isdisjoint(fold))
    assert (char in ascii_folds.DOTTED) == ("." in fold)


@pytest.mark.parametrize("char", ["\u00e9", "\u0430", "\u6587", "\U0001f600"])
def test_a_character_with_no_ascii_reading(char):
    assert char not in ascii_folds.FOLDS and ascii_folds.fold_of(char) is None


@pytest.mark.parametrize("start", [0x4E00, 0xFF21, 0x1D400], ids=["cjk", "fullwidth", "math"])
def test_a_long_path_of_characters_is_looked_up_not_computed(monkeypatch, start):
    def computed(char):
        raise AssertionError(f"fold_of({char!r}) called on a request's path")

    monkeypatch.setattr(ascii_folds, "fold_of", computed)
    count = 60_000 // (3 * len(chr(start).encode()))  # escaped, within a 64 KiB head
    text = "".join(chr(start + n % 26) for n in range(count))
    path = "/" + "".join(f"%{b:02X}" for b in text.encode())
    assert path_problem(path) is None
    assert path_readings(path).denied
