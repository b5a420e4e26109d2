"""The embedded default image classifier: a tiny seeded DINOv2 and a head fitted on digits.

The backbone is randomly initialised and never trained; only the linear head is fitted
(logistic regression on standardised embeddings, the scaler folded into the head) on
scikit-learn's bundled 8x8 digits, upscaled to RGB. Everything is offline and seeded.

    python -m training.classifier_default --out /tmp/tiny-dinov2 [--seed 0] [--pooling mean]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from transformers import Dinov2Config, Dinov2Model


logger = logging.getLogger(__name__)

# 32x32 input, 4x4 patches: 64 patch tokens + CLS; about 108k parameters.
IMAGE_SIZE, PATCH_SIZE, HIDDEN, LAYERS, HEADS = 32, 4, 64, 2, 2
# Wider than the 0.02 default: a random backbone at 0.02 gives weaker features (0.83 vs 0.88
# held-out with mean pooling, C=1); 0.3 and above is worse again.
INIT_RANGE = 0.1
# Mean of patch tokens beats the CLS token held-out here: 0.896 vs 0.891 at seed 0, 0.884 vs 0.858
# at seed 1 (and in 8 of 12 nearby widths, depths and init ranges).
POOLING: Literal["cls", "mean"] = "mean"
C = 10.0  # inverse L2 strength; 1.0 under-fits these 64 features
TEST_FRACTION = 0.25


def digits_images() -> tuple[list[Image.Image], np.ndarray]:
    """scikit-learn's 1797 digits as 8x8 RGB PIL images (values 0..16 -> 0..255) and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [Image.fromarray((x * 255 / 16).astype(np.uint8)).convert("RGB") for x in digits.images]
    return images, digits.target


def tiny_backbone(seed: int) -> Dinov2Model:
    torch.manual_seed(seed)
    return Dinov2Model(Dinov2Config(
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=4 * HIDDEN, initializer_range=INIT_RANGE,
    ))


def build(out_dir: str | Path, seed: int = 0, pooling: Literal["cls", "mean"] = POOLING) -> dict:
    from training.classifier import fit_head

    images, y = digits_images()
    model, metrics = fit_head(tiny_backbone(seed), images, y, [str(i) for i in range(10)], pooling,
                              TEST_FRACTION, seed, c=C)
    model.save_pretrained(out_dir)
    (Path(out_dir) / "training.json").write_text(json.dumps(metrics, indent=2))
    logger.info("built classifier at %s: accuracy %s", out_dir, metrics["accuracy"])
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory to write the classifier to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pooling", choices=["cls", "mean"], default=POOLING)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(json.dumps(build(args.out, args.seed, args.pooling)))
