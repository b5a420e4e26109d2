"""Serve deployment of the TRM refiner: requests are checked one by one, then refined together in
batches (Serve's @serve.batch, one batcher per task model), each sample with its own max_steps and
halting threshold: a sample that halts stops changing while the rest of its batch goes on
(models/trm.py). Tasks: sudoku grids, and code_repair on the 64x48 code grid (models/code_grid.py)."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any

import torch
from ray import serve
from ray.serve import metrics

from deployments.config import TRMBackend
from deployments.protocol import Failure, as_value
from models import code_grid, sudoku
from models.engine import InvalidRequest, Unsupported
from models.trm import TRM
from models.checkpoints import resolve_model

Job = tuple[torch.Tensor, int, float]  # input tokens, max_steps, halt_threshold


class TRMServer:
    def __init__(self, cfg: TRMBackend):
        self.cfg = cfg
        self.models = {"sudoku": TRM.from_pretrained(resolve_model(cfg.model), device=cfg.device)}
        if cfg.code_repair_model is not None:
            self.models["code_repair"] = TRM.from_pretrained(resolve_model(cfg.code_repair_model), device=cfg.device)
        for batched in (self._sudoku, self._code):
            batched.set_max_batch_size(cfg.max_batch_size)
            batched.set_batch_wait_timeout_s(cfg.batch_wait_ms / 1000)
        self.batches = 0
        self.m_steps = metrics.Histogram("switchyard_trm_steps", tag_keys=("task",), boundaries=[1, 2, 4, 8, 16, 32, 64],
                                         description="Supervision steps a refined sample ran.")
        self.m_batch = metrics.Histogram("switchyard_trm_batch_size", tag_keys=("task",),
                                         boundaries=[1, 2, 4, 8, 16, 32], description="Samples refined together.")

    async def refine(self, payload: dict[str, Any]) -> dict[str, Any] | Failure:
        return await as_value(self._refine(payload))

    async def _refine(self, payload: dict[str, Any]) -> dict[str, Any]:
        task = payload.get("task", "sudoku")
        if task not in self.models:
            raise Unsupported(f"this trm has no {task} model (code_repair_model in its config)")
        model = self.models[task]
        # checked before batching: a bad request fails alone, never the batch it would have joined
        max_steps = payload.get("max_steps") or self.cfg.max_steps or model.config.max_steps
        threshold = payload.get("halt_threshold") or self.cfg.halt_threshold or model.config.halt_threshold
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or not 1 <= max_steps <= self.cfg.max_steps_limit:
            raise InvalidRequest(f"max_steps must be an integer from 1 to this backend's limit of "
                                 f"{self.cfg.max_steps_limit}, not {max_steps!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
            raise InvalidRequest(f"halt_threshold must be in (0, 1], not {threshold!r}")
        limits = {"max_steps": max_steps, "halt_threshold": threshold}
        if task == "sudoku":
            puzzle = payload["grid"]
            try:
                tokens = sudoku.encode([puzzle])[0]
            except ValueError as exc:
                raise InvalidRequest(str(exc)) from None
            answer, steps, confidence = await self._sudoku((tokens, max_steps, threshold))
            grid = sudoku.fill_givens(puzzle, sudoku.decode(answer[None])[0])
            return {"grid": grid, "valid": sudoku.is_solution(puzzle, grid), "steps": steps,
                    "confidence": round(confidence, 6), **limits}
        code = payload["code"]
        if not isinstance(code, str) or not code.strip():
            raise InvalidRequest("code must be a non-empty string")
        try:
            grid = await asyncio.to_thread(code_grid.encode, code)
        except code_grid.DoesNotFit as exc:
            raise Unsupported(f"the code does not fit trm's grid: {exc}") from None
        answer, steps, confidence = await self._code((grid.tokens, max_steps, threshold))
        repaired = code_grid.decode(answer, grid)
        return {"code": repaired, "valid": code_grid.is_valid(repaired), "steps": steps,
                "confidence": round(confidence, 6), **limits}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _sudoku(self, jobs: list[Job]) -> list[Job]:
        return await self._measured("sudoku", jobs)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _code(self, jobs: list[Job]) -> list[Job]:
        return await self._measured("code_repair", jobs)

    async def _measured(self, task: str, jobs: list[Job]) -> list[Job]:
        results = await asyncio.to_thread(self._run, task, jobs)
        self.m_batch.observe(len(jobs), tags={"task": task})
        for _, steps, _ in results:
            self.m_steps.observe(steps, tags={"task": task})
        return results

    def _run(self, task: str, jobs: list[Job]) -> list[Job]:
        self.batches += 1
        tokens = torch.stack([t for t, _, _ in jobs]).to(self.cfg.device)
        out = self.models[task].refine(tokens, torch.tensor([s for _, s, _ in jobs]),
                                       torch.tensor([t for _, _, t in jobs], dtype=torch.float64))
        return [(out.tokens[i].cpu(), int(out.steps[i]), float(out.confidence[i])) for i in range(len(jobs))]

    async def info(self) -> dict[str, Any]:
        return {"engine": "torch", "model": self.cfg.model, "code_repair_model": self.cfg.code_repair_model,
                "device": self.cfg.device, "batches": self.batches, "max_batch_size": self.cfg.max_batch_size,
                "tasks": {task: {"parameters": m.num_parameters(), "config": asdict(m.config)}
                          for task, m in self.models.items()}}

    async def check_health(self) -> None:
        if not self.models:
            raise RuntimeError("model not loaded")
