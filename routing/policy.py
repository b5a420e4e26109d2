"""The routing decision: hard filters, then a ranking, then an ordered fallback plan.

The ranking (RoutingConfig.strategy): "cost" puts the candidates with a measured cost model first,
by predicted latency for this prompt length and max_tokens, scaled by their load (routing.cost),
and the others after them by score; with measured quality for the task (Capability.quality), only
the candidates within `quality_margin` bits per byte of the best rank by latency, and the others
follow, best quality first. "score" ranks by the weighted score alone.

Plain functions over plain data (no Ray, torch or FastAPI), so a decision costs microseconds
and every case is a table row in tests/unit/test_policy.py.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Literal

from routing.config import TASKS, Capability, RoutingConfig, Rule
from routing.cost import load_factor
from routing.features import Features

ErrorKind = Literal["invalid", "not_found", "unavailable", "forbidden"]


class Exclusion(StrEnum):
    """Why a backend is not a candidate. Code branches on this, never on Excluded.reason."""

    modality = "modality"  # does not accept the input's modality
    task = "task"  # does not serve the task
    adapter = "adapter"  # has no such adapter
    forbidden = "forbidden"  # the caller may not use it
    context = "context"  # prompt + max_tokens beyond its context
    output = "output"  # cannot give what the answer must carry (logprobs, structured output)
    unhealthy = "unhealthy"


@dataclass(frozen=True)
class Excluded:
    """One backend's exclusion: its kind, and the reason for people (in errors and /v1/route)."""

    kind: Exclusion
    reason: str

    def __str__(self) -> str:
        return self.reason


class RoutingError(Exception):
    """No backend can take the request. `kind` says whose fault: the request's or capacity's."""

    def __init__(self, message: str, kind: ErrorKind, param: str | None = None):
        super().__init__(message)
        self.message, self.kind, self.param = message, kind, param


@dataclass
class BackendState:
    """What the router knows live about a backend."""

    healthy: bool = True
    in_flight: int = 0
    capacity: int = 1  # requests it takes at once (replicas x max_ongoing_requests)

    @property
    def busy(self) -> float:
        return min(1.0, self.in_flight / max(1, self.capacity))


@dataclass(frozen=True)
class Decision:
    backend: str
    fallbacks: tuple[str, ...]
    task: str
    task_source: str  # "explicit", "classifier", "rule:NAME", "default"
    reason: str
    scores: dict[str, float]  # every backend's score, filtered ones included
    excluded: dict[str, Excluded] = field(default_factory=dict)  # backend -> why it is not a candidate
    predicted_s: dict[str, float] = field(default_factory=dict)  # load-adjusted latency, backends with a cost model
    quality: dict[str, float] = field(default_factory=dict)  # bits per byte for the task, backends measured on it
    # Last-resort fallbacks whose context is too short for the request: they get the prompt's head
    # and tail (GenerationRequest.truncate) and the answer is marked degraded with this reason.
    degraded: dict[str, str] = field(default_factory=dict)
    # Fallbacks that take the request as text (a code grid refined by a language model), after the others.
    as_text: tuple[str, ...] = ()
    intent: tuple[str, float] | None = None  # the intent classifier's (task, confidence), used or not

    @property
    def candidates(self) -> tuple[str, ...]:
        return (self.backend, *self.fallbacks)


class _CompiledRule:
    def __init__(self, rule: Rule):
        self.rule = rule
        words = "|".join(re.escape(k) for k in rule.keywords)
        self.pattern = re.compile(rf"\b(?:{words})\b", re.IGNORECASE) if words else None

    def match(self, f: Features) -> str | None:
        """Why the rule matches, or None."""
        r = self.rule
        if r.min_tokens is not None and f.tokens >= r.min_tokens:
            return f"{f.tokens} tokens >= {r.min_tokens}"
        if r.min_pages is not None and f.pages >= r.min_pages:
            return f"{f.pages} pages >= {r.min_pages}"
        if self.pattern is not None and (m := self.pattern.search(f.text)):
            return f"keyword {m.group(0).lower()!r}"
        return None


