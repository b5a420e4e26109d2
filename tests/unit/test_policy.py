"""Table-driven tests of routing/ on the shipped serve_config.yaml: no Ray, no torch."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from deployments.config import AppConfig
from routing.config import Capability, Quality, RoutingConfig, Rule
from routing.cost import CostModel
from routing.features import Document, Features, count_pages, split_model, text_features
from routing.policy import BackendState, Excluded, Exclusion, Policy, RoutingError, _no_route, choose_adapter

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cfg() -> AppConfig:
    return AppConfig.model_validate(yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]["args"])


@pytest.fixture(scope="module")
def policy(cfg: AppConfig) -> Policy:
    """The shipped routing by score (the cost strategy has its own tests below)."""
    return Policy({b.name: b.capability for b in cfg.backends}, cfg.routing.model_copy(update={"strategy": "score"}),
                  adapters={"transformer": ["sql"]})


def words(text: str) -> int:
    return len(text.split())


def feat(prompt: str = "hello there", *, tokens: int | None = None, docs=(), model="auto", task=None,
         modality="text", max_new=64, endpoint="chat", intent: tuple[str, float] | None = None) -> Features:
    f = text_features(endpoint=endpoint, prompt=prompt, documents=list(docs), count_tokens=words,
                      max_new_tokens=max_new, model=model, task=task, modality=modality)
    return Features(**{**f.__dict__, "tokens": f.tokens if tokens is None else tokens, "intent": intent})


# (case, features, backend, fallbacks, task, task_source)
CASES = [
    ("short chat goes to the transformer", feat(), "transformer", ("mamba",), "text_generation", "default"),
    ("4096 tokens is long context", feat(tokens=4096), "mamba", ("transformer",), "long_context", "rule:long_document"),
    ("4095 tokens is not", feat(tokens=4095), "transformer", ("mamba",), "text_generation", "default"),
    ("5000 tokens goes to mamba", feat(tokens=5000), "mamba", ("transformer",), "long_context", "rule:long_document"),
    ("beyond the transformer's context: the transformer only as a degraded fallback", feat(tokens=9000), "mamba",
     ("transformer",), "long_context", "rule:long_document"),
    ("3 pages", feat(docs=[Document("a", 1), Document("b", 2), Document("c", 3)]), "mamba", ("transformer",),
     "long_context", "rule:long_document"),
    ("2 pages", feat(docs=[Document("a", 1), Document("b", 2)]), "transformer", ("mamba",), "text_generation",
     "default"),
    ("same page twice counts once", feat(docs=[Document("a", 1), Document("b", 1), Document("c", 2)]),
     "transformer", ("mamba",), "text_generation", "default"),
    ("keyword", feat("summarise the appellate ruling"), "mamba", ("transformer",), "long_context",
     "rule:long_document"),
    ("keyword phrase, any case", feat("what did the Supreme Court say"), "mamba", ("transformer",),
     "long_context", "rule:long_document"),
    ("keyword is a whole word", feat("the cases were reordered"), "transformer", ("mamba",), "text_generation",
     "default"),
    ("explicit task wins over rules", feat("fix this bug", task="long_context"), "mamba", ("transformer",),
     "long_context", "explicit"),
    ("explicit text task is still upgraded by size", feat(tokens=6000, task="text_generation"), "mamba",
     ("transformer",), "long_context", "rule:long_document"),
    ("explicit code task is not upgraded; headroom favours mamba", feat(tokens=6000, task="code_generation"),
     "mamba", ("transformer",), "code_generation", "explicit"),
    ("short explicit code task", feat(tokens=500, task="code_generation"), "transformer", ("mamba",),
     "code_generation", "explicit"),
    ("code repair keyword", feat("please fix this bug"), "transformer", (), "code_repair", "rule:code_repair"),
    ("code generation keyword", feat("implement a parser"), "transformer", ("mamba",), "code_generation",
     "rule:code_generation"),
    ("code analysis goes to mamba", feat("x", task="code_analysis"), "mamba", ("transformer",), "code_analysis",
     "explicit"),
    ("streaming prefers mamba", feat("x", task="streaming"), "mamba", ("transformer",), "streaming", "explicit"),
    ("pinned backend, no fallback", feat(model="mamba"), "mamba", (), "text_generation", "default"),
    ("pinned adapter", feat(model="transformer:sql"), "transformer", (), "text_generation", "default"),
    ("auto with an adapter keeps to backends that have it", feat(model="auto:sql"), "transformer", (),
     "text_generation", "default"),
    ("grid to trm", feat("", modality="grid", task="puzzle_solving", max_new=0, endpoint="refine"), "trm", (),
     "puzzle_solving", "explicit"),
    ("image to dinov2", feat("", modality="image", task="image_classification", max_new=0, endpoint="classify"),
     "dinov2", (), "image_classification", "explicit"),
    ("a rule's task no text backend serves: the default task", feat("solve this sudoku"), "transformer",
     ("mamba",), "text_generation", "rule:puzzle"),
    ("confident classifier decides", feat(intent=("code_generation", 0.9)), "transformer", ("mamba",),
     "code_generation", "classifier"),
    ("classifier at its threshold decides", feat(intent=("code_analysis", 0.5)), "mamba", ("transformer",),
     "code_analysis", "classifier"),
    ("classifier beats the keyword rules", feat("please fix this bug", intent=("code_analysis", 0.8)), "mamba",
     ("transformer",), "code_analysis", "classifier"),
    ("unsure classifier leaves it to the rules", feat("please fix this bug", intent=("text_generation", 0.3)),
     "transformer", (), "code_repair", "rule:code_repair"),
    ("unsure classifier and no rule: the default", feat(intent=("code_generation", 0.49)), "transformer",
     ("mamba",), "text_generation", "default"),
    ("explicit task beats the classifier", feat(task="code_analysis", intent=("code_generation", 0.99)), "mamba",
     ("transformer",), "code_analysis", "explicit"),
    ("classifier's text task is still upgraded by size", feat(tokens=6000, intent=("text_generation", 0.9)),
     "mamba", ("transformer",), "long_context", "rule:long_document"),
    ("classifier's task no text backend serves: the default task", feat(intent=("puzzle_solving", 0.95)),
     "transformer", ("mamba",), "text_generation", "classifier"),
]


@pytest.mark.parametrize("case,f,backend,fallbacks,task,source", CASES, ids=[c[0] for c in CASES])
def test_decision(policy: Policy, case, f, backend, fallbacks, task, source):
    d = policy.decide(f)
    assert (d.backend, d.fallbacks, d.task, d.task_source) == (backend, fallbacks, task, source), d.reason
    assert set(d.scores) == set(policy.backends)
    assert d.backend in d.reason


# (features, words in the reason)
REASONS = [
    (feat(intent=("code_generation", 0.9)), "task code_generation (classifier: confidence 0.90)"),
    (feat("please fix this bug", intent=("text_generation", 0.3)),
     "task code_repair (rule:code_repair: keyword 'fix'; classifier text_generation at 0.30 < 0.5)"),
    (feat(intent=("text_generation", 0.2)), "task text_generation (default: no rule matched; classifier "
     "text_generation at 0.20 < 0.5)"),
    (feat(intent=("puzzle_solving", 0.95)), "no backend serves puzzle_solving for text input, so text_generation"),
]


@pytest.mark.parametrize("f,words", REASONS)
def test_reason_says_who_decided_the_task(policy: Policy, f: Features, words: str):
    d = policy.decide(f)
    assert words in d.reason
    assert d.intent == f.intent


@pytest.mark.parametrize("label, confidence, pinned, applied, adapter, backend, reason", [
    ("0", 0.9, None, True, "pydoc", None, "label '0' at 0.90"),
    ("1", 0.9, None, True, "transformer:sql", "transformer", "label '1' at 0.90"),
    ("1", 0.9, "transformer", True, "transformer:sql", "transformer", "label '1' at 0.90"),
    ("0", 0.9, "mamba", True, "pydoc", "mamba", "label '0' at 0.90"),
    ("1", 0.9, "mamba", False, None, None, "label '1' picks transformer:sql, but model pins mamba: base model"),
    ("0", 0.5, None, True, "pydoc", None, "label '0' at 0.50"),
    ("0", 0.49, None, False, None, None, "confidence 0.49 < 0.5: base model"),
    ("7", 0.99, None, False, None, None, "label '7' maps to no adapter: base model"),
])
def test_choose_adapter(label, confidence, pinned, applied, adapter, backend, reason):
    choice = choose_adapter(label, confidence, {"0": "pydoc", "1": "transformer:sql"}, 0.5, pinned)
    assert (choice.applied, choice.adapter, choice.backend, choice.reason) == (applied, adapter, backend, reason)


# (case, features, states, kind, text in the message)
ERRORS = [
    ("unknown model", feat(model="gpt-4"), {}, "not_found", "does not exist"),
    ("unknown adapter", feat(model="transformer:nope"), {}, "not_found", "adapter"),
    ("unknown task", feat(task="poetry"), {}, "invalid", "unknown task"),
    ("text to trm", feat(model="trm"), {}, "invalid", "does not accept text"),
    ("too long for everyone", feat(tokens=70000), {}, "invalid", "context"),
    ("image in chat", feat(modality="image"), {}, "invalid", "does not accept image"),
    ("only candidate unhealthy", feat(model="mamba"), {"mamba": BackendState(healthy=False)}, "unavailable",
     "unhealthy"),
    ("both LMs unhealthy", feat(), {"mamba": BackendState(healthy=False), "transformer": BackendState(healthy=False)},
     "unavailable", "healthy"),
    ("long prompt, mamba down, too long for the transformer even cut", feat(tokens=9000, max_new=5000),
     {"mamba": BackendState(healthy=False)}, "unavailable", "mamba unhealthy"),
]


@pytest.mark.parametrize("case,f,states,kind,text", ERRORS, ids=[c[0] for c in ERRORS])
def test_no_route(policy: Policy, case, f, states, kind, text):
    with pytest.raises(RoutingError) as err:
        policy.decide(f, states)
    assert err.value.kind == kind
    assert text in err.value.message


def test_unhealthy_backend_is_skipped(policy: Policy):
    d = policy.decide(feat(tokens=5000), {"mamba": BackendState(healthy=False)})
    assert (d.backend, d.fallbacks) == ("transformer", ())
    assert d.excluded == {"mamba": Excluded(Exclusion.unhealthy, "unhealthy"),
                          "trm": Excluded(Exclusion.modality, "does not accept text input"),
                          "dinov2": Excluded(Exclusion.modality, "does not accept text input")}


@pytest.mark.parametrize("case,f,states,name,kind,reason", [
    ("modality", feat(), {}, "trm", Exclusion.modality, "does not accept text input"),
    ("task", feat(task="code_repair"), {}, "mamba", Exclusion.task, "does not serve task code_repair"),
    ("adapter", feat(model="auto:sql"), {}, "mamba", Exclusion.adapter, "has no adapter 'sql'"),
    ("context", feat(tokens=9000), {}, "transformer", Exclusion.context,
     "context 8192 < 9000 prompt + 64 new tokens"),
    ("unhealthy", feat(), {"mamba": BackendState(healthy=False)}, "mamba", Exclusion.unhealthy, "unhealthy"),
])
def test_each_exclusion_has_a_kind_and_a_reason(policy: Policy, case, f, states, name, kind, reason):
    excluded = policy.decide(f, states).excluded
    assert excluded[name] == Excluded(kind, reason) and str(excluded[name]) == reason


def x(kind: Exclusion) -> Excluded:
    """An exclusion whose reason shares no word with today's wording."""
    return Excluded(kind, "zzz reworded")


