"""Serve deployment of the DINOv2 image classifier."""

from __future__ import annotations

import asyncio
from typing import Any

from deployments.config import ClassifierBackend
from deployments.protocol import Failure, as_value
from models.classifier import ImageClassifier, decode_image
from models.engine import InvalidRequest
from training.defaults import resolve_model


class ClassifierServer:
    def __init__(self, cfg: ClassifierBackend):
        self.cfg = cfg
        self.model = ImageClassifier.from_pretrained(resolve_model(cfg.model), device=cfg.device,
                                                     backbone=cfg.backbone)

    async def classify(self, data: bytes) -> dict[str, Any] | Failure:
        return await as_value(asyncio.to_thread(self._classify, data))

    def _classify(self, data: bytes) -> dict[str, Any]:
        try:
            image = decode_image(data, self.cfg.max_image_bytes, self.cfg.max_pixels)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        prediction = self.model.classify([image])[0]
        return {"label": prediction.label, "probabilities": prediction.probabilities}

    async def info(self) -> dict[str, Any]:
        return {"engine": "torch", **self.model.info()}

    async def check_health(self) -> None:
        if self.model is None:
            raise RuntimeError("model not loaded")
