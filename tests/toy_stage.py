"""A toy stage kind for the registry test: the whole kind is this file plus one `register_kind` line.

It fills the coarse role with no transformer at all: each frame's codes are predicted from the
semantic id that covers the frame (a lookup table per level), so it trains in a few steps.
"""
import torch
import torch.nn as nn

from stages.frames import frame_rate_ids, level_losses


class ToyStage:
    kind, roles = "toy", ("coarse",)

    def __init__(self, cfg):
        self.cfg, self.role = cfg, cfg.role
        self.ratio = int(round(cfg.acoustic_rate / cfg.semantic_rate))
        self.model = nn.Embedding(cfg.semantic_codebook, cfg.coarse_levels * cfg.acoustic_codebook)

    def sampling_defaults(self):
        return {}

    def level_names(self):
        return [f"coarse{q}" for q in range(self.cfg.coarse_levels)]

    def logits(self, semantic, frames, model=None):
        sem = frame_rate_ids(semantic, self.ratio, frames)
        return (model or self.model)(sem).unflatten(-1, (self.cfg.coarse_levels, self.cfg.acoustic_codebook))

    def loss(self, batch, drop_cond, model=None):
        codes = batch["acoustic"][:, : self.cfg.coarse_levels]
        return level_losses(self.logits(batch["semantic"], codes.shape[-1], model), codes, torch.ones_like(codes).bool())

    @torch.no_grad()
    def generate(self, mulan, semantic, frames, s=None, prompt=None, generator=None, use_cache=True, progress=None):
        P = 0 if prompt is None else prompt.shape[-1]
        return self.logits(semantic, P + frames)[:, P:].argmax(-1).transpose(1, 2)
