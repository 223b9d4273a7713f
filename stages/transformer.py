"""The one decoder-only transformer every stage uses.

Tokens of different kinds share one sequence: conditioning tokens, semantic ids, acoustic
codes of each RVQ level. Each kind is a "level" with its own id range in one embedding table
(offsets), so the same id means different things on different levels. Predictions are made
per level with that level's slice of the output matrix: a position predicting level l can
only produce ids of level l.

Pre-norm blocks, rotary position embeddings, `scaled_dot_product_attention`, and a KV cache
so that generation costs one token's work per step.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelShape:
    level_sizes: list[int]   # vocabulary of each level (e.g. [1025]*12 MuLan + [1024] semantic)
    dim: int = 256
    depth: int = 6
    heads: int = 4
    dropout: float = 0.0
    extra_vocab: int = 0     # > 0: a side input, one id per position, summed into it (the semantic stage's melody)
    cond_levels: int = 0     # > 0 with cond_dim: the first cond_levels levels are embedded by fixed code vectors
    cond_dim: int = 0        # (the MuLan RVQ's, in `cond_vectors`) through one learned linear map
    attribute_vocab: int = 0  # > 0: a few ids per row (tempo, key: data/attributes.py), summed into every position
    beat_vocab: int = 0      # > 0: a second side input, one id per position (the semantic stage's beat clock)


@functools.lru_cache(maxsize=8)
def _rotary_table(half: int, length: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = 1.0 / (10000 ** (torch.arange(half, device=device, dtype=torch.float32) / half))
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * freqs[None]
    return angles.cos().repeat(1, 2), torch.cat([-angles.sin(), angles.sin()], 1)


def rotary_angles(pos: torch.Tensor, half: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [L, 2 * half] for `rotary`, looked up once per forward for all blocks.
    sin carries the sign of the rotation: [-sin(pos * theta_i), +sin(pos * theta_i)]."""
    length = 4096 * (1 + int(pos[-1]) // 4096)  # tables grow in steps, so they are built once
    return tuple(t[pos].to(dtype) for t in _rotary_table(half, length, str(pos.device)))


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of channels (i, i + half) of x [..., L, Dh] by the angles pos * theta_i (RoPE):
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), written as x * cos + swap_halves(x) * signed sin
    so that it is four ops (per-op overhead dominates generation at batch 1)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


