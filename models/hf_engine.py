"""transformers engine for causal LMs (Llama-like decoders and Mamba), on CPU or CUDA.

Requests are batched dynamically: a batcher on the event loop takes the waiting requests that
can share one `generate` call (same adapter, same sampling parameters, no speculation, no seed)
and runs them as one left-padded batch; requests arriving meanwhile wait for the next batch.
A stopping criterion follows every row: it hands each new token to its request's queue (streaming)
and ends the row at its own max_tokens, stop string or cancellation (client gone, deadline passed),
so one request never holds the others back beyond the batch it is in.

A Mamba-1 on the PyTorch reference path is batched continuously instead: a request's state is a
fixed-size tensor per layer, so it can join a running batch at any step. Each joining request is
prefilled alone from zero state (models.mamba.forward) and picks its first token there, its state
rows are appended to the batch's, the batch decodes one token per row per step, and a finished row
leaves at once. Rows share the adapter only; each samples with its own temperature and top_p (a
seeded one from its own generator). A request for another adapter, or a speculating one, waits until
the batch drains (no request behind it joins meanwhile, so it is not starved).

Speculative decoding (per request or by default): prompt lookup or a draft model, through
models.speculative, one request at a time; greedy output is identical to plain decoding. Mamba-1
models speculate too, with the SSM state rolled back to the last accepted token (models.mamba).

A request with a continuation (a stream the router moved here from a failed engine) prefills the
answer so far and streams only what follows it (models.engine.prompt_ids and Answer, shared with
the vLLM engine).

Adapters: peft LoRA adapters from the config, loaded on first use and kept in an LRU of
`max_loaded_adapters`; a batch uses one adapter (or none).

Generation runs on one worker thread per engine: torch already uses every core for one forward
here, and one thread keeps adapter switching and the RNG seed race-free.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList, StoppingCriteria,
                          StoppingCriteriaList)

from models import lean_llama, mamba, speculative, structured
from models.engine import (Answer, Completion, Delta, Engine, FinishReason, GenerationRequest, InvalidRequest, Logprob,
                           Prompt, first_stop, prompt_ids, tokenizer_fingerprint)

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


MAMBA_TYPES = frozenset({"mamba", "mamba2"})  # transformers' model_type of Mamba-1 and Mamba-2 configs


def mamba_kernel_path(model_type: str, device: str) -> str | None:
    """Which Mamba path runs: the mamba-ssm + causal-conv1d CUDA kernels, or the PyTorch reference.

    transformers picks the kernels when both packages import; they only run on CUDA tensors.
    None for models that are not Mamba.
    """
    if model_type not in MAMBA_TYPES:
        return None
    kernels = all(importlib.util.find_spec(p) is not None for p in ("mamba_ssm", "causal_conv1d"))
    return "mamba-ssm" if kernels and torch.device(device).type == "cuda" else "reference"


Speculation = Literal["none", "prompt_lookup", "draft"]
SPECULATION = ("none", "prompt_lookup", "draft")


@dataclass
class _Job:
    """One request in the engine: its prompt, the tokens made so far, and where they go."""

    request: GenerationRequest
    prompt: Prompt
    ids: torch.Tensor  # (1, n): prompt.ids
    speculation: Speculation
    loop: asyncio.AbstractEventLoop
    engine: HFEngine
    constraint: structured.Constraint | None = None  # the answer's grammar (response_format)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # token ids, then None
    cancel: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[Logprob] = field(default_factory=list)  # one per token, when the request asks
    scores: torch.Tensor | None = None  # the logits its next token is picked from (vocab,), for its logprob
    done: bool = False  # no more tokens will be made for it
    closed: bool = False  # its consumer has been told

    @property
    def key(self) -> tuple | None:
        """Jobs with equal keys can share a batch; None runs alone. Rows of a continuous batch pick
        their tokens on their own, so only the adapter (model-wide) must agree there."""
        r = self.request
        if self.speculation != "none":
            return None
        if self.engine.continuous:
            return (r.adapter,)
        if r.seed is not None:
            return None
        return (r.adapter, r.temperature > 0, r.temperature, r.top_p, r.ignore_eos)

    def guide(self, logits: torch.Tensor) -> None:
        """Before its next token is picked from `logits` (1, vocab): masks what the grammar rules out, keeps
        the logits for the token's logprob (the model's distribution under the grammar, as vLLM's raw
        logprobs), then masks end-of-sequence for a request that ignores it."""
        if self.constraint is not None:
            self.constraint.apply(logits)
        if self.request.logprobs is not None:
            self.scores = logits[0].clone()
        if self.request.ignore_eos and (eos := self.engine.tokenizer.eos_token_id) is not None:
            logits[0, eos] = float("-inf")

    def emit(self, token: int) -> None:
        if self.constraint is not None:
            self.constraint.consume([token])
        if self.scores is not None:
            grammars = self.engine.grammars
            self.logprobs.append(structured.logprobs(self.scores, token, self.request.logprobs, grammars.token_bytes))
        self.tokens.append(token)
        self.engine.generated += 1
        self.loop.call_soon_threadsafe(self.queue.put_nowait, token)

    def advance(self, new: list[int], eos: int | None, decode: Callable[[list[int]], str]) -> bool:
        """Hands `new` tokens to the consumer up to the first that ends the job (eos, max_tokens), then
        checks stop strings and cancellation; closes the job when it is done. Returns done."""
        req = self.request
        for token in new:
            self.emit(token)
            if (token == eos and not req.ignore_eos) or len(self.tokens) >= req.max_tokens:
                self.done = True
                break
        if self.cancel.is_set():
            self.done = True
        elif req.stop and not self.done:
            # a stop string ends within the last few tokens (or spans a continuation's boundary)
            self.done = first_stop(self.prompt.tail(decode, self.tokens), req.stop) is not None
        if self.done:
            self.close()  # its consumer need not wait for the rest of a batch
        return self.done

    def close(self, error: Exception | None = None) -> None:
        """Ends the job's token stream (with `error` raised to its consumer, if given); idempotent."""
        if not self.closed:
            self.done = self.closed = True
            self.loop.call_soon_threadsafe(self.queue.put_nowait, error)


