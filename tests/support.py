"""What tests/serve and tests/chaos share: the repository root, free ports, and the one Ray a test
process can hold."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RaySlot:
    """One Ray per process, held by one owner at a time: tests/serve's local Serve or tests/chaos's
    three-node cluster. An owner that finds the other's Ray stops it and starts its own, and the other
    starts again when next asked, so any subset of the suite passes in any order."""

    def __init__(self):
        self.owner: str | None = None
        self.stop: Callable[[], None] | None = None

    def claim(self, owner: str, start: Callable[[], Callable[[], None]]) -> None:
        """Makes `owner`'s Ray the running one; `start` starts it and returns what stops it."""
        if self.owner == owner:
            return
        self.release()
        self.stop = start()
        self.owner = owner

    def release(self) -> None:
        if self.stop is not None:
            stop, self.owner, self.stop = self.stop, None, None
            stop()


RAY = RaySlot()
