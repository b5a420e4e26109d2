"""Serve deployment of the TRM refiner: requests are checked one by one, then refined together in
batches (Serve's @serve.batch), each sample with its own max_steps and halting threshold: a sample
that halts stops changing while the rest of its batch goes on (models/trm.py)."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any

import torch
from ray import serve

from deployments.config import TRMBackend
from deployments.protocol import Failure, as_value
from models import sudoku
from models.engine import InvalidRequest
from models.trm import TRM
from training.defaults import resolve_model


class TRMServer:
    def __init__(self, cfg: TRMBackend):
        self.cfg = cfg
        self.model = TRM.from_pretrained(resolve_model(cfg.model), device=cfg.device)
        self._batched.set_max_batch_size(cfg.max_batch_size)
        self._batched.set_batch_wait_timeout_s(cfg.batch_wait_ms / 1000)
        self.batches = 0

    async def refine(self, payload: dict[str, Any]) -> dict[str, Any] | Failure:
        return await as_value(self._refine(payload))

    async def _refine(self, payload: dict[str, Any]) -> dict[str, Any]:
        max_steps = payload.get("max_steps") or self.cfg.max_steps
        threshold = payload.get("halt_threshold") or self.cfg.halt_threshold
        # checked before batching: a bad request fails alone, never the batch it would have joined
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or not 1 <= max_steps <= self.cfg.max_steps_limit:
            raise InvalidRequest(f"max_steps must be an integer from 1 to this backend's limit of "
                                 f"{self.cfg.max_steps_limit}, not {max_steps!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
            raise InvalidRequest(f"halt_threshold must be in (0, 1], not {threshold!r}")
        puzzle = payload["grid"]
        try:
            sudoku.check_grid(puzzle)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        tokens, steps, confidence = await self._batched((puzzle, max_steps, threshold))
        grid = sudoku.fill_givens(puzzle, sudoku.decode(tokens[None])[0])
        return {"grid": grid, "steps": steps, "confidence": round(confidence, 6),
                "valid": sudoku.is_solution(puzzle, grid), "max_steps": max_steps, "halt_threshold": threshold}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _batched(self, jobs: list[tuple[sudoku.Grid, int, float]]) -> list[tuple[torch.Tensor, int, float]]:
        return await asyncio.to_thread(self._run, jobs)

    def _run(self, jobs: list[tuple[sudoku.Grid, int, float]]) -> list[tuple[torch.Tensor, int, float]]:
        self.batches += 1
        tokens = sudoku.encode([grid for grid, _, _ in jobs]).to(self.cfg.device)
        out = self.model.refine(tokens, torch.tensor([s for _, s, _ in jobs]), torch.tensor([t for _, _, t in jobs]))
        return [(out.tokens[i].cpu(), int(out.steps[i]), float(out.confidence[i])) for i in range(len(jobs))]

    async def info(self) -> dict[str, Any]:
        return {"engine": "torch", "model": self.cfg.model, "device": self.cfg.device, "batches": self.batches,
                "max_batch_size": self.cfg.max_batch_size,
                "parameters": sum(p.numel() for p in self.model.parameters()), "config": asdict(self.model.config)}

    async def check_health(self) -> None:
        if self.model is None:
            raise RuntimeError("model not loaded")