class _Rows(StoppingCriteria):
    """Runs after every decoding step of a batch: hands each row's new tokens to its job and says which
    rows are finished. generate() pads finished rows and stops when every row is finished."""

    def __init__(self, jobs: list[_Job], prompt_len: int, eos: int | None, decode):
        self.jobs, self.prompt_len, self.eos, self.decode = jobs, prompt_len, eos, decode

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        new = input_ids[:, self.prompt_len:].tolist()
        for job, row in zip(self.jobs, new):
            if not job.done:
                job.advance(row[len(job.tokens):], self.eos, self.decode)
        return torch.tensor([j.done for j in self.jobs], dtype=torch.bool, device=input_ids.device)


class _Guide(LogitsProcessor):
    """Runs before each decoding step of a batch picks its tokens: each row's grammar mask and logprobs
    (_Job.guide). transformers applies it before temperature and top_p."""

    def __init__(self, jobs: list[_Job]):
        self.jobs = jobs

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row, job in enumerate(self.jobs):
            if not job.done:
                job.guide(scores[row:row + 1])
        return scores


class HFEngine(Engine):
    def __init__(
        self,
        model: str,
        device: str = "cpu",
        dtype: str = "float32",
        max_context: int | None = None,
        adapters: dict[str, str] | None = None,
        max_batch_size: int = 16,
        batch_wait_ms: float = 3.0,
        max_batch_wait_ms: float = 25.0,
        max_loaded_adapters: int = 4,
        speculation: Speculation = "none",
        prompt_lookup_tokens: int = 10,
        draft_model: str | None = None,
        draft_tokens: int = 5,
        stream_interval: int = 1,
        threads: int | None = None,
    ):
        if speculation not in SPECULATION:
            raise ValueError(f"speculation must be one of {SPECULATION}, not {speculation!r}")
        if speculation == "draft" and draft_model is None:
            raise ValueError("speculation 'draft' needs draft_model")
        if min(max_batch_size, max_loaded_adapters, stream_interval, threads or 1) < 1:
            raise ValueError("max_batch_size, max_loaded_adapters, stream_interval and threads must be at least 1")
        self.model_ref, self.device, self.dtype = model, device, dtype
        self.adapter_paths = dict(adapters or {})
        self.max_batch_size, self.batch_wait_s = max_batch_size, batch_wait_ms / 1000
        self.max_batch_wait_s = max_batch_wait_ms / 1000
        self.max_loaded_adapters = max_loaded_adapters
        self.speculation, self.prompt_lookup_tokens = speculation, prompt_lookup_tokens
        self.draft_ref, self.draft_tokens = draft_model, draft_tokens
        # vLLM's stream_interval: a stream's first token at once, then pieces of this many (and the last)
        self.stream_interval = stream_interval
        self.threads = threads  # torch's compute threads; None: what the process has (Ray: its num_cpus)
        self._max_context = max_context
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-generate")
        self.model = self.tokenizer = self.draft = self.draft_lean = None
        self.continuous = False  # continuous batching (a Mamba-1 on the reference path), known once loaded
        self.fingerprint = ""  # tokenizer_fingerprint(self.tokenizer), once loaded
        self._loaded: OrderedDict[str, None] = OrderedDict()  # adapters in the model, least recent first
        self._waiting: list[_Job] = []  # oldest first; a continuous batch takes from it on the engine thread
        self._lock = threading.Lock()  # guards _waiting
        self._wake = asyncio.Event()
        self._batcher: asyncio.Task | None = None
        self.running = 0  # jobs in the batch that is generating now
        self.batches = 0  # batches so far: generate() calls, or continuous batches from first row until drained
        self.generated = 0  # tokens handed to requests so far
        self.spec_stats = speculative.Stats()  # speculation rounds, guesses checked and kept

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self._load)
        self._wake = asyncio.Event()
        self._batcher = asyncio.create_task(self._batch_loop())

    def _load(self) -> None:
        from models.checkpoints import resolve_model  # the draft may be an embedded model too

        if self.threads is not None:  # on the engine thread, which runs every forward (OpenMP's is per thread)
            torch.set_num_threads(self.threads)
        self.threads = torch.get_num_threads()
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_ref)
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        model = AutoModelForCausalLM.from_pretrained(self.model_ref, dtype=_DTYPES[self.dtype])
        self.model = model.to(self.device).eval()
        cfg = self.model.config
        self.grammars = structured.Grammars(self.tokenizer, self.model.get_output_embeddings().weight.shape[0])
        if cfg.model_type == "mamba" and mamba_kernel_path(cfg.model_type, self.device) == "reference":
            mamba.use_fast_conv()
        self.can_speculate = speculative.supports(self.model)
        # Continuous batching through models.mamba's forward from a state (Mamba-1 on the reference path;
        # the CUDA kernels and Mamba-2 keep transformers' generate()).
        self.continuous = mamba_kernel_path(cfg.model_type, self.device) == "reference" and cfg.model_type == "mamba"
        if not self.can_speculate and self.speculation != "none":
            raise ValueError(f"speculative decoding is not available for {cfg.model_type} models (Mamba-1 and "
                             "attention models only)")
        for name in list(self.adapter_paths)[: self.max_loaded_adapters]:
            self._use_adapter(name)
        if self.draft_ref is not None:
            draft = AutoModelForCausalLM.from_pretrained(resolve_model(self.draft_ref), dtype=_DTYPES[self.dtype])
            self.draft = draft.to(self.device).eval()
            self.draft_lean = lean_llama.LeanLlama(self.draft) if lean_llama.supports(self.draft) else None
        limits = [x for x in (self._max_context, getattr(cfg, "max_position_embeddings", None)) if x]
        self.max_context = min(limits) if limits else None
        logger.info("loaded %s (%s) on %s, kernel path %s, speculation %s", self.model_ref, cfg.model_type,
                    self.device, mamba_kernel_path(cfg.model_type, self.device), self.speculation)

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
            "tokenizer": self.fingerprint,
            "adapters": list(self.adapter_paths),
            "adapters_loaded": list(self._loaded),
            "max_batch_size": self.max_batch_size,
            "stream_interval": self.stream_interval,
            "threads": self.threads,
            "speculation": self.speculation,
            "continuous_batching": self.continuous,
            "draft_model": self.draft_ref,
            "running": self.running,
            "waiting": len(self._waiting),
            "batches": self.batches,
            "generated_tokens": self.generated,
            "speculation_rounds": self.spec_stats.rounds,
            "speculation_acceptance": round(self.spec_stats.accepted / max(1, self.spec_stats.proposed), 3),
            "parameters": sum(p.numel() for p in self.model.parameters()),
        }

    def close(self) -> None:
        if self._batcher is not None:
            self._batcher.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def check_health(self) -> None:
        if self.model is None:
            raise RuntimeError("model not loaded")
        if self._batcher is None or self._batcher.done():
            raise RuntimeError("the batcher stopped")

    # --- prompt -----------------------------------------------------------------

    def _encode(self, req: GenerationRequest) -> Prompt:
        prompt = prompt_ids(req, self.tokenizer, self.fingerprint, self.max_context)
        if req.adapter is not None and req.adapter not in self.adapter_paths:
            raise InvalidRequest(f"unknown adapter {req.adapter!r}; this backend has {list(self.adapter_paths)}")
        return prompt

    def _constraint(self, req: GenerationRequest, prompt: Prompt) -> structured.Constraint | None:
        """The request's grammar, having consumed a continued answer's start; None without response_format."""
        if req.json_schema is None:
            return None
        if req.ignore_eos:
            raise InvalidRequest("ignore_eos cannot be combined with response_format: a complete answer ends")
        constraint = self.grammars.constraint(req.json_schema)
        constraint.consume(prompt.answer_ids)
        if prompt.text:
            constraint.consume_text(prompt.text)
        return constraint

    def _speculation(self, req: GenerationRequest) -> Speculation:
        if req.json_schema is not None or req.logprobs is not None:
            # models.speculative's loop takes guesses without a grammar or logprobs: plain decoding instead
            if req.speculation not in (None, "none"):
                raise InvalidRequest(f"speculation {req.speculation!r} cannot be combined with logprobs or "
                                     "response_format on this backend; omit speculation")
            return "none"
        method = req.speculation or self.speculation
        if method not in SPECULATION:
            raise InvalidRequest(f"speculation must be one of {SPECULATION}, not {method!r}")
        if method != "none" and not self.can_speculate:
            raise InvalidRequest(f"speculative decoding is not available for this backend's "
                                 f"{self.model.config.model_type} model")
        if method == "draft" and self.draft is None:
            raise InvalidRequest("this backend has no draft model; use speculation 'prompt_lookup' or 'none'")
        return method

    def _submit(self, req: GenerationRequest) -> _Job:
        prompt = self._encode(req)
        job = _Job(req, prompt, torch.tensor([prompt.ids]), self._speculation(req), asyncio.get_running_loop(), self,
                   self._constraint(req, prompt))
        with self._lock:
            self._waiting.append(job)
        self._wake.set()
        return job

    # --- batching ---------------------------------------------------------------

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._waiting:
                if not self.continuous:  # a continuous batch takes latecomers at its next step
                    await self._gather()
                batch = self._take_batch()
                if not batch:
                    continue
                self.running = len(batch)
                try:
                    await loop.run_in_executor(self._pool, self._run, batch)
                finally:
                    self.running = 0

    async def _gather(self) -> None:
        """Lets a burst of requests arrive before the batch starts: waits while new ones keep coming
        (a gap of batch_wait_ms without one ends it), at most max_batch_wait_ms, never for a full batch.
        A lone request waits one gap."""
        deadline = time.monotonic() + self.max_batch_wait_s
        while 0 < len(self._waiting) < self.max_batch_size and time.monotonic() < deadline:
            seen = len(self._waiting)
            await asyncio.sleep(self.batch_wait_s)
            if len(self._waiting) == seen:
                return

    def _take_batch(self) -> list[_Job]:
        """The oldest waiting job and the others that can share its batch; drops cancelled jobs."""
        with self._lock:
            for job in [j for j in self._waiting if j.cancel.is_set()]:
                self._waiting.remove(job)
                job.close()
            if not self._waiting:
                return []
            key = self._waiting[0].key
            if key is None:
                batch = [self._waiting[0]]
            else:
                batch = [j for j in self._waiting if j.key == key][: self.max_batch_size]
            for job in batch:
                self._waiting.remove(job)
        return batch

    def _join(self, key: tuple, room: int) -> list[_Job]:
        """Up to `room` waiting jobs that join a running continuous batch of `key`, oldest first; the
        first that cannot join (another adapter, a speculating request) stops the intake, so that the
        batch drains and it runs next. Drops cancelled jobs on the way. Runs on the engine thread."""
        joining: list[_Job] = []
        with self._lock:
            while self._waiting and len(joining) < room:
                job = self._waiting[0]
                if job.cancel.is_set():
                    self._waiting.pop(0).close()
                elif job.key == key:
                    joining.append(self._waiting.pop(0))
                else:
                    break
        return joining

    def _run(self, jobs: list[_Job]) -> None:
        """Generates for a batch (or one speculating job) on the engine's thread. Every job is closed at
        the end; a continuous batch keeps `jobs` the list of the jobs it has in flight."""
        self.batches += 1
        first = jobs[0].request
        try:
            with torch.inference_mode(), self._adapter(first.adapter):
                if jobs[0].speculation == "none" and self.continuous:
                    self._continuous(jobs)
                    return
                if first.seed is not None:  # a seeded job runs alone outside continuous batches (key None)
                    torch.manual_seed(first.seed)
                if jobs[0].speculation != "none":
                    self._speculate(jobs[0])
                else:
                    self._generate(jobs)
        except Exception as exc:  # noqa: BLE001 - a failed batch fails its requests, not the engine
            logger.exception("generation failed for a batch of %d", len(jobs))
            for job in jobs:
                job.close(RuntimeError(f"generation failed: {type(exc).__name__}: {exc}"))
        finally:
            for job in jobs:
                job.close()

    async def on_engine_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Runs `fn(*args)` on the thread that generates, after the work queued there (a continuous
        batch holds the thread until it drains). torch's thread pool belongs to the thread that calls
        it: computing on a second thread starts a second pool, and the two compete for the cores
        (bench.speculative ran every method about 2x slower when transformers' generate() ran on its
        main thread)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _generate(self, jobs: list[_Job]) -> None:
        """One left-padded generate() call; a stopping criterion ends each row on its own."""
        first = jobs[0].request
        width = max(j.ids.shape[1] for j in jobs)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(jobs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for row, job in enumerate(jobs):  # left padding: every row's next token is at the end
            n = job.ids.shape[1]
            ids[row, width - n:] = job.ids[0]
            mask[row, width - n:] = 1
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max(j.request.max_tokens for j in jobs),
            do_sample=first.temperature > 0,
            stopping_criteria=StoppingCriteriaList([_Rows(jobs, width, self.tokenizer.eos_token_id, self._decode)]),
            logits_processor=LogitsProcessorList([_Guide(jobs)]),
            pad_token_id=pad,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        if first.temperature > 0:
            kwargs.update(temperature=first.temperature, top_p=first.top_p)
        self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)

    def _continuous(self, jobs: list[_Job]) -> None:
        """Continuous batching (Mamba-1, reference path) until no row is left and no waiting job can
        join. Each step: the jobs that join (_join) are prefilled one by one from zero state, the
        shortest prompt first, and pick their first token; those not done by then add their state row
        to the batch's; then every row decodes one token, and the rows that are done (_Job.advance)
        leave. `jobs` is kept the list of the jobs in flight (those joining included), so that a failure
        ends exactly those; the rows of `state`, `picks` and `last` follow its order.

        Prefilling the joining prompts together, left-padded and masked, was slower on this CPU: for
        bench.batching's 16 prompts (6 to 16 tokens, tiny-mamba, one thread) one forward took 39 to 59 ms,
        one forward per prompt 31 to 35 ms in all, and each first token came only at the end."""
        key, eos, device = jobs[0].key, self.tokenizer.eos_token_id, self.device
        joining, picks, last = list(jobs), [], []  # picks: each row's sampler (None: greedy); last: its last token
        state: mamba.State | None = None  # the rows' states, (rows, ...) per layer
        jobs.clear()
        while joining or jobs:
            rows_before, added = len(jobs), []
            jobs.extend(joining)  # in flight from here, so that a failure ends them too
            for job in sorted(joining, key=lambda j: j.ids.shape[1]):  # the shortest first: sooner first tokens
                logits, prefilled = mamba.forward(self.model, job.ids.to(device), logits_to_keep=1)
                pick = self._sampler(job.request)
                token = self._pick([job], [pick], logits[:, -1])[0]
                if not job.advance([token], eos, self._decode):
                    added.append(job)
                    picks.append(pick)
                    last.append(token)
                    state = prefilled if state is None else mamba.State.cat([state, prefilled])
            jobs[rows_before:] = added  # in the order of their rows in `state`
            self.running = len(jobs)
            if jobs:
                logits, state = mamba.forward(self.model, torch.tensor(last, device=device)[:, None], state)
                last = self._pick(jobs, picks, logits[:, -1])
                done = [job.advance([token], eos, self._decode) for job, token in zip(jobs, last)]
                if any(done):
                    keep = [i for i, d in enumerate(done) if not d]
                    state = state.rows(torch.tensor(keep, dtype=torch.long, device=device)) if keep else None
                    jobs[:] = [jobs[i] for i in keep]
                    picks, last = [picks[i] for i in keep], [last[i] for i in keep]
            joining = self._join(key, self.max_batch_size - len(jobs))

    def _sampler(self, req: GenerationRequest) -> speculative.Pick | None:
        """How a row picks its tokens: None for greedy, else draws at its temperature and top_p, from a
        generator of its own when it has a seed (its draws then do not depend on the other rows)."""
        if req.temperature == 0:
            return None
        generator = None if req.seed is None else torch.Generator(self.device).manual_seed(req.seed)
        return speculative.sampler(req.temperature, req.top_p, generator)

    def _pick(self, jobs: list[_Job], picks: list[speculative.Pick | None], logits: torch.Tensor) -> list[int]:
        """One token per row from `logits` (rows, vocab), guided by its job (_Job.guide: grammar, logprobs,
        ignore_eos): the argmax, or a draw with the row's sampler."""
        for i, job in enumerate(jobs):
            job.guide(logits[i:i + 1])
        tokens = logits.argmax(dim=-1).tolist()
        for i, pick in enumerate(picks):
            if pick is not None:
                tokens[i] = int(pick(logits[i:i + 1])[0])
        return tokens

    def _speculate(self, job: _Job) -> None:
        """One request through models.speculative with the prompt-lookup or draft proposer."""
        req, eos = job.request, self.tokenizer.eos_token_id
        if job.speculation == "draft":
            max_len = job.ids.shape[1] + req.max_tokens + self.draft_tokens  # guesses past the last token included
            proposer = speculative.DraftModel(self.draft, self.draft_tokens, max_len, self.draft_lean)
        else:
            proposer = speculative.PromptLookup(self.prompt_lookup_tokens)
        pick = speculative.greedy if req.temperature == 0 else speculative.sampler(req.temperature, req.top_p)
        if req.ignore_eos and eos is not None:
            pick = _without(eos, pick)
        speculative.generate(self.model, job.ids[0].tolist(), proposer, pick,
                             lambda new: job.advance(new, eos, self._decode), req.max_tokens, self.spec_stats)

    # --- adapters ---------------------------------------------------------------

    def _use_adapter(self, name: str) -> None:
        """Loads `name` if it is not in the model, evicting the least recently used beyond the limit."""
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return
        if not self._loaded:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, self.adapter_paths[name], adapter_name=name).eval()
        else:
            if len(self._loaded) >= self.max_loaded_adapters:
                evicted, _ = self._loaded.popitem(last=False)
                self.model.delete_adapter(evicted)
                logger.info("adapter %s evicted (LRU, %d loaded at most)", evicted, self.max_loaded_adapters)
            self.model.load_adapter(self.adapter_paths[name], adapter_name=name)
        self._loaded[name] = None

    def _adapter(self, name: str | None):
        """Selects the batch's adapter; the base model when none. Runs on the engine thread only."""
        if not self._loaded:
            if name is None:
                return contextlib.nullcontext()
            self._use_adapter(name)
        if name is None:
            return self.model.disable_adapter()
        self._use_adapter(name)
        self.model.set_adapter(name)
        return contextlib.nullcontext()

    def _reason(self, answer: Answer, cancelled: bool) -> FinishReason:
        """A stop string or eos ends an answer with "stop" (the text is cut before the stop string, as
        OpenAI does); else max_tokens ("length") or cancellation ("abort")."""
        if answer.stopped or (answer.tokens and answer.tokens[-1] == self.tokenizer.eos_token_id):
            return "stop"
        return "abort" if cancelled else "length"

    # --- engine API ----------------------------------------------------------------

    async def _tokens(self, job: _Job) -> AsyncIterator[list[int]]:
        """The job's tokens as they come: the first at once, then pieces of `stream_interval` tokens at
        least, and the rest at the end. A piece takes every token made since the last (more when the
        consumer fell behind the engine: one message through Serve instead of one per token). Cancels
        the job if the consumer stops early."""
        pending: list[int] = []
        first = True
        try:
            while True:
                items = [await job.queue.get()]
                while not job.queue.empty() and items[-1] is not None:
                    items.append(job.queue.get_nowait())
                pending += [t for t in items if isinstance(t, int)]
                end = items[-1] is None or isinstance(items[-1], Exception)
                if pending and (first or end or len(pending) >= self.stream_interval):
                    yield pending
                    pending, first = [], False
                if isinstance(items[-1], Exception):
                    raise items[-1]
                if items[-1] is None:
                    return
        finally:
            if not job.done:
                job.cancel.set()  # the client went away or the deadline passed: stop at the next token

    async def generate(self, request: GenerationRequest) -> Completion:
        job = self._submit(request)
        answer = Answer(request, job.prompt, self._decode)
        text = answer.add([t async for tokens in self._tokens(job) for t in tokens])
        text += answer.rest()
        return Completion(text, len(job.prompt.ids), len(answer.tokens), self._reason(answer, job.cancel.is_set()),
                          job.prompt.cut, self._logprobs(job, 0, len(answer.tokens)))

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        job = self._submit(request)
        answer = Answer(request, job.prompt, self._decode)
        given = 0  # tokens handed out in pieces
        cut, fingerprint = job.prompt.cut, self.fingerprint
        stream = self._tokens(job)
        try:
            async for tokens in stream:
                text = answer.add(tokens)
                if answer.stopped:
                    break
                if text:
                    yield Delta(text, None, len(job.prompt.ids), 0, cut, answer.tokens[given:], fingerprint,
                                self._logprobs(job, given, len(answer.tokens)))
                    given = len(answer.tokens)
        finally:
            await stream.aclose()  # cancels the job when the consumer (client) went away
        yield Delta(answer.rest(), self._reason(answer, False), len(job.prompt.ids), len(answer.tokens), cut,
                    answer.tokens[given:], fingerprint, self._logprobs(job, given, len(answer.tokens)))

    @staticmethod
    def _logprobs(job: _Job, start: int, end: int) -> list[Logprob] | None:
        """The logprobs of the job's tokens start:end, if the request asks (emit made each before its token
        was handed out)."""
        return None if job.request.logprobs is None else job.logprobs[start:end]


def _without(token: int, pick: speculative.Pick) -> speculative.Pick:
    """`pick` that never picks `token` (ignore_eos)."""

    def masked(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[..., token] = float("-inf")
        return pick(logits)

    return masked
