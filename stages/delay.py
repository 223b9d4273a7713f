"""MusicGen's delay pattern on the frame-aligned layout. `python -m stages.delay --config configs/coarse_delay.yaml`.

Level k is shifted right by k frames, so one step holds level 0 of frame s, level 1 of frame
s - 1, ..., and all levels of a step are predicted by one forward. K = 3 levels, T = 4 frames,
S = EMPTY (no value at this step; an input id, never predicted):

    step        0    1    2    3    4    5
    level 0    a1¹  a2¹  a3¹  a4¹   S    S
    level 1     S   a1²  a2²  a3²  a4²   S
    level 2     S    S   a1³  a2³  a3³  a4³

The input of step s is column s - 1 (column -1 is all S), summed with the semantic id that covers
frame s and, for the fine role, the coarse codes of frame s (stages/frames.py); the output of
step s predicts column s. T frames take T + K - 1 steps. Roles: coarse (levels 0..Q_c-1), fine
(levels Q_c.. given the coarse codes) and acoustic (every level: MusicGen's single stage; with
semantic_input=false it is MusicGen itself, text -> codec codes).
"""
from __future__ import annotations

import torch

from common.errors import ConfigError
from data.attributes import VOCAB as ATTRIBUTE_VOCAB, for_rows, null_like
from stages.base import StageConfig
from stages.frames import FrameModel, frame_rate_ids, level_losses
from stages.sampling import Sampling, guide, guided_rows, sample
from stages.transformer import run_blocks


def delay(codes: torch.Tensor, empty: int) -> torch.Tensor:
    """[B, K, T] -> [B, K, T + K - 1]: level k shifted right by k, EMPTY elsewhere."""
    B, K, T = codes.shape
    out = codes.new_full((B, K, T + K - 1), empty)
    for k in range(K):
        out[:, k, k:k + T] = codes[:, k]
    return out


def undelay(steps: torch.Tensor) -> torch.Tensor:
    """[B, K, T + K - 1] -> [B, K, T] (inverse of delay)."""
    K, T = steps.shape[1], steps.shape[2] - steps.shape[1] + 1
    return torch.stack([steps[:, k, k:k + T] for k in range(K)], 1)


