"""What every stage shares: its config, roles and the kind registry, and checkpoint save/load.

A stage has a role (what it makes: semantic ids, coarse codes, fine codes, or all acoustic
codes at once as MusicGen does) and a kind (how it lays the tokens out: MusicLM's flattened
sequences, MusicGen's delay pattern, ...). A kind is one file with one class that follows the
small `Stage` protocol below, plus one line in STAGE_KINDS; the pipeline and the training loop
only ever see the protocol and check the role. A checkpoint records its kind and role, so
swapping a stage for an ablation is passing another checkpoint path.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from common.checkpoint import load_checkpoint, load_weights, read_header, save_checkpoint
from common.config import config_from_dict, config_to_dict, register_config
from common.errors import CheckpointError, ConfigError
from common.training import RunConfig, check_fields

# kind -> "module:Class"; a new kind adds a line here (the class lists the roles it can fill).
STAGE_KINDS = {"semantic": "stages.semantic:SemanticStage", "coarse": "stages.coarse:CoarseStage",
               "fine": "stages.fine:FineStage", "delay": "stages.delay:DelayStage",
               "masked": "stages.masked:MaskedStage"}
ROLES = ("semantic", "coarse", "fine", "acoustic")


@dataclass
class StageConfig(RunConfig):
    kind: str = "semantic"
    role: str = ""                    # semantic | coarse | fine | acoustic; "" = the kind's only role
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
    semantic_input: bool = True       # frame-aligned acoustic kinds: sum the semantic ids into their frames
    melody_input: bool = False        # semantic stage: sum the melody id of each frame into its input (--melody)
    melody_dropout: float = 0.5       # the chance a training row gets no melody (text-only prompts keep working)
    semantic_context: int = 0         # frame-aligned kinds: each frame also sees the semantic ids of +-c frames
    semantic_onsets: bool = False     # frame-aligned kinds: a flag summed into each frame where the semantic id changes
    onset_input: bool = False         # coarse/acoustic delay kind: each frame's onset level summed in (data/onsets.py)
    onset_dropout: float = 0.5        # the chance a training row gets no onset levels (prompts without a beat)
    code_dropout: float = 0.0         # delay kind: share of the input history hidden in training (leans on the condition)
    tie_embeddings: bool = False      # frame-aligned kinds: output weights = the code embeddings of the level
    unmasked_weight: float = 0.0      # masked kind: weight of the loss on the given cells of the level (copying)
    span: int = 3                     # masked kind: frames per masked span (MAGNeT: 3 = 60 ms at 50 Hz)
    context_window: int = 5           # masked kind: levels above the first attend +-this many frames (0 = all)
    # the transformer
    dim: int = 256
    depth: int = 6
    heads: int = 4
    dropout: float = 0.0
    cond_dropout: float = 0.1         # condition replaced by null tokens, for classifier-free guidance
    cond_source: str = "audio"        # training condition: MuLan tokens of the clip's audio, of its caption
                                      # re-phrased (text: the cache's mulan_text), or either (mix)
    cond_text_prob: float = 0.5       # mix: the chance a row gets text tokens
    cond_level_dropout: float = 0.0   # the chance a row keeps only its first k MuLan levels (k in 1..Q_m-1)
    mulan_vectors: str = ""           # semantic, delay, masked kinds: a MuLan checkpoint whose RVQ code vectors, through one learned
                                      # linear map, embed the MuLan tokens ("" = a learned row per token)
    mulan_vector_dim: int = 0         # filled from mulan_vectors at training time (its embedding size)
    cond_global: bool = False         # frame-aligned kinds: also sum the pooled MuLan condition into every frame
    attribute_input: bool = False     # semantic and delay kinds: tempo and key ids (data/attributes.py) summed into
                                      # every position; from the clip's metadata in training, the prompt's words at inference
    attribute_dropout: float = 0.5    # the chance each attribute of a training row is hidden (prompts that state neither)
    beat_input: bool = False          # with attribute_input: sum a beat clock at the row's tempo into every frame
                                      # (data.attributes.beat_grid)
    init: str = ""                    # start from this checkpoint's weights (a new module keeps its fresh init)
    # training (the run fields: common.training.RunConfig)
    cache: str = "cache/corpus"
    train_clips: int = 0              # train on the first N clips of the cache's train split only (0 = all):
                                      # data-scaling curves, one cache for every N
    out: str = "runs/stage"
    steps: int = 10000
    weight_decay: float = 0.1
    warmup: int = 500
    eval_batches: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(self, positive=("mulan_levels", "mulan_codebook", "semantic_codebook", "acoustic_codebook",
                                     "coarse_levels", "semantic_rate", "acoustic_rate", "window_seconds", "span",
                                     "dim", "depth", "heads", "eval_batches"),
                     at_least_zero=("fine_levels", "train_clips", "context_window", "semantic_context", "unmasked_weight",
                                    "mulan_vector_dim"),
                     unit=("dropout", "cond_dropout", "cond_text_prob", "cond_level_dropout", "code_dropout",
                           "melody_dropout", "attribute_dropout"))
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ConfigError(f"dim={self.dim} must be a multiple of 2 x heads={self.heads} (rotary halves)")
        if self.role and self.role not in ROLES:
            raise ConfigError(f"role={self.role!r}: use one of {', '.join(ROLES)}")
        if self.cond_source not in ("audio", "text", "mix"):
            raise ConfigError(f"cond_source={self.cond_source!r}: use audio, text or mix")
        if self.attribute_input and (self.kind not in ("semantic", "delay") or self.role == "fine"):
            raise ConfigError(f"attribute_input is an option of the semantic stage and of delay stages that read "
                              f"MuLan tokens (this config: kind {self.kind}, role {self.role or 'implied'}); remove it")
        if self.beat_input and self.kind == "delay" and not self.semantic_input:
            raise ConfigError("beat_input on a delay stage sums the clock into the semantic ids' frames; it needs "
                              "semantic_input=true")
        if self.beat_input and not self.attribute_input:
            raise ConfigError("beat_input needs attribute_input=true (the clock runs at the tempo attribute); set both "
                              "or remove it")


for _name in ("semantic", "coarse", "fine", "delay", "masked"):
    register_config(_name)(StageConfig)


class Stage(Protocol):
    """What the training loop, the evaluations and the pipeline may call. Batches are cached token
    windows: {"mulan": [B, Q_m], "semantic": [B, T_s], "acoustic": [B, Q, T_a]}."""
    kind: str                  # the layout, a key of STAGE_KINDS
    roles: tuple[str, ...]     # the roles this kind can fill
    role: str
    cfg: StageConfig
    model: torch.nn.Module

    def loss(self, batch: dict[str, torch.Tensor], drop_cond: torch.Tensor | None,
             model: torch.nn.Module | None = None) -> dict:
        """-> {"loss": mean cross-entropy, "per_level": {level: (summed CE, correct, count)}}. Rows where
        `drop_cond` is set get the null condition. `model` runs instead of self.model (the DDP wrapper)."""

    def level_names(self) -> list[str]:
        """A name per level index of "per_level", for logs."""

    def sampling_defaults(self) -> dict:
        """The stages.sampling.Sampling knobs the pipeline uses for this stage unless told otherwise."""

    # and the generate of its role (shapes: B batch, Q_m MuLan tokens, T_s semantic ids, P prompt frames):
    #   semantic: generate(mulan [B, Q_m], n, s, prompt [B, P]) -> [B, n] new semantic ids
    #   coarse:   generate(mulan, semantic [B, T_s], frames, s, prompt [B, Q_c, P]) -> [B, Q_c, frames]
    #   acoustic: generate(mulan, semantic [B, T_s], frames, s, prompt [B, Q, P]) -> [B, Q, frames]
    #   fine:     generate(coarse [B, Q_c, T], s, fine_prompt=[B, Q_f, P]) -> [B, Q_f, T]
    # each also takes generator=, use_cache=, progress= (a tqdm-like object with update(n)).


def register_kind(kind: str, target: str) -> None:
    """Add a stage kind at run time ("module:Class"), e.g. from a test or a user's own file."""
    STAGE_KINDS[kind] = target