# (case, features, exclusions, RoutingError kind, param): _no_route decides on kinds only
NO_ROUTE = [
    ("modality alone", feat(), {"a": x(Exclusion.modality)}, "invalid", "model"),
    ("task alone", feat(), {"a": x(Exclusion.task)}, "invalid", "model"),
    ("adapter, one asked for", feat(model="a:sql"), {"a": x(Exclusion.adapter)}, "not_found", "model"),
    ("adapter with another kind", feat(model="auto:sql"), {"a": x(Exclusion.adapter), "b": x(Exclusion.context)},
     "invalid", "messages"),
    ("forbidden alone", feat(), {"a": x(Exclusion.forbidden)}, "forbidden", "model"),
    ("forbidden, the rest cannot serve it", feat(), {"a": x(Exclusion.forbidden), "b": x(Exclusion.modality),
                                                     "c": x(Exclusion.task)}, "forbidden", "model"),
    ("forbidden, another too short", feat(), {"a": x(Exclusion.forbidden), "b": x(Exclusion.context)},
     "invalid", "messages"),
    ("forbidden, another unhealthy", feat(), {"a": x(Exclusion.forbidden), "b": x(Exclusion.unhealthy)},
     "unavailable", None),
    ("context alone", feat(), {"a": x(Exclusion.context)}, "invalid", "messages"),
    ("unhealthy alone", feat(), {"a": x(Exclusion.unhealthy)}, "unavailable", None),
    ("unhealthy with another kind", feat(), {"a": x(Exclusion.unhealthy), "b": x(Exclusion.context)},
     "unavailable", None),
]


