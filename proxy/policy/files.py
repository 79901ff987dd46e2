"""Where the shipped rule files are: package data (sandgate.rules), the same place in a
checkout, an editable install and a wheel. Its own module so that a command that only
needs the default path (`sandgate run --gateway`) does not load the rule compiler."""

from __future__ import annotations

import os
from importlib.util import find_spec
from pathlib import Path

# find_spec, not importlib.resources.files: the same directory for an installed package,
# without importing importlib.resources (~10 ms of a warm attach).
SHIPPED_RULES_DIR = Path(find_spec("sandgate.rules").submodule_search_locations[0]).resolve()
RULES_DIR = Path(os.environ.get("SANDGATE_RULES_DIR", SHIPPED_RULES_DIR))
PRESETS_DIR = RULES_DIR / "presets"
DEFAULT_RULES = RULES_DIR / "default.yaml"
