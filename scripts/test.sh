#!/usr/bin/env bash
# The whole test suite, unit and end to end, after installing what it needs.
# End-to-end tests need root; with CI set they fail (never skip) when they cannot run.
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh --test || exit 1
.venv/bin/ruff check . || exit 1
.venv/bin/ruff format --check . || exit 1
.venv/bin/python -m pytest -p no:cacheprovider "$@"
rc=$?
# pytest exits 5 when it collected no tests: that is a broken suite, not a pass.
if [[ $rc -eq 5 ]]; then echo "test.sh: pytest ran no tests" >&2; exit 1; fi
exit $rc