class Policy:
    def __init__(
        self,
        backends: Mapping[str, Capability],
        config: RoutingConfig,
        adapters: Mapping[str, Collection[str]] | None = None,
    ):
        if not backends:
            raise ValueError("routing needs at least one backend")
        self.backends = dict(backends)
        self.adapters = {name: frozenset(a) for name, a in (adapters or {}).items()}
        self.config = config
        self._infer = [_CompiledRule(r) for r in config.rules if r.from_tasks is None]
        self._upgrade = [_CompiledRule(r) for r in config.rules if r.from_tasks is not None]

    def infer_task(self, f: Features) -> tuple[str, str, str]:
        """(task, source, why). Order: explicit; the intent classifier when it is confident; rules
        for a task still unknown; the default. Then rules that rewrite a known task (a long document
        turns text generation into long_context). An inferred task that no backend serves for this
        input becomes the default task: the request is still answered, and the reason says so."""
        if f.task is not None:
            if f.task not in TASKS:
                raise RoutingError(f"unknown task {f.task!r}; known tasks: {', '.join(TASKS)}", "invalid", "task")
            task, source, why = f.task, "explicit", "given in the request"
        else:
            task, source, why = self.config.default_task, "default", "no rule matched"
            threshold = self.config.intent.threshold if self.config.intent else 1.0
            unsure = ""
            if f.intent is not None:
                guess, confidence = f.intent
                if confidence >= threshold:
                    task, source, why = guess, "classifier", f"confidence {confidence:.2f}"
                else:
                    unsure = f"; classifier {guess} at {confidence:.2f} < {threshold:g}"
                    why += unsure
            if source == "default":
                for c in self._infer:
                    if (reason := c.match(f)) is not None:
                        task, source, why = c.rule.task, f"rule:{c.rule.name}", reason + unsure
                        break
            if task != self.config.default_task and not any(
                    f.modality in cap.modalities and cap.tasks.get(task, 0.0) > 0 for cap in self.backends.values()):
                why += f"; no backend serves {task} for {f.modality} input, so {self.config.default_task}"
                task = self.config.default_task
        for c in self._upgrade:
            if task in c.rule.from_tasks and (reason := c.match(f)) is not None:
                return c.rule.task, f"rule:{c.rule.name}", reason
        return task, source, why

    def score(self, name: str, task: str, f: Features, state: BackendState | None) -> float:
        cap, w = self.backends[name], self.config.weights
        headroom = max(0.0, 1.0 - (f.tokens + f.max_new_tokens) / cap.max_context)
        s = w.task * cap.tasks.get(task, 0.0) + w.strength * cap.strength + w.efficiency * cap.efficiency
        s += w.headroom * headroom
        if state is not None:
            s *= 1.0 - w.load * state.busy
        return round(s, 6)

    def _exclusion(self, name: str, task: str, f: Features, state: BackendState | None,
                   context: bool = True) -> Excluded | None:
        """Why `name` cannot take the request, or None. Checked cheapest first; the context length
        only with `context`."""
        cap = self.backends[name]
        if f.modality not in cap.modalities:
            return Excluded(Exclusion.modality, f"does not accept {f.modality} input")
        if f.backend is None and cap.tasks.get(task, 0.0) <= 0:
            return Excluded(Exclusion.task, f"does not serve task {task}")
        if f.adapter is not None and f.adapter not in self.adapters.get(name, ()):
            return Excluded(Exclusion.adapter, f"has no adapter {f.adapter!r}")
        if not f.caller.may_use(name, f.adapter):
            return Excluded(Exclusion.forbidden, f"not allowed for caller {f.caller.name}")
        if missing := sorted(f.outputs - set(cap.outputs)):
            return Excluded(Exclusion.output, f"cannot give {' or '.join(missing)} output")
        need = f.tokens + f.max_new_tokens
        if context and need > cap.max_context:
            return Excluded(Exclusion.context,
                            f"context {cap.max_context} < {f.tokens} prompt + {f.max_new_tokens} new tokens")
        if state is not None and not state.healthy:
            return Excluded(Exclusion.unhealthy, "unhealthy")
        return None

    def decide(self, f: Features, states: Mapping[str, BackendState] | None = None,
               as_text: Features | None = None) -> Decision:
        """The decision for `f`; with `as_text` (the same request as text), the backends that can
        take that and not `f` follow as fallbacks, or serve it alone when none can take `f`."""
        if as_text is None:
            return self._decide(f, states)
        try:
            first = self._decide(f, states)
        except RoutingError as exc:
            first, error = None, exc
        try:
            text = self._decide(as_text, states)
        except RoutingError:
            if first is None:
                raise error from None
            return first
        if first is None:
            return replace(text, reason=f"{text.reason} (as text)", as_text=text.candidates)
        extra = tuple(n for n in text.candidates if n not in first.candidates)
        return replace(first, fallbacks=(*first.fallbacks, *extra), as_text=extra,
                       excluded={n: e for n, e in first.excluded.items() if n not in extra},
                       degraded=first.degraded | {n: why for n, why in text.degraded.items() if n in extra})

    def _decide(self, f: Features, states: Mapping[str, BackendState] | None = None) -> Decision:
        states = states or {}
        if f.backend is not None and f.backend not in self.backends:
            known = ", ".join(["auto", *self.backends])
            raise RoutingError(f"model {f.backend!r} does not exist; available: {known}", "not_found", "model")
        task, source, why = self.infer_task(f)
        names = [f.backend] if f.backend is not None else list(self.backends)
        scores = {n: self.score(n, task, f, states.get(n)) for n in self.backends}
        excluded: dict[str, Excluded] = {}
        for n in names:
            if (e := self._exclusion(n, task, f, states.get(n))) is not None:
                excluded[n] = e
        predicted = self.predict(f, states)
        quality = {n: cap.quality.bits_per_byte[task] for n, cap in self.backends.items()
                   if cap.quality is not None and task in cap.quality.bits_per_byte}
        by_cost = self.config.strategy == "cost"
        margin = self.config.quality_margin
        measured = {n: quality[n] for n in names if n in quality and n not in excluded}
        best_quality = min(measured.values()) if by_cost and margin is not None and measured else None
        close = None if best_quality is None else {n for n, q in measured.items() if q <= best_quality + margin}

        def rank(n: str) -> tuple:
            if close is not None and n not in close:  # beyond the margin, or not measured on this task
                return (2, quality.get(n, float("inf")), predicted.get(n, float("inf")), -scores[n])
            if by_cost and n in predicted:
                return (0, predicted[n])
            return (1, -scores[n])

        ranked = sorted((n for n in names if n not in excluded), key=rank)
        # Backends too short for the prompt stay as a cut-down last resort, after every full candidate,
        # when some backend could take the whole prompt (a healthy one now, or one that is unhealthy).
        degraded = {}
        if f.backend is None and (ranked or any(e.kind is Exclusion.unhealthy for e in excluded.values())):
            short = [n for n, e in excluded.items() if e.kind is Exclusion.context
                     and self.backends[n].max_context > 2 * f.max_new_tokens
                     and self._exclusion(n, task, f, states.get(n), context=False) is None]
            for n in sorted(short, key=lambda n: -self.backends[n].max_context):
                degraded[n] = f"{excluded[n].reason}: the prompt's middle was cut"
        candidates = [*ranked, *degraded]
        if not candidates:
            raise _no_route(f, task, excluded)
        best = candidates[0]
        if f.backend is not None:
            how = "pinned by model"
        elif best in degraded:
            how = f"degraded, every backend with the context for it is unavailable ({degraded[best]})"
        elif by_cost and best in predicted and close is not None and best in close:
            how = (f"lowest predicted latency {predicted[best]:.3f} s within {margin:g} bits/byte of the best "
                   f"quality for {task} ({best_quality:.3f})")
        elif by_cost and best in predicted:
            how = f"lowest predicted latency {predicted[best]:.3f} s"
        else:
            how = f"best score {scores[best]:.3f}"
        reason = f"task {task} ({source}: {why}); {best}: {how}"
        return Decision(best, tuple(candidates[1:]), task, source, reason, scores, excluded, predicted, quality,
                        degraded, intent=f.intent)

    def predict(self, f: Features, states: Mapping[str, BackendState]) -> dict[str, float]:
        """Predicted seconds for the request on every backend with a cost model, scaled by its load."""
        out = {}
        for name, cap in self.backends.items():
            if cap.cost is not None:
                state = states.get(name)
                factor = load_factor(state.busy) if state is not None else 1.0
                out[name] = round(cap.cost.predict_s(f.tokens, f.max_new_tokens) * factor, 6)
        return out


