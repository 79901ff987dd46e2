"""The shipped rule files: default.yaml, presets/ and examples/ (package data).

Read them through `importlib.resources` (see sandgate.proxy.policy.load), never by a
path relative to the source tree: installed, this folder is `sandgate/rules`.
"""
