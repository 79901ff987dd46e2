"""Which task owns which sandbox address: a sandbox's address is its identity."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Sandbox:
    address: str  # the sandbox's IP on its veth, as the gateway sees it
    task_id: str
    profile: str


class SandboxRegistry:
    """Owned by the gateway's event loop; lookups are one dict access."""

    def __init__(self) -> None:
        self._by_address: dict[str, Sandbox] = {}

    def add(self, sandbox: Sandbox) -> None:
        self._by_address[sandbox.address] = sandbox

    def remove(self, address: str) -> None:
        self._by_address.pop(address, None)

    def get(self, address: str) -> Sandbox | None:
        return self._by_address.get(address)

    def __len__(self) -> int:
        return len(self._by_address)
