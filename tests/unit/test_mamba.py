"""models.mamba and Mamba speculation on tiny seeded Mambas: the forward from a state equals
transformers' forward, the rolled-back state continues exactly, peft adapters apply, and
prompt-lookup speculation keeps transformers' greedy output token for token."""

from __future__ import annotations

import pytest
import torch
from transformers import MambaConfig, MambaForCausalLM

from models import mamba, speculative

VOCAB = 64


def _mamba(seed: int = 0, hidden: int = 64, layers: int = 2) -> MambaForCausalLM:
    torch.manual_seed(seed)
    cfg = MambaConfig(vocab_size=VOCAB, hidden_size=hidden, state_size=8, num_hidden_layers=layers, expand=2,
                      conv_kernel=4, eos_token_id=1, pad_token_id=0)
    return MambaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model() -> MambaForCausalLM:
    return _mamba()


def _ids(seed: int, n: int = 30) -> torch.Tensor:
    return torch.randint(2, VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def test_forward_equals_transformers(model):
    ids = _ids(0)
    logits, _ = mamba.forward(model, ids)
    assert torch.allclose(logits, model(input_ids=ids).logits, atol=1e-4)


def test_chunked_scan_equals_the_differentiable_one_and_transformers(model, monkeypatch):
    """Without autograd the scan runs in chunks of time steps, in place; 7 steps a chunk here, so 30 tokens
    make 5 chunks, the last one short."""
    monkeypatch.setattr(mamba, "SCAN_FLOATS", 7 * 2 * model.config.intermediate_size * model.config.state_size)
    ids = _ids(4)
    with torch.inference_mode():
        chunked, state = mamba.forward(model, ids)
        expected = model(input_ids=ids).logits
    trained, trained_state = mamba.forward(model, ids)  # autograd on: the out-of-place path
    assert torch.allclose(chunked, trained.detach(), atol=1e-5)
    assert torch.allclose(chunked, expected, atol=1e-4)
    for ours, theirs in zip(state.ssm, trained_state.ssm):
        assert torch.allclose(ours, theirs.detach(), atol=1e-5)


@torch.inference_mode()
def test_forward_from_a_state_and_from_a_rolled_back_state(model):
    ids = _ids(1)
    full = model(input_ids=ids).logits
    _, state = mamba.forward(model, ids[:, :12])
    after, states = mamba.forward(model, ids[:, 12:20], state, keep=True)
    assert len(states) == 8
    assert torch.allclose(after, full[:, 12:20], atol=1e-4)
    # roll back to the state after position 15 (4 of the 8 kept) and continue from there
    rest, _ = mamba.forward(model, ids[:, 16:], states[3])
    assert torch.allclose(rest, full[:, 16:], atol=1e-4)


@torch.inference_mode()
def test_peft_adapters_apply_in_the_forward(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    lora = LoraConfig(r=4, target_modules=["in_proj", "x_proj", "embeddings"], init_lora_weights=False)
    tuned = get_peft_model(_mamba(), lora).eval()
    ids = _ids(2)
    ours, _ = mamba.forward(tuned, ids)
    assert torch.allclose(ours, tuned(input_ids=ids).logits, atol=1e-4)
    assert not torch.allclose(ours, model(input_ids=ids).logits, atol=1e-3)  # the adapter changed the output


def _plain(model, prompt: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("seed", range(4))
def test_prompt_lookup_keeps_greedy_output(model, seed):
    g = torch.Generator().manual_seed(seed)
    block = torch.randint(2, VOCAB, (12,), generator=g).tolist()
    prompt = block + [5, 6] + block * 2 + block[:4]
    made: list[int] = []
    stats = speculative.Stats()
    no_eos = lambda logits: speculative.greedy(logits.index_fill(-1, torch.tensor([1]), float("-inf")))  # noqa: E731
    speculative.generate(model, prompt, speculative.PromptLookup(k=6), no_eos,
                         lambda new: made.extend(new) or False, 40, stats)
    assert made == _plain(model, prompt, 40)
    assert stats.rounds < 40 and stats.proposed > 0  # it did speculate


def test_mamba2_is_refused_clearly():
    from transformers import Mamba2Config, Mamba2ForCausalLM

    cfg = Mamba2Config(vocab_size=VOCAB, hidden_size=64, num_heads=4, head_dim=32, state_size=8, num_hidden_layers=1,
                       n_groups=1, expand=2)
    model = Mamba2ForCausalLM(cfg).eval()
    assert not speculative.supports(model)
    with pytest.raises(ValueError, match="not available for mamba2"):
        speculative.generate(model, [2, 3], speculative.PromptLookup(4), speculative.greedy, lambda _: False, 4)


@torch.inference_mode()
def test_state_from_transformers_cache_equals_the_forwards_state(model):
    for n in (2, 20):  # shorter and longer than the conv kernel
        ids = _ids(5, n)[:1]
        out = model(input_ids=ids, use_cache=True)
        ours = mamba.state_from_cache(model, out.cache)
        _, state = mamba.forward(model, ids)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours.conv, state.conv))
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours.ssm, state.ssm))


def test_fast_conv_step_equals_transformers_own():
    from transformers.models.mamba import modeling_mamba

    mamba.use_fast_conv()
    original = mamba.ORIGINAL_CONV_UPDATE or modeling_mamba.causal_conv1d_update
    assert modeling_mamba.causal_conv1d_update is mamba._conv_update and original is not mamba._conv_update
    g = torch.Generator().manual_seed(0)
    x, state, w, b = (torch.randn(*s, generator=g) for s in ((2, 8, 1), (2, 8, 4), (8, 4), (8,)))
    state_ours = state.clone()
    expected = original(x, state, w, b, activation="silu")
    got = mamba._conv_update(x, state_ours, w, b, activation="silu")
    assert torch.allclose(got, expected, atol=1e-6) and torch.equal(state_ours, state)


@torch.inference_mode()
def test_states_join_a_batch_and_leave_it_by_rows(model):
    """Prompts of different lengths prefilled alone, their states put together: a step of the batch
    equals each row's step alone, and the rows kept after one leaves continue as they would alone."""
    ids = _ids(6, 20)
    _, a = mamba.forward(model, ids[:1, :7])
    _, b = mamba.forward(model, ids[1:, :15])
    step = torch.tensor([[3], [4]])
    together, state = mamba.forward(model, step, mamba.State.cat([a, b]))
    alone_a, _ = mamba.forward(model, step[:1], a)
    alone_b, b = mamba.forward(model, step[1:], b)
    assert torch.allclose(together, torch.cat([alone_a, alone_b]), atol=1e-5)
    after, _ = mamba.forward(model, torch.tensor([[5]]), state.rows(torch.tensor([1])))
    alone, _ = mamba.forward(model, torch.tensor([[5]]), b)
    assert torch.allclose(after, alone, atol=1e-5)

