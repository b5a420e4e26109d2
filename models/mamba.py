"""Mamba-1 forward from a given state, in PyTorch, over the weights of transformers' MambaForCausalLM.

transformers runs a multi-token forward from zero state only (its scan has no initial state, like
the mamba-ssm kernel), and one token at a time from a cached state. Speculative decoding needs a
third thing: k tokens at once from the cached state, and the state after each of them, so that the
state can be rolled back to the last accepted token without a second forward. `forward` does that.

The same function trains the embedded default: transformers' reference scan indexes a (batch, dim,
time, state) tensor step by step, and the backward of each index allocates the whole tensor again
(100 s a step for the tiny default on 2 cores); stepping over `unbind`ed slices costs about 1 s.

The modules are called as modules (in_proj, x_proj, out_proj, embeddings), so peft adapters on them
apply here as they do in transformers. dt_proj is read as a Linear too, unlike in transformers.

`use_fast_conv` replaces transformers' PyTorch fallback for the causal conv (used when the
causal-conv1d package is missing) by a multiply-add over the K taps: torch's depthwise conv1d costs
about 0.8 ms a call on this 2-core CPU for one decoding step, the multiply-add about 30 us, and a
decoding step of the 4-layer default makes 4 such calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import importlib.util

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN


@dataclass
class State:
    """Per layer: the conv's last K-1 inputs (batch, inner, K-1) and the SSM state (batch, inner, N)."""

    conv: list[torch.Tensor]
    ssm: list[torch.Tensor]

    def rows(self, index: torch.Tensor) -> State:
        """The states of the batch rows at `index` (1-D, long): a continuous batch dropping finished rows."""
        return State([c.index_select(0, index) for c in self.conv], [h.index_select(0, index) for h in self.ssm])

    @staticmethod
    def cat(states: list[State]) -> State:
        """Several batches' states as one batch, rows in order: requests joining a continuous batch."""
        return State([torch.cat(layer) for layer in zip(*(s.conv for s in states))],
                     [torch.cat(layer) for layer in zip(*(s.ssm for s in states))])


class Trajectory:
    """The states after each of the T positions of one forward, as a sequence built on demand: a
    rollback needs one of them, and building all T (8 slices each for the 4-layer default) cost
    about as much as the forward's scan."""

    def __init__(self, convs: list[torch.Tensor], ssms: list[torch.Tensor], k: int):
        self.convs, self.ssms, self.k = convs, ssms, k  # per layer: (batch, inner, K-1+T), (batch, T, inner, N)

    def __len__(self) -> int:
        return self.ssms[0].shape[1]

    def __getitem__(self, t: int) -> State:
        t = range(len(self))[t]
        return State([c[..., t + 1:t + 1 + self.k] for c in self.convs], [h[:, t] for h in self.ssms])


def zero_state(model: torch.nn.Module, batch: int = 1) -> State:
    cfg, p = model.config, next(model.parameters())
    conv = [torch.zeros(batch, cfg.intermediate_size, cfg.conv_kernel - 1, device=p.device, dtype=p.dtype)
            for _ in range(cfg.num_hidden_layers)]
    ssm = [torch.zeros(batch, cfg.intermediate_size, cfg.state_size, device=p.device, dtype=torch.float32)
           for _ in range(cfg.num_hidden_layers)]
    return State(conv, ssm)


def depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Valid depthwise 1-D convolution: x (batch, D, L), weight (D, K) -> (batch, D, L - K + 1)."""
    out = (x.unfold(-1, weight.shape[-1], 1) * weight[:, None, :]).sum(-1)
    return out if bias is None else out + bias[:, None]


def _conv_update(hidden_states, conv_state, weight, bias=None, activation=None):
    """transformers' causal_conv1d_update (same arguments, same in-place state update) as a multiply-add."""
    seq_len, state_len = hidden_states.shape[-1], conv_state.shape[-1]
    x = torch.cat([conv_state, hidden_states], dim=-1).to(weight.dtype)
    conv_state.copy_(x[:, :, -state_len:])
    out = depthwise_conv(x, weight, bias)[..., -seq_len:]
    if activation is not None:
        out = ACT2FN[activation](out)
    return out.to(hidden_states.dtype)


ORIGINAL_CONV_UPDATE = None  # transformers' own, kept by use_fast_conv (tests compare the two)


def use_fast_conv() -> bool:
    """Installs `_conv_update` as transformers' Mamba conv step when causal-conv1d is not installed
    (the kernel, when present, is left alone). Process-wide; returns whether it did."""
    global ORIGINAL_CONV_UPDATE
    if importlib.util.find_spec("causal_conv1d") is not None:
        return False
    from transformers.models.mamba import modeling_mamba

    if ORIGINAL_CONV_UPDATE is None:
        ORIGINAL_CONV_UPDATE = modeling_mamba.causal_conv1d_update
    modeling_mamba.causal_conv1d_update = _conv_update
    return True


