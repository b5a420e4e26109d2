"""Fit the image classifier's linear head on frozen DINOv2 embeddings of an ImageFolder tree (seed 004).

    python -m training.classifier --images DIR --out DIR [--backbone embedded:tiny-dinov2] [--pooling cls|mean]

DIR/<label>/<image>.png|jpg: one folder a label. The command embeds every image (progress bar),
holds out a stratified share (--test-fraction), picks the L2 strength by cross-validation on the
rest, fits logistic regression, prints held-out accuracy and the confusion matrix, and saves the
classifier that deployments/dinov2.py serves: the backbone, head.safetensors and head.json (no
pickle: loading a served artefact runs no code), plus training.json with the figures. The last
line printed is those figures as one JSON object.

--backbone: a hub id (facebook/dinov2-small where a hub is reachable), a transformers Dinov2
directory, or a classifier directory (`embedded:tiny-dinov2`, another run's --out) whose backbone/
is reused.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from transformers import Dinov2Model

from models.classifier import FORMATS, HeadConfig, ImageClassifier
from training import linear_probe
from training.classifier_default import POOLING
from models.checkpoints import resolve_model

logger = logging.getLogger(__name__)
SUFFIXES = {".png", ".jpg", ".jpeg"}


def image_folder(root: str | Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """Image paths, their label indices and the labels (sorted folder names) of an ImageFolder tree."""
    root = Path(root)
    labels = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    paths, y = [], []
    for i, label in enumerate(labels):
        files = sorted(p for p in (root / label).rglob("*") if p.suffix.lower() in SUFFIXES)
        paths += files
        y += [i] * len(files)
    counts = np.bincount(y, minlength=len(labels)) if labels else np.zeros(0, int)
    if len(labels) < 2 or counts.min() < 2:
        raise ValueError(f"{root} needs at least two label folders with two or more PNG or JPEG images each; "
                         f"found {dict(zip(labels, counts.tolist()))}")
    return paths, np.array(y), labels


def load_backbone(ref: str) -> Dinov2Model:
    path = Path(resolve_model(ref))
    source = path / "backbone" if (path / "head.json").exists() else ref
    return Dinov2Model.from_pretrained(str(source), dtype=torch.float32)


def embed(model: ImageClassifier, images: list, batch_size: int = 32) -> np.ndarray:
    """(N, D) float64 embeddings; `images` are PIL images or paths, opened a batch at a time."""
    from tqdm import tqdm

    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="embed", unit="batch", disable=len(images) <= batch_size):
        batch = [im if isinstance(im, Image.Image) else Image.open(im, formats=FORMATS) for im in images[i:i + batch_size]]
        out.append(model.embed(batch, batch_size).double().cpu().numpy())
    return np.concatenate(out)


def fit_head(backbone: Dinov2Model, images: list, y: np.ndarray, labels: list[str],
             pooling: Literal["cls", "mean"], test_fraction: float = 0.25, seed: int = 0,
             device: str = "cpu", c: float | None = None) -> tuple[ImageClassifier, dict]:
    """The classifier with a head fitted on the training share, and its held-out figures. `c`: the
    inverse L2 strength; None picks it by cross-validation on the training share."""
    start = time.perf_counter()
    dim = backbone.config.hidden_size
    head = HeadConfig(labels=labels, pooling=pooling, embedding_dim=dim)
    model = ImageClassifier(backbone, head, torch.zeros(len(labels), dim), torch.zeros(len(labels))).to(device)
    x = embed(model, images)
    train, test = linear_probe.split(y, test_fraction, seed)
    cv = {}
    if c is None:
        c, cv = linear_probe.choose_c(x[train], y[train], standardize=True, seed=seed)
    weight, bias = linear_probe.fit(x[train], y[train], c, standardize=True)
    model = ImageClassifier(backbone, head, torch.from_numpy(weight).float(), torch.from_numpy(bias).float()).to(device)
    with torch.inference_mode():  # score the float32 head that is saved and served
        pred = model.head(torch.from_numpy(x).float().to(device)).argmax(-1).cpu().numpy()
    metrics, table = linear_probe.report(labels, y[test], pred[test])
    logger.info("held-out confusion (rows true, columns predicted):\n%s", table)
    metrics.update(train_accuracy=round(float((pred[train] == y[train]).mean()), 4), n_train=len(train),
                   pooling=pooling, C=c, cv_accuracy=cv, seed=seed, seconds=round(time.perf_counter() - start, 2),
                   parameters=sum(p.numel() for p in model.parameters()))
    return model, metrics


def main(images: str, out: str, backbone: str, pooling: Literal["cls", "mean"], test_fraction: float,
         seed: int, device: str) -> dict:
    paths, y, labels = image_folder(images)
    logger.info("%d images, %d labels: %s", len(paths), len(labels), ", ".join(labels))
    model, metrics = fit_head(load_backbone(backbone), paths, y, labels, pooling, test_fraction, seed, device)
    metrics.update(images=str(images), backbone=backbone)
    model.save_pretrained(out)
    (Path(out) / "training.json").write_text(json.dumps(metrics, indent=2))
    logger.info("saved classifier to %s", out)
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="ImageFolder root: one folder of images a label")
    parser.add_argument("--out", required=True, help="directory to write the classifier to")
    parser.add_argument("--backbone", default="embedded:tiny-dinov2")
    parser.add_argument("--pooling", choices=["cls", "mean"], default=POOLING)
    parser.add_argument("--test-fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(json.dumps(main(args.images, args.out, args.backbone, args.pooling, args.test_fraction, args.seed,
                          args.device)))
