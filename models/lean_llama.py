"""A lean forward for small Llama models with a preallocated KV cache: the draft's forward in
speculative decoding (models.speculative.DraftModel).

Why: a draft is worth its cost only when its forward is much cheaper than the target's. At the
embedded models' sizes both forwards are Python and op-launch overhead, not arithmetic, so
transformers' forward of the 2-layer draft (0.76 ms a token here) costs a third of the 4-layer
target's (2.2 ms), and drafting 4 tokens costs two target steps. This forward computes the same
thing with fewer ops: fused q/k/v and gate/up projections, torch's rms_norm, one rotary pass over
queries and keys together, a cache written in place instead of concatenated. On GPUs vLLM gets
the same effect by capturing the draft's forward in a CUDA graph.

Its output only steers speculation: the target checks every guess, so a difference from
transformers' logits could cost speed, never correctness. tests/unit/test_speculative.py still checks
that both give the same logits.

Covers Llama and Mistral checkpoints without biases, sliding windows or length-dependent rotary
embeddings; `supports` says which, and DraftModel uses transformers' forward for the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

_STATIC_ROPE = {"default", "linear", "llama3", "yarn"}  # cos/sin do not depend on the length


def supports(model: torch.nn.Module) -> bool:
    cfg = model.config
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
    return (cfg.model_type in ("llama", "mistral") and rope in _STATIC_ROPE
            and not getattr(cfg, "attention_bias", False) and not getattr(cfg, "mlp_bias", False)
            and cfg.hidden_act == "silu" and getattr(cfg, "pretraining_tp", 1) == 1
            and getattr(cfg, "sliding_window", None) is None and not hasattr(model, "peft_config"))


class LeanLlama:
    """The forward, over a model's weights (shared, except the fused projections, made once).
    `cache(max_len)` makes a sequence's KV cache; `forward(cache, ids)` appends ids to it and
    returns the last position's logits; `cache.crop(n)` keeps its first n positions."""

    def __init__(self, model: torch.nn.Module):
        cfg = model.config
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.eps = cfg.rms_norm_eps
        inner = self.inner = model.model
        self.embed, self.norm, self.lm_head = inner.embed_tokens.weight, inner.norm.weight, model.lm_head.weight
        self.layers = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append((
                layer.input_layernorm.weight,
                torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach(),
                a.o_proj.weight,
                layer.post_attention_layernorm.weight,
                torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach(),
                m.down_proj.weight,
            ))

    @torch.inference_mode()
    def cache(self, max_len: int) -> Cache:
        p = self.embed
        shape = (len(self.layers), 1, self.kv_heads, max_len, self.head_dim)
        k, v = torch.zeros(shape, dtype=p.dtype, device=p.device), torch.zeros(shape, dtype=p.dtype, device=p.device)
        cos, sin = self.inner.rotary_emb(k[0], torch.arange(max_len, device=p.device)[None])  # transformers' own
        return Cache(k, v, cos[0].to(p.dtype), sin[0].to(p.dtype))

    @torch.inference_mode()
    def forward(self, cache: Cache, ids: list[int]) -> torch.Tensor:
        """Logits (vocab,) after `ids`, appended at the cache's end."""
        start, T = cache.len, len(ids)
        end = start + T
        if end > cache.max_len:
            raise ValueError(f"the draft's cache holds {cache.max_len} positions, {end} asked")
        H, Hkv, D = self.heads, self.kv_heads, self.head_dim
        cos, sin = cache.cos[start:end], cache.sin[start:end]
        half = D // 2
        mask = None
        if T > 1:  # query i sees the cache and the new positions up to its own
            mask = torch.ones(T, end, dtype=torch.bool, device=cos.device).tril(start)
        x = F.embedding(torch.tensor([ids], device=cos.device), self.embed)
        for i, (ln1, qkv_w, o_w, ln2, gate_up_w, down_w) in enumerate(self.layers):
            h = F.rms_norm(x, (x.shape[-1],), ln1, self.eps)
            qkv = F.linear(h, qkv_w).view(1, T, H + 2 * Hkv, D).transpose(1, 2)  # (1, heads, T, D)
            qk, v = qkv[:, : H + Hkv], qkv[:, H + Hkv:]
            rotated = torch.cat([-qk[..., half:], qk[..., :half]], dim=-1)
            qk = qk * cos + rotated * sin
            cache.k[i, :, :, start:end] = qk[:, H:]
            cache.v[i, :, :, start:end] = v
            att = F.scaled_dot_product_attention(qk[:, :H], cache.k[i, :, :, :end], cache.v[i, :, :, :end],
                                                 attn_mask=mask, enable_gqa=H != Hkv)
            x = x + F.linear(att.transpose(1, 2).reshape(1, T, H * D), o_w)
            h = F.rms_norm(x, (x.shape[-1],), ln2, self.eps)
            gate, up = F.linear(h, gate_up_w).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, down_w)
        cache.len = end
        return F.linear(F.rms_norm(x[0, -1], (x.shape[-1],), self.norm, self.eps), self.lm_head)


@dataclass
class Cache:
    """One sequence's keys and values, (layers, 1, kv_heads, max_len, head_dim), its first `len`
    positions filled, and the rotary cos/sin of every position."""

    k: torch.Tensor
    v: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    len: int = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def crop(self, n: int) -> None:
        self.len = min(self.len, n)
