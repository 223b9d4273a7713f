"""What every stage shares: its config, the kind registry, and checkpoint save/load.

A stage is one file with one class that follows the small `Stage` protocol below; the
pipeline and the training loop only ever see the protocol. A checkpoint records its kind, so
an ablation (say a MusicGen delay-pattern coarse stage) is a new file registered under a new
kind, and swapping it in is passing its checkpoint path.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from common.checkpoint import load_checkpoint, read_header, save_checkpoint
from common.config import config_from_dict, config_to_dict, register_config
from common.errors import CheckpointError
from stages.transformer import Transformer

# kind -> "module:Class"; an ablation adds a line here.
STAGE_KINDS = {"semantic": "stages.semantic:SemanticStage", "coarse": "stages.coarse:CoarseStage",
               "fine": "stages.fine:FineStage"}


@dataclass
class StageConfig:
    kind: str = "semantic"
    # what the stage is fed: must match the tokenizers (checked against the cache and the pipeline)
    mulan_levels: int = 12
    mulan_codebook: int = 1024
    semantic_codebook: int = 1024
    acoustic_codebook: int = 1024
    coarse_levels: int = 3
    fine_levels: int = 5
    semantic_rate: float = 25.0
    acoustic_rate: float = 50.0
    window_seconds: float = 10.0      # training window; the fine stage uses ~3 s
    semantic_tokens: str = ""         # fingerprint of the semantic tokenizer whose ids trained it ("" = unchecked)
    # the transformer
    dim: int = 256
    depth: int = 6
    heads: int = 4
    dropout: float = 0.0
    cond_dropout: float = 0.1         # condition replaced by null tokens, for classifier-free guidance
    # training
    cache: str = "cache/corpus"
    out: str = "runs/stage"
    steps: int = 10000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.1
    warmup: int = 500
    grad_clip: float = 1.0
    ema: float = 0.0                  # EMA decay of the weights; 0 disables
    log_every: int = 50
    eval_every: int = 500
    ckpt_every: int = 500
    eval_batches: int = 8
    seed: int = 0
    threads: int = 2


for _name in ("semantic", "coarse", "fine"):
    register_config(_name)(StageConfig)


class Stage(Protocol):
    kind: str
    cfg: StageConfig
    model: Transformer

    def training_sequence(self, batch: dict[str, torch.Tensor], drop_cond: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cached tokens of a window -> (tokens [B, L], levels [L], predict [L] bool)."""

    def level_names(self) -> list[str]:
        """A name per level, for logs."""


def stage_class(kind: str) -> type:
    if kind not in STAGE_KINDS:
        raise CheckpointError(f"unknown stage kind '{kind}'; known: {', '.join(STAGE_KINDS)}")
    module, name = STAGE_KINDS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def build_stage(cfg: StageConfig):
    return stage_class(cfg.kind)(cfg)


def save_stage(stage, path: str | Path, meta: dict | None = None, state_dict: dict | None = None) -> None:
    save_checkpoint(path, stage.kind, config_to_dict(stage.cfg), state_dict or stage.model.state_dict(),
                    meta=meta or {})


def load_stage(path: str | Path, kind: str | None = None):
    """Rebuild a stage from its checkpoint; the recorded kind picks the class."""
    header = read_header(path)
    if header["kind"] not in STAGE_KINDS:
        raise CheckpointError(f"{path} is a '{header['kind']}' checkpoint, not a stage "
                              f"({', '.join(STAGE_KINDS)})")
    ck = load_checkpoint(path, kind=kind or tuple(STAGE_KINDS))
    cfg = config_from_dict(StageConfig, ck.config, str(path))
    stage = build_stage(cfg)
    stage.model.load_state_dict({k: v.float() for k, v in ck.state_dict.items()})
    stage.model.eval()
    stage.meta = ck.meta
    return stage
