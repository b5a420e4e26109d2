"""deployments/jsonl.py: batched, rotation-safe JSON lines (the routing and audit logs)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from deployments.jsonl import JsonlWriter


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_lines_wait_for_the_batch_then_land_together(tmp_path: Path):
    path = tmp_path / "audit" / "a.jsonl"

    async def run() -> tuple[list, list]:
        w = JsonlWriter(path, flush_s=0.2, batch=100)
        for i in range(3):
            w.write({"i": i})
        before = lines(path)
        while w.scheduled:  # the flush the first line scheduled on this loop (no bound on how soon)
            await asyncio.sleep(0.05)
        return before, lines(path)

    before, after = asyncio.run(run())
    assert before == [] and after == [{"i": 0}, {"i": 1}, {"i": 2}]


def test_a_full_batch_is_written_at_once_and_close_writes_the_rest(tmp_path: Path):
    path = tmp_path / "a.jsonl"
    w = JsonlWriter(path, flush_s=60, batch=2)
    w.buffer.append(json.dumps({"i": 0}) + "\n")  # as write() does, without an event loop to schedule on
    w.write({"i": 1})
    assert lines(path) == [{"i": 0}, {"i": 1}]
    w.buffer.append(json.dumps({"i": 2}) + "\n")
    w.close()
    assert lines(path)[-1] == {"i": 2}


def test_without_an_event_loop_or_with_flush_0_each_line_is_written(tmp_path: Path):
    path = tmp_path / "a.jsonl"
    JsonlWriter(path, flush_s=5).write({"x": "é"})
    JsonlWriter(path, flush_s=0).write({"x": 2})  # a restart appends
    assert lines(path) == [{"x": "é"}, {"x": 2}]


def test_rotation_moves_the_file_away_and_the_next_batch_starts_a_new_one(tmp_path: Path):
    path = tmp_path / "a.jsonl"
    w = JsonlWriter(path, flush_s=0)
    w.write({"i": 0})
    os.rename(path, tmp_path / "a.jsonl.1")  # logrotate's move
    w.write({"i": 1})
    assert lines(tmp_path / "a.jsonl.1") == [{"i": 0}] and lines(path) == [{"i": 1}]
    path.unlink()  # deleted
    w.write({"i": 2})
    assert lines(path) == [{"i": 2}]


def test_a_failed_write_is_logged_and_dropped(tmp_path: Path, caplog):
    path = tmp_path / "a.jsonl"
    w = JsonlWriter(path, flush_s=0)
    path.mkdir()  # the path is now a directory: opening it fails
    w.write({"i": 0})
    assert "lost" in caplog.text and w.buffer == []


def test_a_lone_surrogate_does_not_lose_the_batch(tmp_path: Path):
    path = tmp_path / "a.jsonl"
    w = JsonlWriter(path, flush_s=0)
    w.write({"prompt": json.loads('"\\ud800 oops"')})  # valid JSON text, not encodable as UTF-8
    w.write({"i": 1})
    assert lines(path) == [{"prompt": "\ud800 oops"}, {"i": 1}]

