"""Append-only JSON-lines files for the routing log and the audit log.

Lines are buffered and written in batches: `flush_s` after the first line of a batch (on the
event loop that wrote it), or at `batch` lines, or at close; 0 writes every line at once. Each
batch ends with flush and (unless `fsync=False`) fsync, so a crash loses at most `flush_s` of lines. Before each batch
the file is checked: when it was rotated away (moved or deleted, as logrotate does) a new one is
opened at the path, so no line goes to a file nobody reads. A restart appends to what is there.
A write that fails (a full disk) is logged and dropped: it must not fail the request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class JsonlWriter:
    def __init__(self, path: str | Path, flush_s: float = 1.0, batch: int = 256, fsync: bool = True):
        self.path, self.flush_s, self.batch, self.fsync = Path(path), flush_s, batch, fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = None
        self.buffer: list[str] = []
        self.scheduled = False

    def write(self, record: dict[str, Any]) -> None:
        try:  # ASCII: a lone surrogate in a prompt cannot make the batch unwritable
            self.buffer.append(json.dumps(record, ensure_ascii=True, default=str) + "\n")
        except ValueError as exc:
            logger.warning("%s: a record could not be written as JSON: %s", self.path, exc)
            return
        if self.flush_s <= 0 or len(self.buffer) >= self.batch:
            self.flush()
        elif not self.scheduled:
            try:
                asyncio.get_running_loop().call_later(self.flush_s, self.flush)
                self.scheduled = True
            except RuntimeError:  # no event loop here: write now
                self.flush()

    def flush(self) -> None:
        self.scheduled = False
        if not self.buffer:
            return
        lines, self.buffer = "".join(self.buffer), []
        try:
            self._open()
            self.file.write(lines)
            self.file.flush()
            if self.fsync:
                os.fsync(self.file.fileno())
        except (OSError, ValueError) as exc:
            logger.warning("%s: %d bytes of JSON lines lost: %s", self.path, len(lines), exc)

    def _open(self) -> None:
        if self.file is not None:
            try:
                same = os.stat(self.path).st_ino == os.fstat(self.file.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return
            self.file.close()  # rotated away: start the file again at the path
        self.file = self.path.open("a", encoding="utf-8")

    def close(self) -> None:
        self.flush()
        if self.file is not None:
            self.file.close()
            self.file = None