def state_from_cache(model: torch.nn.Module, cache) -> State:
    """The State after a transformers forward with `use_cache=True`: its conv states hold the last K
    inputs of each layer's conv (left zero-padded for short prompts), of which the next step needs K-1."""
    k = model.config.conv_kernel - 1
    layers = range(model.config.num_hidden_layers)
    return State([cache.get_conv_state(i)[..., -k:].clone() for i in layers],
                 [cache.get_recurrent_state(i).float().clone() for i in layers])


# Time steps a prefill's scan takes at once: their (batch, steps, inner, N) decays and inputs, 2**18 floats
# (1 MB), stay in cache. A 256-token prompt of the default took 41 ms on one thread with the whole prompt's
# at once (8 MB a layer, stacked again for y), 29 ms in chunks with each state written over its input.
SCAN_FLOATS = 2**18


def _scan(dt: torch.Tensor, A: torch.Tensor, x: torch.Tensor, B: torch.Tensor, C: torch.Tensor, h0: torch.Tensor,
          keep: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The selective scan h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t, y_t = C_t h_t from h0, float32: dt and x
    (batch, T, inner), B and C (batch, T, N). Returns y (batch, T, inner) and the states after every position
    (keep: (batch, T, inner, N)) or the last one. Under autograd (training) out of place, each step one op (its
    Python cost is the scan's); else in chunks of time steps, each step's state written over its input."""
    batch, steps, inner = dt.shape
    grad = torch.is_grad_enabled()
    chunk = steps if keep or grad else max(1, SCAN_FLOATS // (batch * inner * A.shape[-1]))
    ys, h = [], h0
    for t0 in range(0, steps, chunk):
        part = slice(t0, t0 + chunk)
        hs = (dt[:, part] * x[:, part])[..., None] * B[:, part, None, :]  # the pushes, then the states
        decay = torch.exp(dt[:, part, :, None] * A)  # (batch, chunk, inner, N)
        if grad:  # out of place, each step one op (its Python cost is the scan's), stacked
            states = []
            for t in range(hs.shape[1]):
                h = torch.addcmul(hs[:, t], decay[:, t], h)
                states.append(h)
            hs = torch.stack(states, dim=1)
        else:
            for t in range(hs.shape[1]):
                h = hs[:, t].addcmul_(decay[:, t], h)
        ys.append(torch.einsum("btdn,btn->btd", hs, C[:, part]))
    return torch.cat(ys, dim=1) if len(ys) > 1 else ys[0], (hs if keep else h)


def _mixer(m: torch.nn.Module, hidden: torch.Tensor, conv0: torch.Tensor, h0: torch.Tensor, keep: bool):
    """One MambaMixer over `hidden` (batch, T, H) from (conv0, h0). Returns the output, the conv's whole
    input (batch, inner, K-1+T) and the SSM states after each position (keep) or the last one."""
    x, z = m.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)  # (batch, inner, T) each
    xin = torch.cat([conv0, x], dim=-1)
    x = m.act(depthwise_conv(xin, m.conv1d.weight[:, 0], m.conv1d.bias)).transpose(1, 2)
    dt, B, C = torch.split(m.x_proj(x), [m.time_step_rank, m.ssm_state_size, m.ssm_state_size], dim=-1)
    dt = F.softplus(m.dt_proj(dt).float())  # (batch, T, inner)
    A = -torch.exp(m.A_log.float())  # (inner, N)
    y, hs = _scan(dt, A, x.float(), B.float(), C.float(), h0, keep)
    y = (y + x.float() * m.D.float()) * F.silu(z.transpose(1, 2).float())
    return m.out_proj(y.to(hidden.dtype)), xin, hs


def forward(model: torch.nn.Module, ids: torch.Tensor, state: State | None = None, keep: bool = False,
            logits_to_keep: int = 0) -> tuple[torch.Tensor, Trajectory | State]:
    """Logits for `ids` (batch, T) after `state` (zero when None), and the state after the last token,
    or with `keep` the states after every token (a Trajectory of T), for rollback."""
    backbone = model.backbone
    state = state or zero_state(model, ids.shape[0])
    hidden = backbone.embeddings(ids)
    k = model.config.conv_kernel - 1
    convs, ssms = [], []
    for i, block in enumerate(backbone.layers):
        residual = hidden.float() if block.residual_in_fp32 else hidden
        out, xin, h = _mixer(block.mixer, block.norm(hidden.to(block.norm.weight.dtype)), state.conv[i],
                             state.ssm[i], keep)
        hidden = residual + out  # the residual stream stays float32 when residual_in_fp32, as in transformers
        convs.append(xin)
        ssms.append(h)
    hidden = backbone.norm_f(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
    logits = model.lm_head(hidden.to(model.lm_head.weight.dtype)).float()
    if not keep:
        return logits, State([c[..., -k:] for c in convs], ssms)
    return logits, Trajectory(convs, ssms, k)


def loss(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, labels -100 ignored (what transformers' `labels=` computes)."""
    logits, _ = forward(model, ids)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
