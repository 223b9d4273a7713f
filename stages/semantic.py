"""Semantic stage: p(S_t | S_<t, M). `python -m stages.semantic --config configs/semantic.yaml`.

Sequence (Q_m = 3 MuLan tokens, T_s = 4 semantic tokens; loss on S only):

    tokens  [ M1  M2  M3 | S1  S2  S3  S4 ]
    level   [ 0   1   2  | 3   3   3   3  ]
    predict [ .   .   .  | x   x   x   x  ]

Each MuLan level has its codebook plus one null id (= codebook size), used when the condition
is dropped in training and for the unconditional rows of classifier-free guidance.
"""
from __future__ import annotations

import torch

from audio_tokenizers.melody import NONE as NO_MELODY, VOCAB as MELODY_VOCAB
from common.errors import UserError
from data.attributes import BEAT_VOCAB, VOCAB as ATTRIBUTE_VOCAB, beat_frames, beat_grid, for_rows, null_like
from stages.base import StageConfig
from stages.sampling import Sampling, generate
from stages.transformer import ModelShape, Transformer


class Flattened:
    """What MusicLM's flattened kinds share: a token sequence scored by the one transformer."""

    @property
    def role(self) -> str:
        return self.cfg.role

    def sampling_defaults(self) -> dict:
        """The pipeline's default knobs for this stage (GenerationOptions override them)."""
        return {"temperature": {"semantic": 1.0, "coarse": 0.95, "fine": 0.8}[self.role]}

    def loss(self, batch, drop_cond, model=None) -> dict:
        device = self.model.offsets.device
        tokens, levels, predict = (t.to(device) for t in self.training_sequence(batch, drop_cond))
        attrs = self.row_attributes(batch, drop_cond)
        extra = self.side_input(batch, attrs)
        return (model or self.model)(tokens, levels, predict, None if extra is None else extra.to(device),
                                     None if attrs is None else attrs.to(device))

    def side_input(self, batch, attrs: torch.Tensor | None) -> torch.Tensor | None:
        """Per-position side-input ids of the training sequence, if the kind has one (the melody, the beat clock)."""
        return None

    @property
    def takes_attributes(self) -> bool:
        """Does generate() read tempo and key ids (data/attributes.py)? The pipeline hands them only then."""
        return self.cfg.attribute_input

    def row_attributes(self, batch, drop_cond) -> torch.Tensor | None:
        """Attribute ids [B, 2] of the batch's rows (stages/train.py draws which are hidden; null ids where the
        batch has none), null where the condition is dropped: guidance's unconditional rows know no tempo or key."""
        if not self.cfg.attribute_input:
            return None
        return for_rows(batch.get("attrs"), batch["semantic"], drop_cond)


