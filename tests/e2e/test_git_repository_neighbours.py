"""A deny of one repository's clone URL (`/git/org/chart.git/**`) refuses that
repository, with or without `.git`, and not a repository whose name starts with the
denied one's stem: `git clone .../org/chart.js.git` works.

A deny glob's last segment is also read by its stem, without its extensions, because
git http-backend (and MultiViews, Rails formats) serve `chart.git` as `chart`. When the
stem took the deny's suffix tail (`chart` then `.anything`), it also took
`chart.js.git`, an unrelated repository (`chart.js`, `socket.io`, `highlight.js` are
real repository names next to `chart`, `socket`, `highlight`). A stem now takes only
what is below it, or itself with known extensions. Found by a red team (session 52).

Not tested here, a documented price (docs/rules.md): a deny of `my-repo.git` also
takes `my_repo.git` and `my.repo.git`, since a deny glob's ASCII punctuation stands
for any.

Controls: `chart.git` and `chart` are refused (403), an unrelated repository is
cloned. Server: Debian's git http-backend behind Apache, the harness of
tests/e2e/test_git_repository_stems.py; real git in the sandbox; both gateway paths.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import test_git_repository_stems as stems

pytestmark = pytest.mark.e2e

BASE = stems.BASE
REPOS = ("public", "chart", "chart.js", "notes", "notes.json")


def _repos(repos: Path, top: Path) -> None:
    for at, name in enumerate(REPOS):
        stems._bare_repo(repos / f"{name}.git", f"content of {name}", top / f"w{at}")


def run(net, tmp_path, steps, denied, profile):
    return stems.run(net, tmp_path, steps, denied, profile, populate=_repos)


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_a_repository_whose_name_starts_with_a_denied_stem_is_cloned(net, tmp_path, profile):
    steps = {
        "public": stems.clone(f"{BASE}/org/public.git", "p"),
        "control": stems.clone(f"{BASE}/org/chart.git", "c"),
        "control_stem": stems.clone(f"{BASE}/org/chart", "s"),
        "chart_js": stems.clone(f"{BASE}/org/chart.js.git", "j"),
    }
    result, log = run(net, tmp_path, steps, "/git/org/chart.git/**", profile)
    why = f"{result.describe()}\napache:\n{log}"
    assert "content of public" in result["public"].out, why
    for control in ("control", "control_stem"):
        assert "content of chart\n" not in result[control].out, why
        assert "403" in result[control].err, why
    assert "content of chart.js" in result["chart_js"].out, why


@pytest.mark.parametrize("profile", ["door", "engine"])
def test_a_repository_whose_name_holds_an_extension_is_denied_by_it_and_not_its_stem(
    net, tmp_path, profile
):
    """`notes.json.git` is the repository `notes.json`: http-backend serves it as
    `/org/notes.json` too (enter_repo tries `<path>.git`), and `/org/notes` is another
    repository. A stem that dropped every known extension denied `notes` and let
    `notes.json` through (a red team, session 52)."""
    steps = {
        "control": stems.clone(f"{BASE}/org/notes.json.git", "c"),
        "without_dot_git": stems.clone(f"{BASE}/org/notes.json", "w"),
        "notes": stems.clone(f"{BASE}/org/notes.git", "n"),
    }
    result, log = run(net, tmp_path, steps, "/git/org/notes.json.git/**", profile)
    why = f"{result.describe()}\napache:\n{log}"
    for control in ("control", "without_dot_git"):
        assert "content of notes.json" not in result[control].out, why
        assert "403" in result[control].err, why
    assert "content of notes\n" in result["notes"].out, why
