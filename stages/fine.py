"""Fine acoustic stage: p(A^f_t | A^f_<t, A^c_<=t). `python -m stages.fine --config configs/fine.yaml`.

Frames are interleaved, coarse levels first, so the fine codes of frame t see the coarse
codes of frames 1..t and never later ones (Q_c = 2, Q_f = 2, 3 frames; loss on fine only):

    tokens  [ c1¹ c1² f1¹ f1²  c2¹ c2² f2¹ f2²  c3¹ c3² f3¹ f3² ]
    level   [ 0   1   2   3    0   1   2   3    0   1   2   3   ]
    predict [ .   .   x   x    .   .   x   x    .   .   x   x   ]

Trained on short windows (MusicLM uses ~3 s); in generation the coarse codes are copied in
and only the fine ones are sampled.
"""
from __future__ import annotations

import torch

from stages.base import StageConfig
from stages.coarse import flatten, unflatten
from stages.sampling import Sampling, generate
from stages.semantic import Flattened
from stages.transformer import ModelShape, Transformer


class FineStage(Flattened):
    kind, roles = "fine", ("fine",)

    def __init__(self, cfg: StageConfig):
        self.cfg = cfg
        self.levels_per_frame = cfg.coarse_levels + cfg.fine_levels
        self.model = Transformer(ModelShape([cfg.acoustic_codebook] * self.levels_per_frame,
                                            cfg.dim, cfg.depth, cfg.heads, cfg.dropout))

    def level_names(self) -> list[str]:
        return [f"coarse{q}" for q in range(self.cfg.coarse_levels)] + [f"fine{q}" for q in range(self.cfg.fine_levels)]

    def frame_levels(self, frames: int) -> torch.Tensor:
        return torch.arange(self.levels_per_frame).repeat(frames)

    def training_sequence(self, batch, drop_cond):
        codes = batch["acoustic"][:, : self.levels_per_frame]
        levels = self.frame_levels(codes.shape[-1])
        return flatten(codes), levels, levels >= self.cfg.coarse_levels

    def generate(self, coarse: torch.Tensor, s: Sampling = Sampling(), generator: torch.Generator | None = None,
                 use_cache: bool = True, progress=None, fine_prompt: torch.Tensor | None = None) -> torch.Tensor:
        """Coarse codes [B, Q_c, T] (+ known fine codes of the first P frames [B, Q_f, P]) -> fine codes [B, Q_f, T]."""
        B, Qc, T = coarse.shape
        filler = torch.full((B, self.cfg.fine_levels, T), -1, dtype=coarse.dtype)
        if fine_prompt is not None:
            filler[..., : fine_prompt.shape[-1]] = fine_prompt
        plan = flatten(torch.cat([coarse, filler], 1))          # coarse ids, -1 where fine is sampled
        levels = self.frame_levels(T)
        out = generate(self.model, plan[:, :Qc], levels[:Qc], levels[Qc:], s, forced=plan[:, Qc:],
                       generator=generator, use_cache=use_cache, progress=progress)
        frames = unflatten(torch.cat([plan[:, :Qc], out], 1), self.levels_per_frame)
        return frames[:, Qc:]


if __name__ == "__main__":
    from stages.train import main
    main("fine")
