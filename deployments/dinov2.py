"""Serve deployment of the DINOv2 image classifier."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ray.serve import metrics

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
        self.m_latency = metrics.Histogram("switchyard_classifier_seconds", description="Decode and classify one image.",
                                           boundaries=[0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0])

    async def classify(self, data: bytes) -> dict[str, Any] | Failure:
        start = time.perf_counter()
        result = await as_value(asyncio.to_thread(self._classify, data))
        if not isinstance(result, Failure):
            self.m_latency.observe(time.perf_counter() - start)
        return result

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
