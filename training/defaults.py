"""The embedded default models: tiny, made by this project's code, no download.

The transformer, its draft, the Mamba, their adapters, the TRMs and the DINOv2 classifier are
trained (training/lm.py, training/lora.py, training/trm.py, training/classifier_default.py) and
committed under models/embedded with a training.json saying how. The intent classifier is a seeded build:
a config names it as `embedded:NAME`; `resolve_model` builds it on first use into
SWITCHYARD_CACHE (atomic rename under a file lock, so replicas starting together build it
once) and returns a local path that the ordinary `from_pretrained` loaders read, the same
loaders that read real checkpoints. Same seed and Python version, same weights.

    python -m training.defaults            # build all of them now, print what was built
"""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from models.settings import CACHE_DIR

logger = logging.getLogger(__name__)

# Trained defaults (training/lm.py, training/lora.py) are committed here, with their training.json.
TRAINED_DIR = Path(__file__).resolve().parents[1] / "models" / "embedded"
VERSION = 3  # bump when a builder changes its output: the cache key changes with it
SEED = 0
EMBEDDED = "embedded:"
SPECIAL = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]
# Roles become special tokens; every turn ends in <|eos|>, so the model stops after its answer.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|eos|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(out: Path, vocab_size: int = 4096, files: int = 200) -> None:
    """Byte-level BPE trained on the first `files` files of the corpus's train split (about 1 s)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from training.corpus import texts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts("train", files), trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=8192,
    ).save_pretrained(out)


def build_intent(out: Path) -> None:
    """The text intent classifier: MiniLM (int8) embeddings beside TF-IDF features, and logistic
    regression, fitted on the training share of training/data/intent.jsonl (training/intent.py); its
    intent.json holds the held-out figures."""
    from training.intent import train

    train(encoder="minilm+tfidf", int8=True, out=out, seed=SEED)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "intent": build_intent,
}


def trained() -> list[str]:
    """The embedded models trained by training/ code and committed under models/embedded."""
    return sorted(p.parent.name for p in TRAINED_DIR.glob("*/training.json"))


def ensure(name: str, cache: Path = CACHE_DIR) -> Path:
    """The model's directory: a committed trained one, or a seeded build (made first if missing)."""
    if (TRAINED_DIR / name / "training.json").exists():
        return TRAINED_DIR / name
    if name not in BUILDERS:
        known = ", ".join(sorted([*BUILDERS, *trained()]))
        raise ValueError(f"unknown embedded model {name!r}; known: {known}")
    target = cache / "embedded" / f"{name}-v{VERSION}"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another replica may be building it right now
        if target.exists():
            return target
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            BUILDERS[name](tmp)
            (tmp / "switchyard.json").write_text(json.dumps({"name": name, "version": VERSION, "seed": SEED}))
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("built embedded model %s in %.1f s at %s", name, time.perf_counter() - start, target)
    return target


def resolve_model(ref: str, cache: Path = CACHE_DIR) -> str:
    """`embedded:NAME` -> a local directory; a local path or hub id passes through unchanged."""
    return str(ensure(ref.removeprefix(EMBEDDED), cache)) if ref.startswith(EMBEDDED) else ref


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for model_name in BUILDERS:
        ensure(model_name)
