"""Image classifier: DINOv2 embeddings (transformers `Dinov2Model`) and a linear head.

A checkpoint directory holds

    backbone/          the backbone, transformers format (config.json, model.safetensors)
    head.safetensors   weight (C, D), bias (C,)
    head.json          HeadConfig: labels, pooling, embedding_dim

The backbone may instead come from elsewhere (`backbone=` a hub id such as
`facebook/dinov2-small` or a local path). Preprocessing follows from the backbone config
alone (square resize to `image_size`, ImageNet mean/std), so no processor file is saved.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import Dinov2Model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FORMATS = ("PNG", "JPEG")


@dataclass
class HeadConfig:
    labels: list[str]
    pooling: Literal["cls", "mean"]
    embedding_dim: int

    def __post_init__(self):
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"pooling is {self.pooling!r}; use 'cls' or 'mean'")


@dataclass
class Prediction:
    label: str
    probabilities: dict[str, float]  # highest first


def decode_image(data: bytes, max_bytes: int, max_pixels: int) -> Image.Image:
    """Untrusted bytes -> RGB image, or ValueError with a message fit for the API user."""
    if len(data) > max_bytes:
        raise ValueError(f"image is {len(data)} bytes; the limit is {max_bytes}")
    try:
        # open() reads only the header, so the size is known before any pixel is decoded
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:
        raise ValueError(f"image has more than {2 * Image.MAX_IMAGE_PIXELS} pixels; "
                         f"the limit is {max_pixels}") from None
    except OSError:  # UnidentifiedImageError included
        raise ValueError("not a PNG or JPEG image") from None
    pixels = img.width * img.height
    if pixels > max_pixels:
        raise ValueError(f"image has {pixels} pixels; the limit is {max_pixels}")
    try:
        img.load()
    except OSError as exc:
        raise ValueError(f"{img.format} image could not be decoded: {exc}") from None
    return img.convert("RGB")


class ImageClassifier(torch.nn.Module):
    def __init__(self, backbone: Dinov2Model, head: HeadConfig, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        dim, n = backbone.config.hidden_size, len(head.labels)
        if head.embedding_dim != dim or weight.shape != (n, dim) or bias.shape != (n,):
            raise ValueError(f"head weight {tuple(weight.shape)}, bias {tuple(bias.shape)} and "
                             f"{n} labels do not fit a backbone of width {dim}")
        self.backbone, self.head_config = backbone.eval(), head
        self.head = torch.nn.Linear(dim, n)
        with torch.no_grad():
            self.head.weight.copy_(weight)
            self.head.bias.copy_(bias)
        self.image_size = backbone.config.image_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @property
    def labels(self) -> list[str]:
        return self.head_config.labels

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        size = (self.image_size, self.image_size)
        arrays = [np.asarray(im.convert("RGB").resize(size, Image.Resampling.BICUBIC)) for im in images]
        x = torch.from_numpy(np.stack(arrays)).to(self.device)  # (N, S, S, 3) uint8
        x = x.permute(0, 3, 1, 2).float() / 255
        return (x - self.mean) / self.std

    @torch.inference_mode()
    def embed(self, images: list[Image.Image], batch_size: int = 64) -> torch.Tensor:
        """(N, D) float32 embeddings, on self.device."""
        out = []
        for i in range(0, len(images), batch_size):
            tokens = self.backbone(pixel_values=self.preprocess(images[i:i + batch_size])).last_hidden_state
            # tokens: (B, 1 + patches, D), CLS first
            out.append(tokens[:, 0] if self.head_config.pooling == "cls" else tokens[:, 1:].mean(dim=1))
        return torch.cat(out) if out else torch.empty(0, self.head_config.embedding_dim, device=self.device)

    @torch.inference_mode()
    def classify(self, images: list[Image.Image], batch_size: int = 64) -> list[Prediction]:
        probs = self.head(self.embed(images, batch_size)).softmax(dim=-1).cpu()  # (N, C)
        preds = []
        for row in probs.tolist():
            ranked = sorted(zip(self.labels, row), key=lambda p: p[1], reverse=True)
            preds.append(Prediction(label=ranked[0][0], probabilities=dict(ranked)))
        return preds

    def info(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone.config._name_or_path,  # hub id or directory it was loaded from
            "embedding_dim": self.head_config.embedding_dim,
            "labels": list(self.labels),
            "pooling": self.head_config.pooling,
            "device": str(self.device),
        }

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.backbone.save_pretrained(path / "backbone")
        save_file({"weight": self.head.weight.detach().cpu().contiguous(),
                   "bias": self.head.bias.detach().cpu().contiguous()}, path / "head.safetensors")
        (path / "head.json").write_text(json.dumps(asdict(self.head_config), indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu",
                        backbone: str | None = None) -> ImageClassifier:
        """`path` holds the head (and `backbone/` unless `backbone` names a hub id or directory)."""
        path = Path(path)
        head = HeadConfig(**json.loads((path / "head.json").read_text()))
        tensors = load_file(path / "head.safetensors")
        # float32 whatever the checkpoint stores: the head and preprocessing are float32
        model = Dinov2Model.from_pretrained(backbone or str(path / "backbone"), dtype=torch.float32)
        return cls(model, head, tensors["weight"], tensors["bias"]).to(device)