def _no_route(f: Features, task: str, excluded: Mapping[str, Excluded]) -> RoutingError:
    """The error when every backend is excluded: decided by the exclusions' kinds, worded by their reasons."""
    detail = "; ".join(f"{n} {e.reason}" for n, e in excluded.items())
    kinds = {e.kind for e in excluded.values()}
    if Exclusion.forbidden in kinds and kinds <= {Exclusion.forbidden, Exclusion.modality, Exclusion.task,
                                                  Exclusion.output}:
        return RoutingError(f"caller {f.caller.name} may not use a backend that can serve this request: {detail}",
                            "forbidden", "model")
    if f.adapter is not None and kinds == {Exclusion.adapter}:
        return RoutingError(f"model {f.backend}:{f.adapter} does not exist: {detail}", "not_found", "model")
    if kinds == {Exclusion.unhealthy}:
        return RoutingError(f"no healthy backend for task {task}: {detail}", "unavailable")
    if Exclusion.unhealthy in kinds:
        return RoutingError(f"no backend can serve this request now: {detail}", "unavailable")
    param = "messages" if Exclusion.context in kinds else "model"
    return RoutingError(f"no backend can serve this request: {detail}", "invalid", param)


@dataclass(frozen=True)
class AdapterChoice:
    """What a chat image's label does to the request: the adapter (and backend) it picks, or why none."""

    applied: bool
    reason: str
    adapter: str | None = None  # `NAME` or `BACKEND:NAME`, as label_adapters maps it
    backend: str | None = None  # the backend the request is now pinned to, if any


def choose_adapter(label: str, confidence: float, label_adapters: Mapping[str, str], threshold: float,
                   pinned: str | None = None) -> AdapterChoice:
    """Seed 004's routing: a confident image label picks the adapter that label_adapters maps it to;
    otherwise the base model answers. `pinned`: the backend the request's `model` names, if any."""
    target = label_adapters.get(label)
    if target is None:
        return AdapterChoice(False, f"label {label!r} maps to no adapter: base model")
    if confidence < threshold:
        return AdapterChoice(False, f"confidence {confidence:.2f} < {threshold:g}: base model")
    backend = target.rpartition(":")[0] or None
    if backend is not None and pinned is not None and backend != pinned:
        return AdapterChoice(False, f"label {label!r} picks {target}, but model pins {pinned}: base model")
    return AdapterChoice(True, f"label {label!r} at {confidence:.2f}", target, backend or pinned)

