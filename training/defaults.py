"""The embedded default models: tiny, made by this project's code, no download.

The transformer, its draft, the Mamba, their adapters, the TRMs, the DINOv2 classifier and the
intent classifier are trained (training/lm.py, training/lora.py, training/trm.py,
training/classifier_default.py, training/intent.py) and committed under models/embedded, each with
a training.json saying how. A config names one as `embedded:NAME`; models.checkpoints.resolve_model
returns its directory, which the ordinary `from_pretrained` loaders read, the same loaders that read
real checkpoints. SmolLM2's draft (training/smollm2_draft.py) is committed as its own layers only,
over SmolLM2's embeddings; resolve_model assembles its directory in the cache.

    python -m training.defaults            # list them, with the command that made each
"""

from __future__ import annotations

import json
from pathlib import Path

from models.checkpoints import EMBEDDED_DIR, embedded_models

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


if __name__ == "__main__":
    for model_name in embedded_models():
        path = EMBEDDED_DIR / model_name
        print(f"embedded:{model_name}  {path}  {json.loads((path / 'training.json').read_text()).get('command', '')}")
