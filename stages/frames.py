"""The frame-aligned layout shared by the delay-pattern and masked acoustic stages.

One position per acoustic frame (50 Hz), after a prefix of MuLan tokens. The input of a frame
position is a SUM of embeddings, so the time alignment between semantic ids, known codes and
the codes being made is given by construction instead of learned (SoundStorm's conditioning):

    position      M1   M2  |  frame 1     frame 2     frame 3     frame 4   ...
    prefix        m1   m2  |
    semantic               |  + s1        + s1        + s2        + s2        (25 Hz ids repeated to 50 Hz)
    MuLan (cond_global)    |  + g         + g         + g         + g         (optional: the prefix pooled)
    attributes             |  + a         + a         + a         + a         (optional: tempo, key ids, summed)
    onset levels           |  + o1        + o2        + o3        + o4        (optional: where notes start, data/onsets.py)
    known levels           |  + c1        + c2        + c3        + c4        (fine role: the coarse codes)
    own levels             |  + x1        + x2        + x3        + x4        (placed by the kind's pattern)

Each level has its own embedding table over the codebook plus two special ids: EMPTY (no value
here, e.g. the delay pattern's padding) and MASK (to be predicted, masked decoding). Each level
has its own output head over the codebook. The MuLan prefix uses one id per level plus a null id
for classifier-free guidance, as in the flattened stages.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from data.attributes import BEAT_VOCAB, beat_grid
from data.onsets import NOT_GIVEN, VOCAB as ONSET_VOCAB, fit
from stages.transformer import Block, run_blocks


class FrameModel(nn.Module):
    """Embeddings -> the shared transformer blocks -> one head per predicted level.

    levels K and codebook V: the codes the stage makes; known_levels: lower codec levels given
    as input (0 for coarse/acoustic roles); semantic_codebook 0 switches the semantic input off."""

    def __init__(self, levels: int, codebook: int, cond_levels: int, cond_codebook: int, semantic_codebook: int,
                 known_levels: int, dim: int, depth: int, heads: int, dropout: float, semantic_context: int = 0,
                 tie: bool = False, cond_dim: int = 0, cond_global: bool = False, attribute_vocab: int = 0,
                 beat_rate: float = 0.0, semantic_onsets: bool = False, onset_input: bool = False):
        super().__init__()
        self.levels, self.codebook, self.heads = levels, codebook, heads
        self.empty, self.mask_id = codebook, codebook + 1
        self.cond = nn.Embedding(cond_levels * (cond_codebook + 1), dim)
        self.register_buffer("cond_offsets", torch.arange(cond_levels) * (cond_codebook + 1), persistent=False)
        # mulan_vectors: MuLan tokens enter as their RVQ code vectors through one linear map (as in the semantic
        # stage, stages/transformer.py); `cond` then keeps only each level's null row
        self.cond_proj = nn.Linear(cond_dim, dim) if cond_dim and cond_levels else None
        if self.cond_proj is not None:
            self.register_buffer("cond_vectors", torch.zeros(cond_levels, cond_codebook + 1, cond_dim))
        self.cond_codebook = cond_codebook
        # cond_global: the MuLan condition is also summed into every frame (one vector per row: the sum of its code
        # vectors, or the mean of its learned rows, through a linear map that starts at zero), so a frame reads the
        # instrument without finding it in the prefix by attention
        self.cond_global = nn.Linear(cond_dim or dim, dim) if cond_global and cond_levels else None
        # attribute_input: tempo and key ids (data/attributes.py) of the row, summed into every frame
        self.attributes = nn.Embedding(attribute_vocab, dim) if attribute_vocab else None
        # beat_rate (frames a second): a clock at the row's tempo attribute, summed into every frame
        # (data.attributes.beat_grid)
        self.beat_rate = beat_rate
        self.beats = nn.Embedding(BEAT_VOCAB, dim) if beat_rate and attribute_vocab else None
        self.semantic = nn.Embedding(semantic_codebook, dim) if semantic_codebook else None
        # with semantic_context c, each frame also sees the ids of the c frames either side (a convolution over the
        # whole, given sequence of ids: what comes next is known, as in AudioLM's coarse stage)
        self.semantic_conv = nn.Conv1d(dim, dim, 2 * semantic_context + 1, padding=semantic_context) \
            if semantic_codebook and semantic_context else None
        # semantic_onsets: where the id changes from the frame before, a learnt vector is summed into the frame,
        # so the stage need not infer the change from two embeddings (tried: the shipped tokenizer's ids change
        # ~4 times per note onset, so the change says little; README "The stage table as a project command")
        self.onsets = nn.Embedding(2, dim) if semantic_codebook and semantic_onsets else None
        # onset_input: each frame's onset level (data/onsets.py: the clip's own in training, a recording's or a
        # metronome's at inference, NOT_GIVEN without either), so the stage is told where notes start
        self.onset_in = nn.Embedding(ONSET_VOCAB, dim) if semantic_codebook and onset_input else None
        self.known = nn.Embedding(known_levels * codebook, dim) if known_levels else None
        self.register_buffer("known_offsets", torch.arange(known_levels) * codebook, persistent=False)
        self.codes = nn.Embedding(levels * (codebook + 2), dim)
        self.register_buffer("code_offsets", torch.arange(levels) * (codebook + 2), persistent=False)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        # tied: a level's output weights are its input code embeddings, so "this frame's code is that one" is
        # learnt once (a masked model copies from its neighbours long before it learns anything else)
        self.head = None if tie else nn.Linear(dim, levels * codebook, bias=False)
        self.apply(self._init)
        if self.cond_global is not None:
            nn.init.zeros_(self.cond_global.weight)   # a warm start from a model without it begins as that model
        for table in (self.attributes, self.beats, self.semantic_conv, self.onsets, self.onset_in):   # likewise
            if table is not None:
                nn.init.zeros_(table.weight)
        if self.semantic_conv is not None:
            nn.init.zeros_(self.semantic_conv.bias)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def embed_prefix(self, cond: torch.Tensor) -> torch.Tensor:
        """MuLan tokens [B, Q_m] (null id = codebook) -> [B, Q_m, D]."""
        if self.cond_proj is None:
            return self.cond(cond + self.cond_offsets)
        levels = torch.arange(cond.shape[1], device=cond.device)
        vec = self.cond_vectors[levels[None].expand_as(cond), cond]                 # [B, Q_m, E]; null rows are 0
        null = self.cond(self.cond_offsets + self.cond_codebook)                    # [Q_m, D]
        return null[None] + self.cond_proj(vec.to(self.cond_proj.weight.dtype))

    def global_condition(self, cond: torch.Tensor) -> torch.Tensor | None:
        """MuLan tokens [B, Q_m] -> the vector summed into every frame [B, D] (None without cond_global)."""
        if self.cond_global is None:
            return None
        if self.cond_proj is None:
            pooled = self.cond(cond + self.cond_offsets).mean(1)
        else:
            levels = torch.arange(cond.shape[1], device=cond.device)
            pooled = self.cond_vectors[levels[None].expand_as(cond), cond].sum(1)     # the quantized MuLan embedding
        return self.cond_global(pooled.to(self.cond_global.weight.dtype))

    def semantic_features(self, semantic: torch.Tensor | None, cond: torch.Tensor | None = None,
                          attrs: torch.Tensor | None = None, beat_start: float | torch.Tensor = 0.0,
                          onsets: torch.Tensor | None = None) -> torch.Tensor | None:
        """Semantic ids [B, T] at the frame rate (+ MuLan tokens [B, Q_m] for cond_global, + attribute ids [B, A],
        and with them the beat clock of frames 0..T-1 of a window `beat_start` seconds into the clip, + onset levels
        [B, T'] (cut or padded to T; None: not given)) -> what is summed into each frame [B, T, D] (None: no input)."""
        g = None if cond is None else self.global_condition(cond)
        if self.attributes is not None and attrs is not None:
            a = self.attributes(attrs).sum(1)
            g = a if g is None else g + a
        if self.semantic is None or semantic is None:
            return None if g is None else g[:, None]
        x = self.semantic(semantic)
        if self.semantic_conv is not None:
            x = x + self.semantic_conv(x.transpose(1, 2)).transpose(1, 2)
        if self.onsets is not None:   # the first frame of a window has no frame before it: no change
            x = x + self.onsets(torch.nn.functional.pad((semantic[:, 1:] != semantic[:, :-1]).long(), (1, 0)))
        if self.beats is not None and attrs is not None:
            x = x + self.beats(beat_grid(attrs, x.shape[1], self.beat_rate, beat_start))
        if self.onset_in is not None:
            o = fit(onsets, x.shape[1]) if onsets is not None else semantic.new_full(semantic.shape, NOT_GIVEN)
            x = x + self.onset_in(o.to(x.device))
        return x if g is None else x + g[:, None]

    def embed_frames(self, codes: torch.Tensor, semantic: torch.Tensor | None = None,
                     known: torch.Tensor | None = None) -> torch.Tensor:
        """codes [B, K, T] (ids, EMPTY or MASK), semantic features [B, T, D] (`semantic_features`), known
        [B, K_known, T] -> the summed input embeddings [B, T, D]."""
        x = self.codes(codes + self.code_offsets[:, None]).sum(1)
        if semantic is not None:
            x = x + semantic
        if self.known is not None and known is not None:
            x = x + self.known(known + self.known_offsets[:, None]).sum(1)
        return x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, T, D] -> logits [B, T, K, V]."""
        if self.head is None:
            w = self.codes.weight.view(self.levels, self.codebook + 2, -1)[:, : self.codebook]
            return torch.einsum("btd,kvd->btkv", self.norm(h), w)
        return self.head(self.norm(h)).unflatten(-1, (self.levels, self.codebook))

    def forward(self, cond: torch.Tensor, codes: torch.Tensor, semantic: torch.Tensor | None = None,
                known: torch.Tensor | None = None, mask: torch.Tensor | str | None = "causal",
                attrs: torch.Tensor | None = None, beat_start: float | torch.Tensor = 0.0,
                onsets: torch.Tensor | None = None) -> torch.Tensor:
        """The whole sequence at once (training, scoring) -> logits [B, T, K, V] of the frame positions."""
        frames = self.embed_frames(codes, self.semantic_features(semantic, cond, attrs, beat_start, onsets), known)
        x = torch.cat([self.embed_prefix(cond), frames], 1)
        return self.logits(run_blocks(self.blocks, x, self.heads, 0, None, mask)[:, cond.shape[1]:])

    def new_cache(self) -> list[dict]:
        return [{} for _ in self.blocks]


def frame_rate_ids(semantic: torch.Tensor, ratio: int, frames: int) -> torch.Tensor:
    """Semantic ids [B, T_s] -> the id covering each acoustic frame [B, frames] (the last one repeated
    if the ids end early)."""
    up = semantic.repeat_interleave(ratio, dim=1)
    if up.shape[1] < frames:
        up = torch.cat([up, up[:, -1:].expand(-1, frames - up.shape[1])], 1)
    return up[:, :frames]


def level_losses(logits: torch.Tensor, target: torch.Tensor, where: torch.Tensor) -> dict:
    """Cross-entropy of logits [B, T, K, V] against target [B, K, T] on the cells `where` [B, K, T] marks:
    the mean, and per level (summed CE, correct, count) for logs."""
    stats, total, count = {}, logits.new_zeros(()), 0
    for k in range(target.shape[1]):
        sel = where[:, k]
        lg, tg = logits[:, :, k][sel].float(), target[:, k][sel]
        ce = nn.functional.cross_entropy(lg, tg, reduction="sum")
        total, count = total + ce, count + tg.numel()
        stats[k] = (ce.detach(), (lg.argmax(-1) == tg).sum().detach(), tg.numel())
    return {"loss": total / max(count, 1), "per_level": stats}