class SemanticStage(Flattened):
    kind, roles = "semantic", ("semantic",)

    def __init__(self, cfg: StageConfig):
        self.cfg = cfg
        sizes = [cfg.mulan_codebook + 1] * cfg.mulan_levels + [cfg.semantic_codebook]
        self.model = Transformer(ModelShape(sizes, cfg.dim, cfg.depth, cfg.heads, cfg.dropout,
                                            MELODY_VOCAB if cfg.melody_input else 0,
                                            cfg.mulan_levels if cfg.mulan_vector_dim else 0, cfg.mulan_vector_dim,
                                            ATTRIBUTE_VOCAB if cfg.attribute_input else 0,
                                            BEAT_VOCAB if cfg.beat_input else 0))
        self.semantic_level = cfg.mulan_levels

    def side_positions(self, melody: torch.Tensor | None, attrs: torch.Tensor | None, B: int, prefix: int,
                       n: int, beat_start: float | torch.Tensor = 0.0) -> torch.Tensor | None:
        """The side input of every position [B, prefix + n] (or [B, prefix + n, 2] with the beat clock) for n
        semantic ids after `prefix` condition tokens: the position that predicts id t carries frame t's melody id
        [B, n] and beat-clock id (from `attrs` [B, 2], data.attributes.beat_grid), so the one before it does, a
        condition token for the first. `beat_start`: where the first id's frame lies in the clip (s)."""
        def positions(ids: torch.Tensor, none: int) -> torch.Tensor:
            pad = torch.full((B, prefix - 1), none, dtype=torch.long)
            return torch.cat([pad, ids[:, :n], torch.full((B, 1), none, dtype=torch.long)], 1)
        if not (self.cfg.melody_input or self.cfg.beat_input):
            return None
        m = melody if melody is not None and self.cfg.melody_input else torch.full((B, n), NO_MELODY, dtype=torch.long)
        if not self.cfg.beat_input:
            return positions(m, NO_MELODY)
        beats = beat_grid(for_rows(attrs, m).cpu(), n, self.cfg.semantic_rate, beat_start)
        return torch.stack([positions(m, NO_MELODY), positions(beats, 0)], -1)

    def side_input(self, batch, attrs: torch.Tensor | None) -> torch.Tensor | None:
        s = batch["semantic"]
        return self.side_positions(batch.get("melody"), attrs, len(s), self.cfg.mulan_levels, s.shape[1],
                                   batch.get("beat_start", 0.0))

    def level_names(self) -> list[str]:
        return [f"mulan{q}" for q in range(self.cfg.mulan_levels)] + ["semantic"]

    def cond(self, mulan: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """MuLan tokens [B, Q_m], with rows where `drop` is set replaced by null ids."""
        return mulan if drop is None else torch.where(drop[:, None], torch.full_like(mulan, self.cfg.mulan_codebook), mulan)

    def cond_levels(self) -> torch.Tensor:
        return torch.arange(self.cfg.mulan_levels)

    def training_sequence(self, batch, drop_cond):
        m, s = self.cond(batch["mulan"], drop_cond), batch["semantic"]
        tokens = torch.cat([m, s], 1)
        levels = torch.cat([self.cond_levels(), torch.full((s.shape[1],), self.semantic_level)])
        predict = levels == self.semantic_level
        return tokens, levels, predict

    def generate(self, mulan: torch.Tensor, n: int, s: Sampling = Sampling(), prompt: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True, progress=None,
                 melody: torch.Tensor | None = None, attributes: torch.Tensor | None = None,
                 beat_start: float = 0.0) -> torch.Tensor:
        """MuLan tokens [B, Q_m] (+ semantic prompt [B, P]) -> n new semantic ids [B, n]; with `melody` [B, P + n]
        (melody ids of the prompt and the new frames) a stage trained with melody_input follows it, and with
        `attributes` [B, 2] (data/attributes.py ids) one trained with attribute_input keeps that tempo and key
        (`beat_start`: the prompt's first frame in seconds from the music's start, for the beat clock)."""
        prompt = prompt if prompt is not None else mulan.new_zeros(mulan.shape[0], 0)
        prefix = torch.cat([mulan, prompt], 1)
        null = torch.cat([self.cond(mulan, torch.ones(len(mulan), dtype=torch.bool)), prompt], 1)
        prefix_levels = torch.cat([self.cond_levels(), torch.full((prompt.shape[1],), self.semantic_level)])
        levels = torch.full((n,), self.semantic_level)
        attrs = for_rows(attributes, mulan) if self.cfg.attribute_input else None
        null_attrs = None if attrs is None else null_like(attrs)
        extra, null_extra = (self.side_positions(melody, a, len(mulan), self.cfg.mulan_levels, prompt.shape[1] + n,
                                                 beat_start) for a in (attrs, null_attrs))   # guidance's rows without attributes have no beat clock
        if s.beat_copy and attrs is None:
            raise UserError("beat_copy needs the stated tempo, which this semantic stage does not read; use one trained "
                            "with attribute_input=true or leave beat_copy at 0")
        lag = None if attrs is None or not s.beat_copy else beat_frames(attrs, self.cfg.semantic_rate)
        return generate(self.model, prefix, prefix_levels, levels, s, null_prefix=null, generator=generator,
                        use_cache=use_cache, progress=progress, extra=extra, attrs=attrs, null_attrs=null_attrs,
                        null_extra=null_extra, beat_lag=lag)


if __name__ == "__main__":
    from stages.train import main
    main("semantic")
