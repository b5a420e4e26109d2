"""Tiny Recursive Model (Jolicoeur-Martineau 2025, arXiv 2510.04871), pure PyTorch.

One small network refines a latent z from (x, y, z) n times, then the answer y from (y, z);
this latent recursion runs T times per supervision step, only the last under gradient.
`forward` is one supervision step (the unit of deep supervision); `refine` repeats it up to
N_sup times at inference, halting each sample once its halting head says the answer is right.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

logger = logging.getLogger(__name__)


@dataclass
class TRMConfig:
    # Token scheme (the paper's sudoku data): 0 = pad (unused by 9x9 grids), 1 = blank cell,
    # 2..10 = digits 1..9, i.e. token = digit + 1. models/sudoku.py encodes and decodes it.
    vocab_size: int = 11
    seq_len: int = 81
    hidden_size: int = 128
    num_heads: int = 4  # attention mixer only
    # "mlp" mixes tokens with an MLP over the sequence (MLP-mixer), the paper's best on sudoku;
    # "attention" is non-causal self-attention, the paper's choice for larger grids; "axial" is
    # attention along the rows and along the columns of a `grid_shape` grid (the 64x48 code grid:
    # a cell sees its line and its column, at a fraction of full attention's cost). With "axial",
    # token 0 is padding: pad cells are not attended to, and the rows and columns past the batch's
    # last non-pad cell (plus one column, for a token the answer inserts) are not computed at all.
    mixer: Literal["attention", "mlp", "axial"] = "mlp"
    grid_shape: tuple[int, int] | None = None  # (rows, columns), axial mixer only
    expansion: float = 4.0  # SwiGLU width over hidden (and over seq_len in the mlp mixer)
    num_layers: int = 2  # layers in the one shared network
    n_latent: int = 6  # n: z-updates per latent recursion
    t_outer: int = 3  # T: latent recursions per supervision step, the first T-1 without gradient
    # The answer's logits start from the input token (plus a learned weight): for tasks whose answer
    # is mostly the input (code repair), the network learns only where to depart from it.
    copy_input: bool = False
    max_steps: int = 16  # N_sup: supervision steps at most
    halt_threshold: float = 0.5  # sigmoid(q) at which a sample stops

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "hidden_size", "num_heads", "num_layers", "n_latent",
                     "t_outer", "max_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TRMConfig.{name} must be a positive integer, got {value!r}")
        if self.vocab_size < 2:
            raise ValueError(f"TRMConfig.vocab_size must be at least 2, got {self.vocab_size}")
        if self.mixer not in ("attention", "mlp", "axial"):
            raise ValueError(f"TRMConfig.mixer must be 'attention', 'mlp' or 'axial', got {self.mixer!r}")
        if self.mixer == "axial":
            if self.grid_shape is None or len(self.grid_shape) != 2:
                raise ValueError("TRMConfig.grid_shape (rows, columns) is required by the axial mixer")
            self.grid_shape = tuple(self.grid_shape)  # a list after JSON
            if self.grid_shape[0] * self.grid_shape[1] != self.seq_len:
                raise ValueError(f"TRMConfig.grid_shape {self.grid_shape} does not hold seq_len {self.seq_len} cells")
        elif self.grid_shape is not None:
            raise ValueError("TRMConfig.grid_shape is for the axial mixer only")
        if self.mixer != "mlp" and self.hidden_size % self.num_heads:
            raise ValueError(f"TRMConfig.hidden_size {self.hidden_size} must be divisible by "
                             f"num_heads {self.num_heads} for the attention mixer")
        if not self.expansion > 0:
            raise ValueError(f"TRMConfig.expansion must be positive, got {self.expansion!r}")
        _check_threshold(self.halt_threshold, "TRMConfig.halt_threshold")


def _per_sample(value: int | float | torch.Tensor, batch: int, dtype: torch.dtype, device) -> torch.Tensor:
    if isinstance(value, bool):
        raise ValueError(f"expected a number or a tensor, got {value!r}")
    if isinstance(value, torch.Tensor):
        if value.shape != (batch,):
            raise ValueError(f"per-sample limits must have shape ({batch},), got {tuple(value.shape)}")
        return value.to(device=device, dtype=dtype)
    if dtype == torch.long and not isinstance(value, int):
        raise ValueError(f"max_steps must be a positive integer, got {value!r}")
    return torch.full((batch,), value, dtype=dtype, device=device)


def _check_threshold(value: float, name: str) -> None:
    if not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")


@dataclass
class Carry:
    """State kept between supervision steps, detached from the graph."""

    y: torch.Tensor  # (B, L, D) embedded current answer
    z: torch.Tensor  # (B, L, D) latent reasoning


@dataclass
class StepOutput:
    carry: Carry
    logits: torch.Tensor  # (B, L, V) answer logits
    q: torch.Tensor  # (B,) halting logit: "the current answer is correct"


@dataclass
class RefineOutput:
    tokens: torch.Tensor  # (B, L) argmax answer at each sample's last step
    steps: torch.Tensor  # (B,) supervision steps each sample ran
    confidence: torch.Tensor  # (B,) sigmoid(q) at that step


def _rms_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    # no learned scale, as the paper: post-norm keeps the recursed state bounded
    return F.rms_norm(x, (x.shape[-1],), eps=eps)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, expansion: float):
        super().__init__()
        inner = 16 * math.ceil(expansion * dim * 2 / 3 / 16)  # 2/3 keeps parameters as a 4x GELU MLP
        self.gate_up = nn.Linear(dim, 2 * inner, bias=False)
        self.down = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, L, Dh)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # non-causal: every cell sees the grid
        return self.out(y.transpose(1, 2).reshape(B, L, D))


class SeqMLP(nn.Module):
    """MLP-mixer token mixing: a SwiGLU across the sequence, shared over channels."""

    def __init__(self, seq_len: int, expansion: float):
        super().__init__()
        self.mlp = SwiGLU(seq_len, expansion)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x.transpose(1, 2)).transpose(1, 2)  # (B, D, L) -> (B, L, D)


def _extent(used: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample of (B, R, C) non-pad flags: rows up to the last used one, columns up to one past
    the last used one (room for a token the answer inserts), as (B,) counts."""
    R, C = used.shape[1:]
    rows = torch.where(used.any(2), torch.arange(1, R + 1, device=used.device), 0).amax(1)
    cols = torch.where(used.any(1), torch.arange(2, C + 2, device=used.device), 0).amax(1).clamp(max=C)
    return rows, cols