@pytest.mark.parametrize("case,f,excluded,kind,param", NO_ROUTE, ids=[c[0] for c in NO_ROUTE])
def test_no_route_branches_on_the_kind_not_the_reason(case, f, excluded, kind, param):
    err = _no_route(f, "text_generation", excluded)
    assert (err.kind, err.param) == (kind, param)
    assert "a zzz reworded" in err.message  # the reasons still reach people


def test_every_exclusion_kind_maps_to_one_error_kind():
    expected = {Exclusion.modality: "invalid", Exclusion.task: "invalid", Exclusion.adapter: "not_found",
                Exclusion.forbidden: "forbidden", Exclusion.context: "invalid", Exclusion.unhealthy: "unavailable",
                Exclusion.output: "invalid"}
    assert set(expected) == set(Exclusion)
    for kind, error in expected.items():
        for reason in (x(kind).reason, str(kind), "unhealthy", "does not accept text", "context 1 < 2"):
            assert _no_route(feat(model="a:sql"), "text_generation", {"a": Excluded(kind, reason)}).kind == error


def test_an_answer_that_must_carry_logprobs_or_json_goes_only_where_they_are_made():
    caps = {"lm": Capability(modalities=["text"], tasks={"text_generation": 0.5}, max_context=100,
                             outputs=["logprobs", "structured"]),
            "plain": Capability(modalities=["text"], tasks={"text_generation": 1.0}, max_context=100)}
    policy = Policy(caps, RoutingConfig())
    assert policy.decide(feat(max_new=1, tokens=1)).backend == "plain"
    for outputs in ({"logprobs"}, {"structured"}, {"logprobs", "structured"}):
        decision = policy.decide(replace(feat(max_new=1, tokens=1), outputs=frozenset(outputs)))
        assert (decision.backend, decision.fallbacks) == ("lm", ())
        assert decision.excluded["plain"].kind is Exclusion.output
    with pytest.raises(RoutingError) as err:  # pinned to a backend that cannot: a 400 naming why
        policy.decide(replace(feat(model="plain", max_new=1, tokens=1), outputs=frozenset({"logprobs"})))
    assert err.value.kind == "invalid" and "cannot give logprobs output" in err.value.message


