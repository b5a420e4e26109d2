"""transformers engine for causal LMs (Llama-like decoders and Mamba), on CPU or CUDA.

Generation runs on one worker thread per engine: torch already uses every core for one
forward here, and one thread keeps adapter switching and the RNG seed race-free. A request
that is cancelled (client gone, deadline passed) stops at its next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from models.engine import Completion, Delta, Engine, GenerationRequest, InvalidRequest

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def mamba_kernel_path(model_type: str, device: str) -> str | None:
    """Which Mamba path runs: the mamba-ssm + causal-conv1d CUDA kernels, or the PyTorch reference.

    transformers picks the kernels when both packages import; they only run on CUDA tensors.
    None for models that are not Mamba.
    """
    if not model_type.startswith("mamba"):
        return None
    kernels = all(importlib.util.find_spec(p) is not None for p in ("mamba_ssm", "causal_conv1d"))
    return "mamba-ssm" if kernels and device.startswith("cuda") else "reference"


def render_documents(documents: list[tuple[str, int | None]]) -> str:
    return "\n\n".join(f"[page {page}]\n{text}" if page is not None else text for text, page in documents)


class _Cancel(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _TokenQueue(BaseStreamer):
    """Hands each new token id from the generation thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        self.loop, self.queue, self.prompt_seen = loop, queue, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, token)

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


class HFEngine(Engine):
    def __init__(
        self,
        model: str,
        device: str = "cpu",
        dtype: str = "float32",
        max_context: int | None = None,
        adapters: dict[str, str] | None = None,
    ):
        self.model_ref, self.device, self.dtype = model, device, dtype
        self.adapter_paths = dict(adapters or {})
        self._max_context = max_context
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-generate")
        self.model = self.tokenizer = None

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self._load)

    def _load(self) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_ref)
        model = AutoModelForCausalLM.from_pretrained(self.model_ref, dtype=_DTYPES[self.dtype])
        if self.adapter_paths:
            from peft import PeftModel

            first, *rest = self.adapter_paths.items()
            model = PeftModel.from_pretrained(model, first[1], adapter_name=first[0])
            for name, path in rest:
                model.load_adapter(path, adapter_name=name)
        self.model = model.to(self.device).eval()
        cfg = self.model.config
        limits = [x for x in (self._max_context, getattr(cfg, "max_position_embeddings", None)) if x]
        self.max_context = min(limits) if limits else None
        logger.info("loaded %s (%s) on %s, kernel path %s", self.model_ref, cfg.model_type, self.device,
                    mamba_kernel_path(cfg.model_type, self.device))

    def info(self) -> dict[str, Any]:
        model_type = self.model.config.model_type
        return {
            "engine": "hf",
            "model": self.model_ref,
            "architecture": model_type,
            "device": self.device,
            "dtype": self.dtype,
            "kernel": mamba_kernel_path(model_type, self.device),
            "max_context": self.max_context,
            "adapters": list(self.adapter_paths),
            "parameters": sum(p.numel() for p in self.model.parameters()),
        }

    async def check_health(self) -> None:
        if self.model is None:
            raise RuntimeError("model not loaded")

    # --- prompt -----------------------------------------------------------------

    def _encode(self, req: GenerationRequest) -> torch.Tensor:
        docs = render_documents(req.documents)
        if req.messages is not None:
            messages = ([{"role": "system", "content": docs}] if docs else []) + req.messages
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = f"{docs}\n\n{req.prompt}" if docs else (req.prompt or "")
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        if self.max_context is not None and ids.shape[1] + req.max_tokens > self.max_context:
            raise InvalidRequest(
                f"prompt of {ids.shape[1]} tokens plus max_tokens {req.max_tokens} exceeds "
                f"this model's context of {self.max_context} tokens"
            )
        if req.adapter is not None and req.adapter not in self.adapter_paths:
            raise InvalidRequest(f"unknown adapter {req.adapter!r}; this backend has {list(self.adapter_paths)}")
        return ids

    def _run(self, req: GenerationRequest, ids: torch.Tensor, cancel: threading.Event,
             streamer: BaseStreamer | None = None) -> list[int]:
        """Blocking generation on the engine's thread; returns the new token ids."""
        if req.seed is not None:
            torch.manual_seed(req.seed)
        sample = req.temperature > 0
        kwargs: dict[str, Any] = dict(
            max_new_tokens=req.max_tokens,
            do_sample=sample,
            stopping_criteria=StoppingCriteriaList([_Cancel(cancel)]),
            streamer=streamer,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        if sample:
            kwargs.update(temperature=req.temperature, top_p=req.top_p)
        ids = ids.to(self.device)
        with torch.inference_mode(), self._adapter(req.adapter):
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        return out[0, ids.shape[1]:].tolist()

    def _adapter(self, name: str | None):
        """Selects the request's adapter; the base model when none. Runs on the engine thread only."""
        if not self.adapter_paths:
            return contextlib.nullcontext()
        if name is None:
            return self.model.disable_adapter()
        self.model.set_adapter(name)
        return contextlib.nullcontext()

    def _finish(self, req: GenerationRequest, tokens: list[int], cancelled: bool) -> tuple[str, str]:
        """(text, finish_reason) with stop strings cut off, as OpenAI does."""
        eos = self.tokenizer.eos_token_id
        ended = bool(tokens) and tokens[-1] == eos
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = _first_stop(text, req.stop)
        if cut is not None:
            return text[:cut], "stop"
        if ended:
            return text, "stop"
        return text, "abort" if cancelled else "length"

    # --- engine API ----------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> Completion:
        ids = self._encode(request)
        cancel = threading.Event()
        loop = asyncio.get_running_loop()
        try:
            tokens = await loop.run_in_executor(self._pool, self._run, request, ids, cancel)
        except asyncio.CancelledError:
            cancel.set()
            raise
        text, reason = self._finish(request, tokens, cancel.is_set())
        return Completion(text, ids.shape[1], len(tokens), reason)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        ids = self._encode(request)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[int | None] = asyncio.Queue()
        cancel = threading.Event()
        job = loop.run_in_executor(self._pool, self._run, request, ids, cancel, _TokenQueue(loop, queue))
        tokens: list[int] = []
        sent = 0  # characters of text already streamed
        hold = max((len(s) for s in request.stop), default=1) - 1  # a stop string may still be forming
        try:
            while (token := await queue.get()) is not None:
                tokens.append(token)
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                if _first_stop(text, request.stop) is not None:
                    cancel.set()
                    break
                safe = len(text) - hold
                if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
                    safe = min(safe, len(text) - 1)
                if safe > sent:
                    yield Delta(text[sent:safe])
                    sent = safe
            await job
        finally:
            cancel.set()  # the consumer went away (client disconnect) or we are done: stop generating
        text, reason = self._finish(request, tokens, False)
        yield Delta(text[sent:], reason, ids.shape[1], len(tokens))


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for s in stops if (i := text.find(s)) >= 0]
    return min(hits) if hits else None
