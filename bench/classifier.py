"""The image classifier and the text intent classifier: accuracy on held-out data and latency.

Images: the default backbone (the embedded tiny DINOv2, randomly initialised and frozen; --backbone
for another: a hub id, a Dinov2 directory or a classifier directory) embeds scikit-learn's bundled
digits (1797 8x8 images, 25% held out, stratified); logistic regression on the embeddings against
logistic regression on the 64 raw pixels, and against the same tiny backbone left random (the
default is pretrained without labels on the training share), on the same split. Latency: the saved head's classify()
on one image a call, and on batches of 16, per image.

Text: every intent encoder (training/intent.py) trained on the same 75% of
training/data/intent.jsonl and scored on the same held-out 25%; latency is predict() on one held-out
prompt a call, with as many torch threads as the router's replica gets (1: --threads).

    python -m bench.classifier [--backbone embedded:tiny-dinov2] [--threads 1] [--rounds 200]

Last line: one JSON object: latency_b1_ms, per_image_b16_ms, digits_accuracy, raw_pixel_accuracy,
digits_accuracy_random_backbone (the default backbone unless --backbone), intent_accuracy and intent_latency_p50_ms (the default encoder,
minilm+tfidf with int8 MiniLM), intent_encoders (each encoder's accuracy, p50 and p99 ms), and
the settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import numpy as np
import torch

from training import linear_probe
from training.classifier import fit_head, load_backbone
from training.classifier_default import POOLING, TEST_FRACTION, digits_images, tiny_backbone
from training.intent import DATA, read, train

DEFAULT_ENCODER = ("minilm+tfidf", True)  # (encoder, int8): training/defaults.py builds the same
ENCODERS = [("tfidf", False), ("minilm", False), ("minilm", True), ("minilm+tfidf", False), DEFAULT_ENCODER]


def timed(fn, inputs: list, warmup: int = 5) -> list[float]:
    """Milliseconds of fn(x) for each input, after `warmup` untimed calls."""
    for x in inputs[:warmup]:
        fn(x)
    out = []
    for x in inputs:
        start = time.perf_counter()
        fn(x)
        out.append((time.perf_counter() - start) * 1e3)
    return out


def images(backbone: str, pooling: str, rounds: int, seed: int = 0) -> dict:
    from sklearn.linear_model import LogisticRegression

    pictures, y = digits_images()
    model, metrics = fit_head(load_backbone(backbone), pictures, y, [str(i) for i in range(10)], pooling,
                              TEST_FRACTION, seed)
    train_idx, test_idx = linear_probe.split(y, TEST_FRACTION, seed)  # the split fit_head used
    pixels = np.stack([np.asarray(p.convert("L"), dtype=np.float64).ravel() / 255 for p in pictures])
    raw = LogisticRegression(C=1.0, max_iter=5000).fit(pixels[train_idx], y[train_idx])
    held_out = [pictures[i] for i in test_idx]
    single = timed(lambda im: model.classify([im]), held_out[:rounds])
    batches = [held_out[i:i + 16] for i in range(0, min(len(held_out), 16 * rounds) - 15, 16)]
    batch = timed(lambda b: model.classify(b), batches)
    _, random = fit_head(tiny_backbone(seed), pictures, y, [str(i) for i in range(10)], pooling, TEST_FRACTION, seed)
    return {"latency_b1_ms": round(statistics.median(single), 3),
            "per_image_b16_ms": round(statistics.median(batch) / 16, 3),
            "digits_accuracy": metrics["accuracy"],
            "raw_pixel_accuracy": round(float(raw.score(pixels[test_idx], y[test_idx])), 4),
            "digits_accuracy_random_backbone": random["accuracy"],
            "digits_train_accuracy": metrics["train_accuracy"], "digits_C": metrics["C"],
            "backbone": backbone, "pooling": pooling, "backbone_parameters": metrics["parameters"]}


def intents(rounds: int, seed: int = 0) -> dict[str, dict]:
    texts, tasks = read(DATA)
    _, test_idx = linear_probe.split(np.array([sorted(set(tasks)).index(t) for t in tasks]), 0.25, seed)
    prompts = [texts[i] for i in test_idx][:rounds]
    out = {}
    for encoder, int8 in ENCODERS:
        model, metrics = train(encoder=encoder, int8=int8, seed=seed)
        ms = timed(model.predict, prompts)
        out[encoder + (" int8" if int8 else "")] = {
            "accuracy": metrics["accuracy"], "cv_accuracy": metrics["cv_accuracy"][metrics["C"]],
            "p50_ms": round(statistics.median(ms), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}
        logging.info("intent %s: %s", encoder, out[encoder + (" int8" if int8 else "")])
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="embedded:tiny-dinov2")
    parser.add_argument("--pooling", choices=["cls", "mean"], default=POOLING)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the router replica gets 1)")
    parser.add_argument("--rounds", type=int, default=200, help="timed calls per figure")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    result = images(args.backbone, args.pooling, args.rounds)
    encoders = intents(args.rounds)
    default = encoders[DEFAULT_ENCODER[0] + " int8"]
    result |= {"intent_accuracy": default["accuracy"], "intent_latency_p50_ms": default["p50_ms"],
               "intent_encoder": DEFAULT_ENCODER[0] + " int8", "intent_encoders": encoders,
               "threads": args.threads, "rounds": args.rounds}
    print(json.dumps(result))