def test_load_lowers_the_score(policy: Policy):
    idle = policy.decide(feat())
    busy = policy.decide(feat(), {"transformer": BackendState(in_flight=8, capacity=8)})
    assert busy.scores["transformer"] == pytest.approx(idle.scores["transformer"] * 0.9)
    assert busy.scores["mamba"] == idle.scores["mamba"]


def test_score_follows_the_weights(policy: Policy):
    f = feat(tokens=1000, max_new=24)
    cap = policy.backends["transformer"]
    expected = 0.4 * 1.0 + 0.2 * cap.strength + 0.2 * cap.efficiency + 0.2 * (1 - 1024 / cap.max_context)
    assert policy.decide(f).scores["transformer"] == pytest.approx(expected, abs=1e-6)


def test_heavy_load_can_flip_the_choice():
    caps = {"a": Capability(modalities=["text"], tasks={"text_generation": 1.0}, max_context=100),
            "b": Capability(modalities=["text"], tasks={"text_generation": 0.9}, max_context=100)}
    policy = Policy(caps, RoutingConfig(weights={"load": 0.5}))
    f = feat(max_new=1, tokens=1)
    assert policy.decide(f).backend == "a"
    assert policy.decide(f, {"a": BackendState(in_flight=4, capacity=4)}).backend == "b"


