"""PLACEHOLDER until the cgroup module lands (same API)."""
from dataclasses import dataclass


class CgroupError(Exception):
    pass


@dataclass(frozen=True)
class Limits:
    memory_bytes: int | None = 4 << 30
    pids: int | None = 1024
    cpus: float | None = None


@dataclass(frozen=True)
class LimitHit:
    limit: str
    count: int
    detail: str


def check(limits):
    return ["placeholder"]


def parse_size(text):
    return int(text)


def parse_cpus(text):
    return float(text)


class TaskCgroup:
    procs_files: list = []

    @classmethod
    def create(cls, name, limits):
        raise CgroupError("placeholder")

    def limits_hit(self):
        return []

    def remove(self):
        pass
