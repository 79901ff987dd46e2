"""What every `sandgate` command shares: exit codes, the two kinds of error the
CLI prints as one line, and loading a rule file for a command."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from sandgate.proxy.policy import CompiledPolicy, PolicyError, load_policy

EXIT_OK, EXIT_DENIED, EXIT_USAGE = 0, 1, 2
EXIT_SETUP = (
    125  # as enforcer/run.py: the sandbox or gateway could not be set up (as env(1), docker run)
)


class UsageError(Exception):
    """Bad input from the person at the terminal: `sandgate: ...`, exit 2."""


class SetupError(Exception):
    """An expected failure of the machine, not of the input (not root, `nft`
    missing, a namespace that cannot be made): `sandgate: ...`, exit 125."""


@contextlib.contextmanager
def setup_errors() -> Iterator[None]:
    """Turn the enforcer's expected failures into a SetupError. Imported here, not
    at the top: the enforcer's modules load pyroute2 and the gateway."""
    from sandgate.enforcer.netns import SandboxNetError
    from sandgate.enforcer.nft import NftError
    from sandgate.enforcer.run import RunError

    try:
        yield
    except (RunError, SandboxNetError, NftError) as e:
        raise SetupError(str(e)) from None


def load_rules(path: str | Path, consequence: str) -> CompiledPolicy:
    """The policy in `path`, or a UsageError that lists the problems after
    `invalid rules, <consequence>`."""
    try:
        return load_policy([Path(path)])
    except PolicyError as e:
        raise UsageError(f"invalid rules, {consequence}:\n{e}") from None