def test_rule_needs_a_condition():
    with pytest.raises(ValueError, match="needs min_tokens"):
        Rule(name="empty", task="long_context")


def test_affinity_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Capability(modalities=["text"], tasks={"text_generation": 1.5}, max_context=10)


def test_unknown_config_key_is_refused():
    with pytest.raises(ValueError, match="extra"):
        RoutingConfig(weigths={})


@pytest.mark.parametrize("model,expected", [("auto", (None, None)), ("mamba", ("mamba", None)),
                                            ("transformer:sql", ("transformer", "sql")), ("auto:x", (None, "x"))])
def test_split_model(model, expected):
    assert split_model(model) == expected


def test_count_pages():
    assert count_pages([Document("a", 1), Document("b", 1), Document("c")]) == 2
    assert count_pages([]) == 0


def test_app_config_rejects_duplicates_and_reserved(cfg: AppConfig):
    args = cfg.model_dump()
    args["backends"].append(args["backends"][0])
    with pytest.raises(ValueError, match="unique"):
        AppConfig.model_validate(args)
    args["backends"][-1] = {**args["backends"][0], "name": "router"}
    with pytest.raises(ValueError, match="reserved"):
        AppConfig.model_validate(args)


# --- degraded fallback -------------------------------------------------------------


def test_a_backend_too_short_for_the_prompt_is_a_degraded_last_resort(policy):
    d = policy.decide(feat(tokens=9000))
    assert d.candidates == ("mamba", "transformer")
    assert d.degraded == {"transformer": "context 8192 < 9000 prompt + 64 new tokens: the prompt's middle was cut"}
    assert d.excluded["transformer"].kind is Exclusion.context  # never a full candidate
    assert policy.decide(feat(tokens=100)).degraded == {}


@pytest.mark.parametrize("case,f,states", [
    ("pinned to mamba", feat(tokens=9000, model="mamba"), {}),
    ("transformer unhealthy", feat(tokens=9000), {"transformer": BackendState(healthy=False)}),
    ("max_tokens takes most of the context", feat(tokens=9000, max_new=5000), {}),
])
def test_no_degraded_fallback(policy, case, f, states):
    assert policy.decide(f, states).degraded == {}


def test_the_degraded_fallback_serves_when_the_backend_with_the_context_is_unhealthy(policy):
    d = policy.decide(feat(tokens=9000), {"mamba": BackendState(healthy=False)})
    assert d.candidates == ("transformer",) and "degraded" in d.reason
    assert d.degraded["transformer"].startswith("context 8192 < 9000")


def test_nothing_degraded_when_no_backend_takes_the_whole_prompt(policy):
    with pytest.raises(RoutingError, match="no backend can serve"):
        policy.decide(feat(tokens=70000))


# --- routing by measured cost --------------------------------------------------------

FLAT = CostModel(prefill_s=[0.05, 4e-4], decode_ms=[8.0])  # a Mamba: slower at first, flat decode
GROWING = CostModel(prefill_s=[0.02, 1e-4, 2e-8], decode_ms=[4.0, 2e-3])  # a transformer


