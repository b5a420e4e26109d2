"""Serve deployment of the DINOv2 image classifier: each image is checked and decoded alone, then
embedded and classified together with the others that arrived with it (Serve's @serve.batch)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from PIL import Image
from ray import serve
from ray.serve import metrics

from deployments.config import ClassifierBackend
from deployments.protocol import Failure, as_value
from models.classifier import ImageClassifier, Prediction, decode_image
from models.engine import InvalidRequest
from models.checkpoints import resolve_model


class ClassifierServer:
    def __init__(self, cfg: ClassifierBackend):
        self.cfg = cfg
        self.model = ImageClassifier.from_pretrained(resolve_model(cfg.model), device=cfg.device,
                                                     backbone=cfg.backbone)
        fitted = self.model.head_config.pooling
        if cfg.pooling is not None and cfg.pooling != fitted:
            raise ValueError(f"backend {cfg.name}: pooling {cfg.pooling!r} is set but the head in {cfg.model} was "
                             f"fitted on {fitted!r} embeddings; train a head for {cfg.pooling!r} (training.classifier "
                             f"--pooling {cfg.pooling}) or drop the setting")
        self._batched.set_max_batch_size(cfg.max_batch_size)
        self._batched.set_batch_wait_timeout_s(cfg.batch_wait_ms / 1000)
        self.batches = 0
        self.m_latency = metrics.Histogram("switchyard_classifier_seconds", description="Decode and classify one image.",
                                           boundaries=[0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0])
        self.m_batch = metrics.Histogram("switchyard_classifier_batch_size", boundaries=[1, 2, 4, 8, 16, 32],
                                         description="Images embedded together.")

    async def classify(self, data: bytes) -> dict[str, Any] | Failure:
        start = time.perf_counter()
        result = await as_value(self._classify(data))
        if not isinstance(result, Failure):
            self.m_latency.observe(time.perf_counter() - start)
        return result

    async def _classify(self, data: bytes) -> dict[str, Any]:
        try:  # decoded before batching: a bad image fails alone, never the batch it would have joined
            image = await asyncio.to_thread(decode_image, data, self.cfg.max_image_bytes, self.cfg.max_pixels)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        prediction = await self._batched(image)
        return {"label": prediction.label, "confidence": prediction.probabilities[prediction.label],
                "probabilities": prediction.probabilities}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _batched(self, images: list[Image.Image]) -> list[Prediction]:
        self.batches += 1
        self.m_batch.observe(len(images))
        return await asyncio.to_thread(self.model.classify, images)

    async def info(self) -> dict[str, Any]:
        return {"engine": "torch", **self.model.info(), "batches": self.batches,
                "max_batch_size": self.cfg.max_batch_size}

    async def check_health(self) -> None:
        if self.model is None:
            raise RuntimeError("model not loaded")
