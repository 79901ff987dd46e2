"""Helpers only the tests use: `sandbox` (drive `sandgate run` in the fake
internet's host namespace) and `fakes` (stand-ins for unit tests). Importable as
`support.*` through pytest's `pythonpath = ["tests"]` (pyproject.toml)."""
