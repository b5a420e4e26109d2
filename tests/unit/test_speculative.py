"""models.speculative on tiny seeded Llamas: greedy output equals transformers' greedy output for
both proposers, a draft that is the model itself is always accepted, and the n-gram lookup finds
what it should."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from models import lean_llama, speculative

VOCAB = 64


def _llama(seed: int, hidden: int, layers: int, **extra) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, eos_token_id=1,
                      pad_token_id=0, **extra)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def main() -> LlamaForCausalLM:
    return _llama(0, 64, 2)


def _prompt(seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    block = torch.randint(2, VOCAB, (12,), generator=g).tolist()
    return block + [5, 6] + block[:4]  # a repeat, so the lookup has something to find


def _plain(model, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _spec(model, prompt: list[int], proposer, n: int, pick=speculative.greedy) -> tuple[list[int], speculative.Stats]:
    made: list[int] = []
    stats = speculative.Stats()

    def emit(new: list[int]) -> bool:
        made.extend(new)
        return False

    no_eos = lambda logits: pick(logits.index_fill(-1, torch.tensor([1]), float("-inf")))  # noqa: E731
    speculative.generate(model, prompt, proposer, no_eos, emit, n, stats)
    return made, stats


@pytest.mark.parametrize("seed", range(4))
def test_prompt_lookup_keeps_greedy_output(main, seed):
    prompt = _prompt(seed)
    made, stats = _spec(main, prompt, speculative.PromptLookup(k=6), 40)
    assert made == _plain(main, prompt, 40)
    assert stats.rounds < 40  # it did speculate


@pytest.mark.parametrize("seed", range(3))
def test_draft_model_keeps_greedy_output(main, seed):
    prompt = _prompt(seed)
    made, _ = _spec(main, prompt, speculative.DraftModel(_llama(1, 32, 1), k=4, max_len=128), 33)
    assert made == _plain(main, prompt, 33)


def test_a_draft_that_is_the_model_is_always_accepted(main):
    made, stats = _spec(main, _prompt(9), speculative.DraftModel(main, k=4, max_len=128), 41)
    assert made == _plain(main, _prompt(9), 41)
    assert stats.accepted == stats.proposed > 0
    assert stats.rounds == 8  # 1 token from the prefill, then 8 rounds of 4 guesses + 1


def test_a_draft_the_lean_forward_does_not_cover_uses_transformers(main):
    biased = _llama(1, 32, 1, attention_bias=True)
    assert not lean_llama.supports(biased)
    draft = speculative.DraftModel(biased, k=4, max_len=128)
    assert draft.lean is None
    made, _ = _spec(main, _prompt(1), draft, 33)
    assert made == _plain(main, _prompt(1), 33)


def test_lean_forward_gives_transformers_logits():
    model = _llama(2, 64, 2, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    assert lean_llama.supports(model)
    ids = torch.randint(2, VOCAB, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expect = model(input_ids=ids).logits[0]
    lean = lean_llama.LeanLlama(model)
    cache = lean.cache(max_len=64)
    torch.testing.assert_close(lean.forward(cache, ids[0, :30].tolist()), expect[29])  # a prompt
    torch.testing.assert_close(lean.forward(cache, ids[0, 30:34].tolist()), expect[33])  # guesses checked together
    cache.crop(31)  # three of them refused
    torch.testing.assert_close(lean.forward(cache, ids[0, 31:32].tolist()), expect[31])
    with pytest.raises(ValueError, match="holds 64 positions"):
        lean.forward(cache, list(range(40)))


def test_max_new_tokens_is_exact_whatever_the_guesses(main):
    for n in (1, 2, 7):
        made, _ = _spec(main, _prompt(1), speculative.DraftModel(main, k=5, max_len=128), n)
        assert len(made) == n


def test_emit_stops_generation(main):
    seen: list[list[int]] = []
    speculative.generate(main, _prompt(2), speculative.PromptLookup(k=4), speculative.greedy,
                         lambda new: seen.append(new) or len(seen) == 3, 100)
    assert len(seen) == 3


def test_sampling_near_zero_temperature_is_greedy(main):
    prompt = _prompt(3)
    # 1e-6: two logits are 2e-4 apart at one step, which a temperature of 1e-4 could still swap
    made, _ = _spec(main, prompt, speculative.PromptLookup(k=4), 30, speculative.sampler(1e-6, 1.0))
    assert made == _plain(main, prompt, 30)
    made, _ = _spec(main, prompt, speculative.PromptLookup(k=4), 30, speculative.sampler(1.0, 1e-6))
    assert made == _plain(main, prompt, 30)


def test_sampling_draws_from_the_whole_distribution():
    logits = torch.zeros(4000, 8)
    draws = speculative.sampler(1.0, 1.0, torch.Generator().manual_seed(0))(logits)
    counts = torch.bincount(draws, minlength=8)
    assert counts.min() > 400  # uniform: 500 each
    top = speculative.sampler(1.0, 0.3, torch.Generator().manual_seed(0))(torch.tensor([[3.0, 2.0, 0.0, 0.0]] * 200))
    assert set(top.tolist()) == {0}  # the nucleus of 0.3 holds the top token alone


@pytest.mark.parametrize("tokens, expect", [
    ([1, 2, 3, 4, 9, 1, 2, 3], [4, 9, 1]),  # the 3-gram 1 2 3 was followed by 4 9 1
    ([7, 8, 5, 7, 8, 6, 7, 8], [6, 7, 8]),  # the latest earlier occurrence wins
    ([1, 2, 3], []),  # nothing repeats
    ([4, 4], [4]),
])
def test_prompt_lookup_proposals(tokens, expect):
    assert speculative.PromptLookup(k=3).propose(tokens) == expect


def test_only_the_model_types_the_loop_was_tested_for_speculate(main):
    """Decided from the config's public model_type, so a transformers release that moves a class's
    internals cannot make the loop accept a model it would decode wrongly."""
    from transformers import GPT2Config, GPT2LMHeadModel

    assert speculative.supports(main)
    other = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2)).eval()
    assert not speculative.supports(other)
    with pytest.raises(ValueError, match="not available for gpt2"):
        speculative.generate(other, [2, 3], speculative.PromptLookup(4), speculative.greedy, lambda _: False, 4)