def stage_class(kind: str) -> type:
    if kind not in STAGE_KINDS:
        raise CheckpointError(f"unknown stage kind '{kind}'; known: {', '.join(STAGE_KINDS)}")
    module, name = STAGE_KINDS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def stage_role(cfg: StageConfig) -> str:
    """The role a config asks for, checked against what its kind can fill."""
    roles = stage_class(cfg.kind).roles
    role = cfg.role or (roles[0] if len(roles) == 1 else "")
    if role not in roles:
        raise CheckpointError(f"a '{cfg.kind}' stage fills the role {' or '.join(roles)}, not "
                              f"'{cfg.role}'; set role= to one of them")
    return role


def build_stage(cfg: StageConfig):
    cfg.role = stage_role(cfg)
    return stage_class(cfg.kind)(cfg)


def save_stage(stage, path: str | Path, meta: dict | None = None, state_dict: dict | None = None) -> None:
    save_checkpoint(path, stage.kind, config_to_dict(stage.cfg), state_dict or stage.model.state_dict(),
                    meta=meta or {})


def load_stage(path: str | Path, role: str | tuple[str, ...] | None = None):
    """Rebuild a stage from its checkpoint (the recorded kind picks the class); with `role`, refuse a
    stage that fills another role."""
    header = read_header(path)
    if header["kind"] not in STAGE_KINDS:
        raise CheckpointError(f"{path} is a '{header['kind']}' checkpoint, not a stage "
                              f"({', '.join(STAGE_KINDS)})")
    ck = load_checkpoint(path, kind=tuple(STAGE_KINDS))
    cfg = config_from_dict(StageConfig, ck.config, str(path))
    wanted = (role,) if isinstance(role, str) else role
    if wanted and stage_role(cfg) not in wanted:
        raise CheckpointError(f"{path} is a {stage_role(cfg)} stage ({cfg.kind}), not a {' or '.join(wanted)} "
                              "stage; pass a checkpoint trained for that role")
    stage = build_stage(cfg)
    load_weights(stage.model, ck.state_dict, path)
    stage.model.eval()
    stage.meta = ck.meta
    return stage
