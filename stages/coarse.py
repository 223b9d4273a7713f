"""Coarse acoustic stage: p(A^c_t | A^c_<t, S, M). `python -m stages.coarse --config configs/coarse.yaml`.

Sequence (Q_m = 2, T_s = 2 semantic tokens, Q_c = 3 coarse levels, T_a = 2 T_s = 4 frames;
acoustic codes flattened frame by frame; loss on A^c only):

    tokens  [ M1 M2 | S1 S2 | a1¹ a1² a1³  a2¹ a2² a2³  a3¹ a3² a3³  a4¹ a4² a4³ ]
    level   [ 0  1  | 2  2  | 3   4   5    3   4   5    3   4   5    3   4   5   ]
    predict [ .  .  | .  .  | x   x   x    x   x   x    x   x   x    x   x   x   ]
"""
from __future__ import annotations

import torch

from stages.base import StageConfig
from stages.sampling import Sampling, generate
from stages.semantic import SemanticStage
from stages.transformer import ModelShape, Transformer


def flatten(codes: torch.Tensor) -> torch.Tensor:
    """[B, Q, T] -> [B, T * Q], frame by frame: [x1¹ x1² .. x1^Q x2¹ ..]."""
    return codes.transpose(1, 2).reshape(codes.shape[0], -1)


def unflatten(flat: torch.Tensor, levels: int) -> torch.Tensor:
    """[B, T * Q] -> [B, Q, T] (inverse of flatten)."""
    return flat.reshape(flat.shape[0], -1, levels).transpose(1, 2)


class CoarseStage(SemanticStage):
    kind, roles = "coarse", ("coarse",)

    def __init__(self, cfg: StageConfig):
        self.cfg = cfg
        sizes = ([cfg.mulan_codebook + 1] * cfg.mulan_levels + [cfg.semantic_codebook]
                 + [cfg.acoustic_codebook] * cfg.coarse_levels)
        self.model = Transformer(ModelShape(sizes, cfg.dim, cfg.depth, cfg.heads, cfg.dropout))
        self.semantic_level = cfg.mulan_levels
        self.first_acoustic = cfg.mulan_levels + 1

    def level_names(self) -> list[str]:
        return super().level_names() + [f"coarse{q}" for q in range(self.cfg.coarse_levels)]

    def acoustic_levels(self, frames: int) -> torch.Tensor:
        return (self.first_acoustic + torch.arange(self.cfg.coarse_levels)).repeat(frames)

    def training_sequence(self, batch, drop_cond):
        m, s = self.cond(batch["mulan"], drop_cond), batch["semantic"]
        a = batch["acoustic"][:, : self.cfg.coarse_levels]
        tokens = torch.cat([m, s, flatten(a)], 1)
        levels = torch.cat([self.cond_levels(), torch.full((s.shape[1],), self.semantic_level),
                            self.acoustic_levels(a.shape[-1])])
        return tokens, levels, levels >= self.first_acoustic

    def generate(self, mulan: torch.Tensor, semantic: torch.Tensor, frames: int, s: Sampling = Sampling(),
                 prompt: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 use_cache: bool = True, progress=None) -> torch.Tensor:
        """MuLan [B, Q_m] + semantic [B, T_s] (+ coarse prompt [B, Q_c, P]) -> new coarse codes [B, Q_c, frames]."""
        prompt = prompt if prompt is not None else mulan.new_zeros(mulan.shape[0], self.cfg.coarse_levels, 0)
        tail = torch.cat([semantic, flatten(prompt)], 1)
        prefix = torch.cat([mulan, tail], 1)
        null = torch.cat([self.cond(mulan, torch.ones(len(mulan), dtype=torch.bool)), tail], 1)
        prefix_levels = torch.cat([self.cond_levels(), torch.full((semantic.shape[1],), self.semantic_level),
                                   self.acoustic_levels(prompt.shape[-1])])
        flat = generate(self.model, prefix, prefix_levels, self.acoustic_levels(frames), s, null_prefix=null,
                        generator=generator, use_cache=use_cache, progress=progress)
        return unflatten(flat, self.cfg.coarse_levels)


if __name__ == "__main__":
    from stages.train import main
    main("coarse")