@pytest.fixture(scope="module")
def by_cost(cfg: AppConfig) -> Policy:
    caps = {b.name: b.capability for b in cfg.backends}
    caps["mamba"] = caps["mamba"].model_copy(update={"cost": FLAT, "quality": None})  # cost alone
    caps["transformer"] = caps["transformer"].model_copy(update={"cost": GROWING, "quality": None})
    return Policy(caps, cfg.routing.model_copy(update={"strategy": "cost"}))


def test_cost_model_prediction():
    assert GROWING.predict_s(1000, 100) == pytest.approx(0.02 + 0.1 + 0.02 + 100 * (4.0 + 2e-3 * 1050) / 1000)
    assert FLAT.predict_s(0, 0) == pytest.approx(0.05)
    assert CostModel(prefill_s=[-1.0], decode_ms=[-1.0]).predict_s(10, 10) == 0  # a fit never predicts < 0


@pytest.mark.parametrize("tokens,new,backend", [
    (100, 16, "transformer"),  # short: the transformer's cheaper prefill and decode
    (500, 500, "transformer"),
    (3000, 500, "mamba"),  # long decode at long context: the transformer's per-token cost has grown
    (6000, 1000, "mamba"),
])
def test_cost_strategy_picks_the_lowest_predicted_latency(by_cost, tokens, new, backend):
    d = by_cost.decide(feat(tokens=tokens, max_new=new))
    assert d.backend == backend, d.predicted_s
    assert d.predicted_s[backend] == min(d.predicted_s.values())
    assert "lowest predicted latency" in d.reason
    assert set(d.predicted_s) == {"mamba", "transformer"}  # trm and dinov2 have no cost model


def test_load_scales_the_prediction(by_cost):
    f = feat(tokens=100, max_new=16)
    busy = {"transformer": BackendState(in_flight=16, capacity=16)}
    d = by_cost.decide(f, busy)
    assert d.predicted_s["transformer"] == pytest.approx(2 * by_cost.decide(f).predicted_s["transformer"], rel=1e-4)


def test_cost_strategy_still_filters_by_task_and_modality(by_cost):
    assert by_cost.decide(feat(modality="grid", task="puzzle_solving")).backend == "trm"  # no cost model: by score
    assert by_cost.decide(feat(tokens=1, max_new=0, modality="image", task="image_classification")).backend == "dinov2"
    assert by_cost.decide(feat(tokens=100, task="code_analysis")).predicted_s  # both LMs serve it


# --- quality against cost ---------------------------------------------------------------

def with_quality(cfg: AppConfig, margin: float | None, mamba: dict, transformer: dict) -> Policy:
    """Mamba the cheaper for long decodes (FLAT), with the given bits per byte per task."""
    caps = {b.name: b.capability for b in cfg.backends}
    for name, cost, bpb in (("mamba", FLAT, mamba), ("transformer", GROWING, transformer)):
        caps[name] = caps[name].model_copy(update={"cost": cost, "quality": Quality(bits_per_byte=bpb) if bpb else None})
    return Policy(caps, cfg.routing.model_copy(update={"strategy": "cost", "quality_margin": margin}))


LONG_DECODE = {"tokens": 3000, "max_new": 500}  # mamba predicted faster (test_cost_strategy_picks...)


@pytest.mark.parametrize("margin,mamba_bpb,backend,fallbacks", [
    (0.0, 1.2, "transformer", ("mamba",)),  # always the best quality
    (0.0, 1.0, "mamba", ("transformer",)),  # a tie: both are the best, the faster first
    (0.1, 1.2, "transformer", ("mamba",)),  # 0.2 worse, beyond 0.1: the better one, though slower
    (0.25, 1.2, "mamba", ("transformer",)),  # within the margin: the faster
    (None, 3.0, "mamba", ("transformer",)),  # quality ignored: always the cheapest
    (10.0, 3.0, "mamba", ("transformer",)),  # a margin wide enough is the same
])
def test_the_fastest_within_the_quality_margin(cfg, margin, mamba_bpb, backend, fallbacks):
    policy = with_quality(cfg, margin, {"text_generation": mamba_bpb}, {"text_generation": 1.0})
    d = policy.decide(feat(**LONG_DECODE, task="text_generation"))
    assert (d.backend, d.fallbacks) == (backend, fallbacks), (d.predicted_s, d.quality, d.reason)
    assert d.quality == {"mamba": mamba_bpb, "transformer": 1.0}
    if backend == "mamba" and margin is not None:
        assert f"within {margin:g} bits/byte of the best quality for text_generation (1.000)" in d.reason