def extend(x: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """Repeat the last frame of x [..., T] up to n frames (conditioning for the delay's tail steps)."""
    if x is None or x.shape[-1] >= n:
        return x if x is None else x[..., :n]
    return torch.cat([x, x[..., -1:].expand(*x.shape[:-1], n - x.shape[-1])], -1)


def level_range(cfg: StageConfig, role: str) -> tuple[int, int]:
    """The codec levels [lo, hi) a stage of this role makes."""
    q = cfg.coarse_levels + cfg.fine_levels
    return {"coarse": (0, cfg.coarse_levels), "fine": (cfg.coarse_levels, q), "acoustic": (0, q)}[role]


class DelayStage:
    kind, roles = "delay", ("coarse", "fine", "acoustic")

    def __init__(self, cfg: StageConfig):
        self.cfg, self.role = cfg, cfg.role
        self.lo, self.hi = level_range(cfg, cfg.role)
        self.ratio = int(round(cfg.acoustic_rate / cfg.semantic_rate))
        fine = cfg.role == "fine"   # as MusicLM's fine stage: reads the coarse codes, no text, no semantic ids
        if cfg.onset_input and (fine or not cfg.semantic_input or self.kind != "delay"):
            raise ConfigError(f"onset_input is summed with the semantic ids of a coarse or acoustic delay stage with "
                              f"semantic_input=true (this one: {self.kind}, {cfg.role}); set onset_input=false")
        self.model = FrameModel(self.hi - self.lo, cfg.acoustic_codebook, 0 if fine else cfg.mulan_levels,
                                cfg.mulan_codebook, cfg.semantic_codebook if cfg.semantic_input and not fine else 0,
                                self.lo if fine else 0, cfg.dim, cfg.depth, cfg.heads, cfg.dropout, cfg.semantic_context,
                                cfg.tie_embeddings, 0 if fine else cfg.mulan_vector_dim, cfg.cond_global and not fine,
                                ATTRIBUTE_VOCAB if cfg.attribute_input and not fine else 0,
                                cfg.acoustic_rate if cfg.beat_input and not fine else 0.0, cfg.semantic_onsets,
                                cfg.onset_input)

    def sampling_defaults(self) -> dict:
        """The pipeline's default knobs for this stage (GenerationOptions override them)."""
        return {"temperature": 0.8 if self.role == "fine" else 0.95}

    @property
    def takes_attributes(self) -> bool:
        """Does generate() read tempo and key ids (data/attributes.py)? The pipeline hands them only then."""
        return self.cfg.attribute_input

    @property
    def takes_onsets(self) -> bool:
        """Does generate() read onset levels (data/onsets.py)?"""
        return self.cfg.onset_input

    def level_names(self) -> list[str]:
        names = [f"coarse{q}" for q in range(self.cfg.coarse_levels)] + [f"fine{q}" for q in range(self.cfg.fine_levels)]
        return names[self.lo:self.hi]

    def cond(self, mulan: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
        """MuLan tokens [B, Q_m] with dropped rows set to the null id; [B, 0] for the fine role."""
        if self.role == "fine":
            return mulan.new_zeros(len(mulan), 0)
        return mulan if drop is None else torch.where(drop[:, None], torch.full_like(mulan, self.cfg.mulan_codebook), mulan)

    def loss(self, batch, drop_cond, model=None) -> dict:
        device = self.model.codes.weight.device
        codes = batch["acoustic"][:, self.lo:self.hi].to(device)
        _, K, T = codes.shape
        target, inputs = self.teacher_forced(codes)
        if (model or self.model).training and self.cfg.code_dropout > 0:   # hide some of the history: lean on the
            hide = torch.rand(inputs.shape, device=device) < self.cfg.code_dropout   # condition, not on copying
            inputs = inputs.masked_fill(hide, self.model.empty)
        semantic = frame_rate_ids(batch["semantic"].to(device), self.ratio, T)
        known = batch["acoustic"][:, :self.lo].to(device) if self.role == "fine" else None
        cond = self.cond(batch["mulan"].to(device), None if drop_cond is None else drop_cond.to(device))
        attrs = for_rows(batch.get("attrs"), cond, drop_cond) if self.cfg.attribute_input else None
        onsets = batch.get("onsets") if self.cfg.onset_input else None
        logits = (model or self.model)(cond, inputs, extend(semantic, T + K - 1), extend(known, T + K - 1), attrs=attrs,
                                       beat_start=batch.get("beat_start", 0.0),
                                       onsets=None if onsets is None else onsets.to(device))
        return level_losses(logits, target, target != self.model.empty)

    def teacher_forced(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """codes [B, K, T] -> the delayed targets [B, K, T + K - 1] and the inputs that predict them (shifted by one
        step, EMPTY first)."""
        target = delay(codes, self.model.empty)
        return target, torch.cat([target.new_full((*codes.shape[:2], 1), self.model.empty), target[..., :-1]], -1)

    @torch.no_grad()
    def score(self, mulan: torch.Tensor, semantic: torch.Tensor | None, codes: torch.Tensor,
              attributes: torch.Tensor | None = None) -> torch.Tensor:
        """Mean log-likelihood per row [B] of codes [B, K, T] given MuLan [B, Q_m] and semantic ids [B, T_s]
        (+ attribute ids [B, 2]) (teacher-forced): what rescoring another kind's candidates asks of this one."""
        _, K, T = codes.shape
        target, inputs = self.teacher_forced(codes)
        sem = None if semantic is None else extend(frame_rate_ids(semantic, self.ratio, T), T + K - 1)
        attrs = for_rows(attributes, mulan) if self.cfg.attribute_input else None
        logp = self.model(self.cond(mulan, None), inputs, sem, attrs=attrs).float().log_softmax(-1)   # [B, S, K, V]
        valid = target != self.model.empty
        picked = logp.permute(0, 2, 1, 3).gather(-1, target.clamp(max=self.model.codebook - 1)[..., None])[..., 0]
        return (picked * valid).sum((1, 2)) / valid.sum((1, 2))

    # ------------------------------------------------------------------ generation
    def generate(self, *args, **kwargs) -> torch.Tensor:
        """The signature of the role (stages.base.Stage): fine takes the coarse codes, the others MuLan +
        semantic ids."""
        return (self.generate_fine if self.role == "fine" else self.generate_codes)(*args, **kwargs)

    def generate_codes(self, mulan: torch.Tensor, semantic: torch.Tensor | None, frames: int, s: Sampling = Sampling(),
                       prompt: torch.Tensor | None = None, generator: torch.Generator | None = None,
                       use_cache: bool = True, progress=None, attributes: torch.Tensor | None = None,
                       beat_start: float = 0.0, onsets: torch.Tensor | None = None) -> torch.Tensor:
        """MuLan [B, Q_m] + semantic ids [B, T_s] covering prompt + new frames (+ prompt codes [B, K, P], + attribute
        ids [B, 2] for a stage trained with attribute_input; `beat_start`: where the prompt's first frame lies in
        the music, in seconds, for the beat clock; + onset levels [B, P + frames] for one with onset_input) -> new
        codes [B, K, frames]."""
        B, P = len(mulan), 0 if prompt is None else prompt.shape[-1]
        codes = torch.full((B, self.hi - self.lo, P + frames), -1, dtype=torch.long)
        if prompt is not None:
            codes[..., :P] = prompt[:, : self.hi - self.lo]
        sem = frame_rate_ids(semantic, self.ratio, P + frames) if semantic is not None else None
        null = self.cond(mulan, torch.ones(B, dtype=torch.bool))
        attrs = for_rows(attributes, mulan) if self.cfg.attribute_input else None
        out = self.decode(mulan, null, codes, sem, None, s, generator, use_cache, progress, attrs=attrs,
                          beat_start=beat_start, **({"onsets": onsets} if self.cfg.onset_input else {}))
        return out[..., P:]

    def generate_fine(self, coarse: torch.Tensor, s: Sampling = Sampling(), generator: torch.Generator | None = None,
                      use_cache: bool = True, progress=None, fine_prompt: torch.Tensor | None = None) -> torch.Tensor:
        """Coarse codes [B, Q_c, T] (+ known fine codes [B, Q_f, P], -1 = to sample) -> fine codes [B, Q_f, T]."""
        B, _, T = coarse.shape
        codes = torch.full((B, self.hi - self.lo, T), -1, dtype=torch.long)
        if fine_prompt is not None:
            codes[..., : fine_prompt.shape[-1]] = fine_prompt
        empty = coarse.new_zeros(B, 0)
        return self.decode(empty, None, codes, None, coarse[:, : self.lo], s, generator, use_cache, progress)

    @torch.inference_mode()
    def decode(self, cond, null, codes, semantic, known, s: Sampling, generator, use_cache=True, progress=None,
               attrs=None, beat_start: float = 0.0, onsets=None):
        """Fill the -1 cells of codes [B, K, T] step by step; cells >= 0 are kept (a prompt). With guidance,
        conditional and null rows (null attributes too) run as one batch and their logits are mixed; with
        s.attribute_guidance, so do the conditional rows with null attributes (stages.sampling.guide)."""
        model, (B, K, T) = self.model, codes.shape
        G = guided_rows(s, null is not None, attrs)   # row groups: cond (, null (, cond with null attributes))
        both = lambda x: None if x is None else torch.cat([x] * G)  # noqa: E731
        rows = torch.cat([cond, null, cond][:G])
        if attrs is not None and G > 1:
            attrs = torch.cat([attrs, null_like(attrs), null_like(attrs)][:G])
        semantic = model.semantic_features(both(extend(semantic, T + K - 1)), rows, attrs, beat_start, both(onsets))
        if semantic is not None and semantic.shape[1] == 1:   # cond_global without semantic ids: every step
            semantic = semantic.expand(-1, T + K - 1, -1)
        known = both(extend(known, T + K - 1))
        prefix = model.embed_prefix(rows)
        levels = torch.arange(K)

        def column(j: int) -> torch.Tensor:   # the pattern's column j [B, K]: frame j - k of level k, or EMPTY
            t = j - levels
            cells = codes[:, levels, t.clamp(0, T - 1)]
            return torch.where((t >= 0) & (t < T) & (cells >= 0), cells, model.empty)

        def step_input(a: int, b: int) -> torch.Tensor:   # inputs of steps a..b-1: columns a-1..b-2
            if b <= a:
                return prefix[:, :0]
            cols = torch.stack([column(j) for j in range(a - 1, b - 1)], -1)
            return model.embed_frames(both(cols), None if semantic is None else semantic[:, a:b],
                                      None if known is None else known[..., a:b])

        # steps whose outputs are all known (a prompt filling every row) are fed in one call
        P = int((codes >= 0).all(1).all(0).long().cumprod(0).sum())
        seq = torch.cat([prefix, step_input(0, P)], 1)
        cache = model.new_cache() if use_cache else None
        if use_cache and seq.shape[1]:
            run_blocks(model.blocks, seq, model.heads, 0, cache)
        for step in range(P, T + K - 1):
            x = step_input(step, step + 1)
            if use_cache:   # one step's work: this position attends to the cached ones
                h = run_blocks(model.blocks, x, model.heads, prefix.shape[1] + step, cache)
            else:           # recompute the whole sequence (tests and benchmarks)
                seq = torch.cat([seq, x], 1)
                h = run_blocks(model.blocks, seq, model.heads)[:, -1:]
            logits = model.logits(h)[:, -1]                      # [rows, K, V]
            if G > 1:
                logits = guide(logits, B, s)
            for k in range(K):
                t = step - k
                if 0 <= t < T and (codes[:, k, t] < 0).any():
                    new = sample(logits[:, k], s.at_level(k), generator)
                    codes[:, k, t] = torch.where(codes[:, k, t] >= 0, codes[:, k, t], new)
            if progress is not None:
                progress.update(1)
        return codes


if __name__ == "__main__":
    from stages.train import main
    main("delay")