def _inside(rows: torch.Tensor, cols: torch.Tensor, R: int, C: int) -> torch.Tensor:
    """(B, R, C) bool: the cells within each sample's `_extent`."""
    return ((torch.arange(R, device=rows.device) < rows[:, None])[:, :, None]
            & (torch.arange(C, device=cols.device) < cols[:, None])[:, None, :])


@dataclass
class GridMasks:
    """Which keys a cell may attend to along its row and its column: non-pad cells, and itself."""

    rows: torch.Tensor  # (B * R, 1, C, C) bool
    cols: torch.Tensor  # (B * C, 1, R, R) bool

    @classmethod
    def of(cls, used: torch.Tensor) -> GridMasks:
        B, R, C = used.shape
        eye_c, eye_r = torch.eye(C, dtype=torch.bool, device=used.device), torch.eye(R, dtype=torch.bool, device=used.device)
        return cls(used.reshape(B * R, 1, 1, C) | eye_c, used.transpose(1, 2).reshape(B * C, 1, 1, R) | eye_r)


class AxialAttention(nn.Module):
    """Attention along each row plus attention along each column, on (B, R, C, D) cells."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.row, self.col = Attention(dim, heads), Attention(dim, heads)

    def forward(self, x: torch.Tensor, masks: GridMasks) -> torch.Tensor:
        B, R, C, D = x.shape
        rows = self.row(x.reshape(B * R, C, D), masks.rows).view(B, R, C, D)
        cols = self.col(x.transpose(1, 2).reshape(B * C, R, D), masks.cols).view(B, C, R, D).transpose(1, 2)
        return rows + cols


class Layer(nn.Module):
    def __init__(self, cfg: TRMConfig):
        super().__init__()
        if cfg.mixer == "axial":
            self.mix = AxialAttention(cfg.hidden_size, cfg.num_heads)
        elif cfg.mixer == "attention":
            self.mix = Attention(cfg.hidden_size, cfg.num_heads)
        else:
            self.mix = SeqMLP(cfg.seq_len, cfg.expansion)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.expansion)

    def forward(self, x: torch.Tensor, masks: GridMasks | None = None) -> torch.Tensor:
        x = _rms_norm(x + (self.mix(x) if masks is None else self.mix(x, masks)))
        return _rms_norm(x + self.mlp(x))


class Net(nn.Module):
    """The one tiny network, shared by the z- and the y-update."""

    def __init__(self, cfg: TRMConfig):
        super().__init__()
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))

    def forward(self, x: torch.Tensor, masks: GridMasks | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, masks)
        return x


class TRM(nn.Module):
    def __init__(self, config: TRMConfig):
        super().__init__()
        self.config = cfg = config
        D = cfg.hidden_size
        self.embed_scale = math.sqrt(D)  # embeddings start at std 1/sqrt(D) and enter at unit scale
        self.embed = nn.Embedding(cfg.vocab_size, D)
        # a grid's position is its row's embedding plus its column's: every row's is trained by
        # all of its cells, which matters for the rarely filled last rows of the code grid
        rows, cols = cfg.grid_shape or (cfg.seq_len, 0)
        self.pos = nn.Parameter(torch.empty(rows, D))
        self.col_pos = nn.Parameter(torch.empty(cols, D)) if cols else None
        self.y_init = nn.Parameter(torch.empty(D))
        self.z_init = nn.Parameter(torch.empty(D))
        self.net = Net(cfg)
        self.head = nn.Linear(D, cfg.vocab_size, bias=False)
        self.copy_weight = nn.Parameter(torch.tensor(4.0)) if cfg.copy_input else None
        self.q_head = nn.Linear(D, 1)  # on y mean-pooled over cells: no cell of a grid is special
        for p in (self.embed.weight, self.pos, self.col_pos):
            if p is not None:
                nn.init.trunc_normal_(p, std=1 / self.embed_scale)
        for p in (self.y_init, self.z_init):
            nn.init.trunc_normal_(p, std=1.0)
        # the paper starts the halting head at "not correct" so early training runs every step
        nn.init.zeros_(self.q_head.weight)
        nn.init.constant_(self.q_head.bias, -5.0)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def initial_carry(self, batch_size: int) -> Carry:
        shape = (batch_size, self.config.seq_len, self.config.hidden_size)
        return Carry(self.y_init.expand(shape), self.z_init.expand(shape))

    def embed_input(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed_scale * (self.embed(tokens) + self.pos) / math.sqrt(2)  # (B, L, D)

    def latent_recursion(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor,
                         masks: GridMasks | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        for _ in range(self.config.n_latent):
            z = self.net(x + y + z, masks)
        y = self.net(y + z, masks)
        return y, z

    def _recurse(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor,
                 masks: GridMasks | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            for _ in range(self.config.t_outer - 1):
                y, z = self.latent_recursion(x, y, z, masks)
        return self.latent_recursion(x, y, z, masks)

    def forward(self, carry: Carry, tokens: torch.Tensor) -> StepOutput:
        """One supervision step on puzzle `tokens` (B, L) from `carry`; the new carry is detached."""
        if self.config.mixer == "axial":
            return self._grid_step(carry, tokens)
        y, z = self._recurse(self.embed_input(tokens), carry.y, carry.z)
        q = self.q_head(y.mean(dim=1)).squeeze(-1)  # (B,)
        return StepOutput(Carry(y.detach(), z.detach()), self._answer(y, tokens), q)

    def _answer(self, y: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.head(y)
        if self.copy_weight is not None:
            logits = logits + self.copy_weight * F.one_hot(tokens, self.config.vocab_size).to(logits.dtype)
        return logits

    def _grid_step(self, carry: Carry, tokens: torch.Tensor) -> StepOutput:
        """forward() on the used part of the grid: a sample's rows up to its last non-pad cell and
        its columns up to one past its widest row (room for one inserted token); other cells keep
        their carry and answer pad. Pad cells are never attended to, so a sample's answer does not
        depend on its batch, and the batch computes only up to its largest sample."""
        (R, C), B, D = self.config.grid_shape, tokens.shape[0], self.config.hidden_size
        grid = tokens.view(B, R, C)
        used = grid != 0
        rows, cols = _extent(used)
        r, c = max(1, int(rows.max())), max(1, int(cols.max()))
        grid, used = grid[:, :r, :c], used[:, :r, :c]
        x = self.embed_scale * (self.embed(grid) + self.pos[:r, None] + self.col_pos[None, :c]) / math.sqrt(2)
        y0, z0 = carry.y.view(B, R, C, D), carry.z.view(B, R, C, D)
        y, z = self._recurse(x, y0[:, :r, :c], z0[:, :r, :c], GridMasks.of(used))
        weight = used.unsqueeze(-1).to(y.dtype)
        q = self.q_head((y * weight).sum((1, 2)) / weight.sum((1, 2)).clamp(min=1)).squeeze(-1)
        pad = torch.full((self.config.vocab_size,), -30.0, dtype=y.dtype, device=y.device)
        pad[0] = 0.0  # outside a sample's part: pad, confidently
        own = _inside(rows, cols, r, c).unsqueeze(-1)
        logits = pad.expand(B, R, C, -1).clone()
        logits[:, :r, :c] = self._answer(y, grid).where(own, pad)
        y_out, z_out = y0.detach().clone(), z0.detach().clone()
        y_out[:, :r, :c], z_out[:, :r, :c] = y.detach(), z.detach()
        return StepOutput(Carry(y_out.view(B, R * C, D), z_out.view(B, R * C, D)), logits.reshape(B, R * C, -1), q)

    def answered(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: the cells this model answers for; the others answer pad by construction
        (the axial mixer's extent; every cell otherwise). Training's loss counts these."""
        if self.config.mixer != "axial":
            return torch.ones_like(tokens, dtype=torch.bool)
        (R, C), B = self.config.grid_shape, tokens.shape[0]
        return _inside(*_extent(tokens.view(B, R, C) != 0), R, C).view(B, R * C)

    @torch.inference_mode()
    def refine(self, tokens: torch.Tensor, max_steps: int | torch.Tensor | None = None,
               halt_threshold: float | torch.Tensor | None = None) -> RefineOutput:
        """Run up to `max_steps` supervision steps; each sample stops, its answer frozen, at the
        first step where sigmoid(q) >= `halt_threshold`. Later steps compute only running rows.
        Both limits may be per sample: (B,) tensors, so one batch serves requests that differ."""
        cfg = self.config
        if tokens.dim() != 2 or tokens.shape[1] != cfg.seq_len:
            raise ValueError(f"tokens must be (batch, {cfg.seq_len}), got {tuple(tokens.shape)}")
        B, device = tokens.shape[0], tokens.device
        limit = _per_sample(cfg.max_steps if max_steps is None else max_steps, B, torch.long, device)
        # float64: a threshold such as 1e-300 is valid and would round to 0 in float32
        threshold = _per_sample(cfg.halt_threshold if halt_threshold is None else halt_threshold, B,
                                torch.float64, device)
        if (limit < 1).any():
            raise ValueError(f"max_steps must be a positive integer for every sample, got {limit.tolist()}")
        if ((threshold <= 0) | (threshold > 1)).any():
            raise ValueError(f"halt_threshold must be in (0, 1], got {threshold.tolist()}")
        answer = torch.zeros_like(tokens)
        steps = torch.zeros(B, dtype=torch.long, device=device)
        confidence = torch.zeros(B, device=device)
        rows = torch.arange(B, device=device)  # samples still running
        carry = self.initial_carry(B)
        for step in range(1, int(limit.max()) + 1):
            out = self(carry, tokens[rows])
            p = torch.sigmoid(out.q).float()
            answer[rows], steps[rows], confidence[rows] = out.logits.argmax(-1), step, p
            # compared as logits: sigmoid rounds to exactly 1.0 for q above ~17, and threshold 1.0
            # (logit +inf) must mean "never halt"
            go = (out.q.float() < torch.logit(threshold[rows].double()).float()) & (step < limit[rows])
            if not go.any():
                break
            rows, carry = rows[go], Carry(out.carry.y[go], out.carry.z[go])
        logger.debug("refined %d samples, steps %s", B, steps.tolist())
        return RefineOutput(answer, steps, confidence)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(asdict(self.config), indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, directory / "model.safetensors")

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> TRM:
        directory = Path(directory)
        fields = json.loads((directory / "config.json").read_text())
        try:
            config = TRMConfig(**fields)
        except TypeError as exc:
            raise ValueError(f"{directory / 'config.json'} is not a TRMConfig: {exc}") from exc
        model = cls(config)
        model.load_state_dict(load_file(directory / "model.safetensors"))
        logger.info("loaded TRM from %s: %d parameters, mixer %s", directory, model.num_parameters(), config.mixer)
        return model.to(device).eval()
