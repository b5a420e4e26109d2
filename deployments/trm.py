"""Serve deployment of the TRM refiner."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Any

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

    async def refine(self, payload: dict[str, Any]) -> dict[str, Any] | Failure:
        return await as_value(asyncio.to_thread(self._refine, payload))

    def _refine(self, payload: dict[str, Any]) -> dict[str, Any]:
        max_steps = payload.get("max_steps") or self.cfg.max_steps
        threshold = payload.get("halt_threshold") or self.cfg.halt_threshold
        if max_steps > self.cfg.max_steps_limit:
            raise InvalidRequest(f"max_steps {max_steps} is above this backend's limit of {self.cfg.max_steps_limit}")
        puzzle = payload["grid"]
        try:
            sudoku.check_grid(puzzle)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        out = self.model.refine(sudoku.encode([puzzle]).to(self.cfg.device), max_steps, threshold)
        grid = sudoku.fill_givens(puzzle, sudoku.decode(out.tokens)[0])
        return {"grid": grid, "steps": int(out.steps[0]), "confidence": round(float(out.confidence[0]), 6),
                "valid": sudoku.is_solution(puzzle, grid), "max_steps": max_steps, "halt_threshold": threshold}

    async def info(self) -> dict[str, Any]:
        return {"engine": "torch", "model": self.cfg.model, "device": self.cfg.device,
                "parameters": sum(p.numel() for p in self.model.parameters()), "config": asdict(self.model.config)}

    async def check_health(self) -> None:
        if self.model is None:
            raise RuntimeError("model not loaded")
