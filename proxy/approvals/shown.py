"""What an approver is shown of an approval, pure: the held request (method and
target, query included), how many are held, their body sizes, and what the wider
scopes grant, as text that cannot pass for something else. The CLI, the page, the
webhook and the decision's event all show these same strings (`Pending.to_dict`
carries them as `shown`), so no reader makes its own, shorter view.

A value the task chose is shown:
- with every control, format (bidi overrides and isolates, zero-width characters),
  line/paragraph separator, private-use or unassigned character escaped visibly
  (`\\u202e`, `\\x1b`), so that a right-to-left override cannot make `?q=gpj.exe`
  read as something else and no character hides what follows it;
- cut at `limit` characters with an explicit `... (N more bytes)`, never silently:
  an approver who sees the marker knows there is more (`sandgate approvals show ID`
  prints it whole; the JSON carries it exactly).

(The gateway refuses control and non-ASCII bytes in a request target before anything
is held (proxy/policy/request_head.py), so a held request's target is printable ASCII
and a percent-encoded `%E2%80%AE` is shown as such; the escaping is the second line.)
"""

from __future__ import annotations

import unicodedata

# Characters of the task's text a record shows before cutting (the page's and list's
# view; `show` passes a larger limit).
SHOWN_CHARS = 300
# What `show` prints whole: a request head is at most 64 KiB.
WHOLE_CHARS = 1 << 17
# The held body of a request is refused past this many bytes (proxy/addon.py).
HELD_BODY_LIMIT = 1 << 20

_HIDING = frozenset({"Cc", "Cf", "Zl", "Zp", "Co", "Cs", "Cn"})


def _escape(char: str) -> str:
    if unicodedata.category(char) not in _HIDING:
        return char
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def visible(text: str, limit: int = SHOWN_CHARS) -> str:
    """`text` with each hiding character escaped, cut after `limit` shown characters
    with `... (N more bytes)` (N: the UTF-8 bytes of what was cut)."""
    out: list[str] = []
    used = 0
    for i, char in enumerate(text):
        shown = _escape(char)
        if used + len(shown) > limit:
            rest = len(text[i:].encode("utf-8", "surrogatepass"))
            return "".join(out) + f"... ({rest} more bytes)"
        out.append(shown)
        used += len(shown)
    return "".join(out)


def body_sizes(bodies: list, with_body: int) -> str | None:
    """The held requests' bodies in words (`bodies`: the first sizes listed,
    `with_body`: how many held requests have one); None: none has a body."""
    if not bodies:
        return None
    words = [
        f"{size} bytes"
        if size is not None
        else f"size not declared (up to {HELD_BODY_LIMIT} bytes)"
        for size in bodies
    ]
    if with_body > len(bodies):
        words.append(f"and {with_body - len(bodies)} more with a body")
    return "; ".join(words)


def shown_fields(record: dict, limit: int = SHOWN_CHARS) -> dict:
    """The `shown` of an approval record (`Pending.to_dict` without it): `request`
    (`METHOD name:port (protocol)/path?query`, visible and cut), `held` (how many wait
    on it, in words), `bodies` (None: none has a body), `once` and `wider` (what
    approving once, and for the task / a duration / always, lets through)."""
    where = f"{record['name']}:{record['port']} ({record['protocol']})"
    request = record.get("request")
    method = record.get("method")
    if request is not None:
        verb, _, target = request.partition(" ")
        what = f"{verb} {where}{target}"
    elif method:
        what = f"{method} {where}{record.get('path') or ''}"
    else:
        what = where
    held = int(record.get("held") or 0)
    unit = "request" if request is not None else "connection"
    if method:
        wider = f"{method} {where}{record.get('path') or ''} with any query"
    elif request is not None:
        wider = f"any request to {where}"
    else:
        wider = f"any connection to {where}"
    return {
        "request": visible(what, limit),
        "held": f"{held} {unit}{'' if held == 1 else 's'} held",
        "bodies": body_sizes(list(record.get("bodies") or []), int(record.get("with_body") or 0)),
        "once": (
            f"only the {unit}s held now, each exactly as shown"
            if held
            else f"the next {unit} exactly as shown"
        ),
        "wider": visible(wider, limit),
    }
