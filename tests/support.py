"""What tests/serve and tests/chaos share: the repository root, free ports, and the one Ray a test
process can hold."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RaySlot:
    """One Ray per process, held by one owner at a time: tests/serve's local Serve or tests/chaos's
    three-node cluster. An owner that finds the other's Ray stops it and starts its own, and the other
    starts again when next asked, so any subset of the suite passes in any order."""

    def __init__(self):
        self.owner: str | None = None
        self.stop: Callable[[], None] | None = None

    def claim(self, owner: str, start: Callable[[], Callable[[], None]]) -> None:
        """Makes `owner`'s Ray the running one; `start` starts it and returns what stops it."""
        if self.owner == owner:
            return
        self.release()
        self.stop = start()
        self.owner = owner

    def release(self) -> None:
        if self.stop is not None:
            stop, self.owner, self.stop = self.stop, None, None
            stop()


RAY = RaySlot()


def shipped_args() -> dict:
    """serve_config.yaml's application args, as a user runs them."""
    import yaml

    return yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]["args"]


def tiny_args() -> dict:
    """The shipped args with the transformer on the hf engine and the embedded tiny Llama (1.25M
    parameters), its draft and its pydoc adapter, and the router counting with its tokenizer: the serve
    and chaos tests stay fast. tests/serve/test_default.py runs the shipped default (vLLM) itself."""
    args = shipped_args()
    args["router"]["tokenizer"] = "embedded:tiny-llama"
    lm = next(b for b in args["backends"] if b["name"] == "transformer")
    lm |= {"engine": "hf", "model": "embedded:tiny-llama", "adapters": {"pydoc": "embedded:tiny-llama-pydoc-lora"},
           "engine_kwargs": {"max_batch_size": 16, "batch_wait_ms": 3, "max_batch_wait_ms": 25, "speculation": "none",
                             "prompt_lookup_tokens": 10, "max_loaded_adapters": 4,
                             "draft_model": "embedded:tiny-llama-draft", "draft_tokens": 4}}
    lm["deployment"]["ray_actor_options"] = {"num_cpus": 0.5}  # the hf engine: this venv
    return args