def append_kv(cache: dict, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Write k, v [B, H, L, Dh] after the n cached positions; return views of all n + L.

    The buffers are preallocated and doubled when full, so a generation step copies one
    token's keys instead of the whole history (torch.cat per step was 44% of generation time)."""
    n, L = cache.get("n", 0), k.shape[2]
    if "k" not in cache or n + L > cache["k"].shape[2]:
        size = max(2 * (n + L), 256)
        for name, new in (("k", k), ("v", v)):
            buf = new.new_empty(*new.shape[:2], size, new.shape[3])
            if n:
                buf[:, :, :n] = cache[name][:, :, :n]
            cache[name] = buf
    cache["k"][:, :, n:n + L], cache["v"][:, :, n:n + L] = k, v
    cache["n"] = n + L
    return cache["k"][:, :, :n + L], cache["v"][:, :, :n + L]


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, angles: tuple[torch.Tensor, torch.Tensor], cache: dict | None,
                mask: torch.Tensor | str | None = "causal") -> torch.Tensor:
        """`mask`: "causal", a bool [L, L_keys] (True = may attend), or None (every position sees every other)."""
        B, L, D = x.shape
        qkv = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        (q, k), v = rotary(qkv[:2], *angles), qkv[2]
        if cache is not None:  # append this call's keys/values to the ones already seen
            k, v = append_kv(cache, k, v)
        if isinstance(mask, str):  # one new token may attend to everything cached; longer chunks need the mask
            mask = None if L == 1 else torch.ones(L, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - L)
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.out(h.transpose(1, 2).reshape(B, L, D))
        return x + self.mlp(self.norm2(x))


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, heads: int, start: int = 0, cache: list[dict] | None = None,
               mask: torch.Tensor | str | None = "causal") -> torch.Tensor:
    """Input embeddings [B, L, D] at positions start.. -> block outputs [B, L, D] (before the final norm).
    Every model here (flattened token sequences, frame-aligned layouts) runs its blocks through this."""
    pos = torch.arange(start, start + x.shape[1], device=x.device)
    angles = rotary_angles(pos, x.shape[-1] // heads // 2, x.dtype)
    for i, block in enumerate(blocks):
        x = block(x, angles, cache[i] if cache is not None else None, mask)
    return x


class Transformer(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        self.shape = shape
        sizes = torch.tensor(shape.level_sizes)
        self.register_buffer("offsets", torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)[:-1]]))
        self.embed = nn.Embedding(int(sizes.sum()), shape.dim)
        self.extra = nn.Embedding(shape.extra_vocab, shape.dim) if shape.extra_vocab else None
        self.cond_proj = None
        if shape.cond_levels and shape.cond_dim:
            # code vectors of each condition level; the last row (the null id) stays zero
            self.register_buffer("cond_vectors", torch.zeros(shape.cond_levels, shape.level_sizes[0], shape.cond_dim))
            self.cond_proj = nn.Linear(shape.cond_dim, shape.dim)
        self.attributes = nn.Embedding(shape.attribute_vocab, shape.dim) if shape.attribute_vocab else None
        self.beats = nn.Embedding(shape.beat_vocab, shape.dim) if shape.beat_vocab else None
        self.blocks = nn.ModuleList(Block(shape.dim, shape.heads, shape.dropout) for _ in range(shape.depth))
        self.norm = nn.LayerNorm(shape.dim)
        self.head = nn.Linear(shape.dim, int(sizes.sum()), bias=False)  # sliced per level
        self.apply(self._init)
        for table in (self.attributes, self.beats):   # a warm start from a model without them begins as that model
            if table is not None:
                nn.init.zeros_(table.weight)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def hidden(self, tokens: torch.Tensor, levels: torch.Tensor, start: int = 0,
               cache: list[dict] | None = None, extra: torch.Tensor | None = None,
               attrs: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, L] (ids within their level), levels [L] -> hidden states [B, L, D].
        `start` is the position of tokens[:, 0]; `cache` (one dict per block) makes calls incremental;
        `extra` [B, L] side-input ids (shape.extra_vocab > 0), or [B, L, 2] with a model that also has beat_vocab
        (channel 0 for the extra table, 1 for the beat table), summed into the inputs; `attrs` [B, A] attribute
        ids of each row (shape.attribute_vocab > 0), their embeddings summed into every position."""
        x = self.embed(tokens + self.offsets[levels])
        if self.cond_proj is not None:
            x = self.vector_condition(x, tokens, levels)
        if extra is not None:
            side = extra if extra.dim() == 3 else extra[..., None]
            for c, table in enumerate((self.extra, self.beats)[: side.shape[-1]]):
                if table is not None:
                    x = x + table(side[..., c])
        if self.attributes is not None and attrs is not None:
            x = x + self.attributes(attrs).sum(1, keepdim=True)
        return self.norm(run_blocks(self.blocks, x, self.shape.heads, start, cache))

    def vector_condition(self, x: torch.Tensor, tokens: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """Condition positions get (the level's null-id embedding) + W (the token's code vector) instead of a
        learned row per token: conditions never seen in training (a new caption's MuLan tokens) land near
        the ones whose vectors they resemble, instead of on rows trained on a handful of clips each."""
        is_cond = levels < self.shape.cond_levels
        if not bool(is_cond.any()):
            return x
        lv = levels[is_cond]
        null_rows = self.embed(self.offsets[lv] + self.shape.level_sizes[0] - 1)          # [n, D]
        vec = self.cond_vectors[lv[None].expand(len(tokens), -1), tokens[:, is_cond]]    # [B, n, E]
        x = x.clone()
        x[:, is_cond] = null_rows[None].to(x.dtype) + self.cond_proj(vec.to(self.cond_proj.weight.dtype)).to(x.dtype)
        return x

    def logits(self, h: torch.Tensor, level: int) -> torch.Tensor:
        """Hidden states [..., D] -> logits [..., V_level] over the ids of one level."""
        lo = int(self.offsets[level])
        return h @ self.head.weight[lo: lo + self.shape.level_sizes[level]].t()

    def loss(self, tokens: torch.Tensor, levels: torch.Tensor, predict: torch.Tensor,
             extra: torch.Tensor | None = None, attrs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Next-token cross-entropy where `predict` [L] marks the positions that are targets.
        Returns the mean loss and, per level, (summed loss, correct, count) for logging."""
        h = self.hidden(tokens[:, :-1], levels[:-1], extra=None if extra is None else extra[:, :-1], attrs=attrs)
        total, count, stats = h.new_zeros(()), 0, {}
        for level in torch.unique(levels[1:][predict[1:]]).tolist():
            where = predict[1:] & (levels[1:] == level)
            logits = self.logits(h[:, where], level)
            target = tokens[:, 1:][:, where]
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), reduction="sum")
            total, count = total + ce, count + target.numel()
            stats[level] = (ce.detach(), (logits.argmax(-1) == target).sum().detach(), target.numel())
        return {"loss": total / max(count, 1), "per_level": stats}

    def forward(self, tokens: torch.Tensor, levels: torch.Tensor, predict: torch.Tensor,
                extra: torch.Tensor | None = None, attrs: torch.Tensor | None = None) -> dict:
        return self.loss(tokens, levels, predict, extra, attrs)  # what DDP wraps

    def new_cache(self) -> list[dict]:
        return [{} for _ in self.blocks]