def test_a_backend_not_measured_on_the_task_follows_the_measured_ones(cfg):
    policy = with_quality(cfg, 0.25, {"code_generation": 1.0}, {"text_generation": 1.0})
    d = policy.decide(feat(**LONG_DECODE, task="text_generation"))
    assert (d.backend, d.fallbacks, d.quality) == ("transformer", ("mamba",), {"transformer": 1.0})
    nobody = with_quality(cfg, 0.25, {}, {})  # no quality anywhere: latency alone, as before
    assert nobody.decide(feat(**LONG_DECODE, task="text_generation")).backend == "mamba"


def test_a_pinned_backend_ignores_quality(cfg):
    policy = with_quality(cfg, 0.0, {"text_generation": 3.0}, {"text_generation": 1.0})
    assert policy.decide(feat(task="text_generation", model="mamba")).backend == "mamba"

    for name in ("mamba", "transformer"):
        cost, quality = cfg.backend(name).capability.cost, cfg.backend(name).capability.quality
        assert cost is not None and "bench.long_context" in cost.measured
        assert quality is not None and "bench.quality" in quality.measured
    assert cfg.routing.strategy == "cost"


# --- a grid that language models take as text (code_repair on /v1/refine) -----------------------

def code_repair(model: str = "auto") -> tuple[Features, Features]:
    grid = feat("", tokens=0, max_new=0, modality="grid", task="code_repair", endpoint="refine", model=model)
    return grid, Features(**{**grid.__dict__, "modality": "text", "tokens": 40, "max_new_tokens": 56})


def test_code_repair_goes_to_trm_then_to_the_transformer_as_text(policy):
    grid, text = code_repair()
    d = policy.decide(grid, as_text=text)
    assert d.candidates == ("trm", "transformer") and d.as_text == ("transformer",)
    assert "transformer" not in d.excluded  # it is a candidate, as text


def test_code_repair_goes_as_text_alone_when_trm_cannot(policy):
    grid, text = code_repair()
    d = policy.decide(grid, {"trm": BackendState(healthy=False)}, text)
    assert d.candidates == ("transformer",) and d.as_text == ("transformer",) and d.reason.endswith("(as text)")
    grid, text = code_repair(model="transformer")
    pinned = policy.decide(grid, as_text=text)
    assert pinned.candidates == ("transformer",) and pinned.as_text == ("transformer",)


def test_code_repair_without_a_text_backend_keeps_the_grid_decision_or_its_error(policy):
    grid, text = code_repair(model="trm")
    assert policy.decide(grid, None, text).candidates == ("trm",)  # pinned trm: the text decision fails
    with pytest.raises(RoutingError, match="trm unhealthy"):
        policy.decide(grid, {n: BackendState(healthy=False) for n in ("trm", "transformer")}, text)


@pytest.mark.parametrize("case,f,backend", [
    ("chat", feat("hello there"), "transformer"),
    ("code", feat("def add(a, b):", task="code_generation"), "transformer"),
    ("a long document within SmolLM2's 8192 tokens", feat(tokens=5000), "transformer"),
    ("beyond 8192 tokens only the Mamba has the context", feat(tokens=9000), "mamba"),
    ("model pins", feat("hello there", model="mamba"), "mamba"),
])
def test_the_shipped_default_sends_what_smollm2_fits_to_it(cfg, case, f, backend):
    """With the measured quality (SmolLM2 far ahead on every task) and the default margin."""
    d = Policy({b.name: b.capability for b in cfg.backends}, cfg.routing).decide(f)
    assert d.backend == backend, (case, d.reason)
