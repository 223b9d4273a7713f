"""MAGNeT's masked non-autoregressive decoding on the frame-aligned layout.
`python -m stages.masked --config configs/masked.yaml`.

All frames at once, level by level. A training step picks one level k: the levels below are
given, the levels above hidden (EMPTY), and level k is masked (MASK) in spans of `span` frames at
a rate drawn from a cosine schedule; the loss is on the masked cells of level k. K = 3, T = 8, k = 1:

    frame      1   2   3   4   5   6   7   8
    level 0   a1  a2  a3  a4  a5  a6  a7  a8     given
    level 1   b1   M   M   M  b5  b6   M   M     predict the M cells
    level 2    S   S   S   S   S   S   S   S     hidden

The semantic ids (and, for the fine role, the coarse codes) are summed into their frames as in
every frame-aligned kind (stages/frames.py). Attention is bidirectional; for the levels above
the first it is restricted to +-context_window frames (MAGNeT's ~200 ms, the codec's receptive
field), the MuLan prefix staying in view. Decoding (`decode`) fills level 0 in steps[0] steps,
then level 1, ...: after step i of S the masked share is cos(pi/2 (i+1)/S); every masked cell is
sampled, each span scored by the highest probability inside it, and the least confident spans
are masked again. Guidance is annealed from `guidance` to `guidance_end` as the mask shrinks and
the temperature falls linearly to 0 (the paper: 10 -> 1, temperature 3.0, top-p 0.9).
"""
from __future__ import annotations

import math

import torch

from common.errors import UserError
from stages.delay import DelayStage
from stages.frames import frame_rate_ids, level_losses
from stages.sampling import Sampling, cfg_mix, top_k_filter, top_p_filter


def span_mask(B: int, T: int, rate: torch.Tensor, span: int, g: torch.Generator | None) -> torch.Tensor:
    """[B, T] bool: spans of `span` frames at random starts, as many as make the expected masked share of row b
    equal rate[b] (starts overlap: 1 - (1 - span/T)^n = rate), at least one span per row."""
    p = min(1.0, span / T)
    n = torch.log1p(-rate.clamp(max=0.999)) / math.log1p(-p) if p < 1 else torch.ones_like(rate)
    n = n.round().clamp(min=1).long()
    starts = torch.rand(B, T, generator=g).argsort(1)                # a random order of starts per row
    chosen = torch.arange(T)[None] < n[:, None]                      # the first n of them
    first = torch.zeros(B, T, dtype=torch.bool).scatter(1, starts, chosen)
    out = first.clone()
    for d in range(1, span):          # each start masks `span` frames (clipped at the end)
        out[:, d:] |= first[:, :-d]
    return out


def attention_mask(prefix: int, T: int, window: int) -> torch.Tensor | None:
    """None (all see all) or [P + T, P + T] bool: frames see the prefix and the frames within +-window; the
    prefix sees only itself (as a cross-attended text would), so nothing from afar reaches a frame through it."""
    if window <= 0:
        return None
    t = torch.arange(T)
    mask = torch.zeros(prefix + T, prefix + T, dtype=torch.bool)
    mask[:, :prefix] = True
    mask[prefix:, prefix:] = (t[:, None] - t[None]).abs() <= window
    return mask


class MaskedStage(DelayStage):
    """Shares the roles, the model and the role-specific generate signatures of the delay kind; differs in the
    training objective and in decoding."""
    kind, roles = "masked", ("coarse", "fine", "acoustic")

    def sampling_defaults(self) -> dict:
        """MAGNeT's decoding (temperature 3.0 annealed to 0, top-p 0.9, guidance annealed to 1), with fewer
        steps per level than the paper's [20, 10, 10, 10]: on a CPU every step is a full forward pass."""
        return {"temperature": 3.0, "top_p": 0.9, "guidance_end": 1.0, "steps": [12, 6, 4]}

    def level_mask(self, k: int, T: int) -> torch.Tensor | None:
        """Full attention for the first level, +-context_window frames for the others."""
        prefix = 0 if self.role == "fine" else self.cfg.mulan_levels
        return attention_mask(prefix, T, self.cfg.context_window if k > 0 else 0)

    def inputs(self, codes: torch.Tensor, k: int, masked: torch.Tensor) -> torch.Tensor:
        """codes [B, K, T] -> the input ids: levels < k as they are, level k with MASK where `masked`, above EMPTY."""
        x = codes.clone()
        x[:, k] = torch.where(masked, self.model.mask_id, codes[:, k])
        x[:, k + 1:] = self.model.empty
        return x

    def loss(self, batch, drop_cond, model=None, generator: torch.Generator | None = None) -> dict:
        """A random level and cosine-scheduled span mask per call in training; in eval mode every level, with
        masks from a fixed generator, so the held-out loss is comparable across evaluations."""
        model = model or self.model
        device = self.model.codes.weight.device
        codes = batch["acoustic"][:, self.lo:self.hi].to(device)
        B, K, T = codes.shape
        semantic = frame_rate_ids(batch["semantic"].to(device), self.ratio, T)
        known = batch["acoustic"][:, :self.lo].to(device) if self.role == "fine" else None
        cond = self.cond(batch["mulan"].to(device), None if drop_cond is None else drop_cond.to(device))
        training = model.training
        g = generator or (None if training else torch.Generator().manual_seed(0))
        levels = [int(torch.randint(K, (1,), generator=g))] if training else range(K)
        stats, total, count = {}, 0.0, 0
        for k in levels:
            rate = torch.cos(math.pi / 2 * torch.rand(B, generator=g))
            masked = span_mask(B, T, rate, self.cfg.span, g)
            logits = model(cond, self.inputs(codes, k, masked), semantic, known, self.level_mask(k, T))
            out = level_losses(logits[:, :, k:k + 1], codes[:, k:k + 1], masked[:, None])
            stats[k] = out["per_level"][0]
            total, count = total + out["loss"] * stats[k][2], count + stats[k][2]
            if training and self.cfg.unmasked_weight > 0:   # the given cells too: an easy signal early in training
                given = level_losses(logits[:, :, k:k + 1], codes[:, k:k + 1], ~masked[:, None])
                total = total + self.cfg.unmasked_weight * given["loss"] * stats[k][2]
        return {"loss": total / max(count, 1), "per_level": stats}

    # ------------------------------------------------------------------ decoding
    @property
    def takes_attributes(self) -> bool:
        """The masked kind reads no attributes, but hands them to its autoregressive helper (hybrid, rescoring)."""
        return True

    def generate_codes(self, mulan, semantic, frames, s: Sampling = Sampling(), prompt=None, generator=None,
                       use_cache=True, progress=None, attributes=None):
        """As the delay kind's, plus MAGNeT's two extras (knobs of `s`, with an autoregressive `s.ar_stage`):
        the hybrid (its first `hybrid_seconds` of the window autoregressively, the rest by masking, conditioned on
        them) and rescoring (`candidates` decodings per row, the best by a mix of this model's confidence and
        the autoregressive stage's log-likelihood, weighted by `rescore_weight`)."""
        ar = helper_stage(s.ar_stage, self.role) if s.ar_stage else None
        if (s.hybrid_seconds > 0 or s.rescore_weight > 0) and ar is None:
            raise UserError("hybrid_seconds and rescore_weight need ar_stage=PATH (an autoregressive stage of "
                            f"the {self.role} role, e.g. a delay-pattern checkpoint)")
        head = None
        if s.hybrid_seconds > 0:
            n = min(frames, int(round(s.hybrid_seconds * self.cfg.acoustic_rate)))
            head = ar.generate_codes(mulan, semantic, n, Sampling(**{**ar.sampling_defaults(), "guidance": s.guidance}),
                                     prompt, generator, attributes=attributes)
            prompt = head if prompt is None else torch.cat([prompt, head], -1)
            frames -= n
        C = max(1, s.candidates)
        rep = lambda x: None if x is None else x.repeat_interleave(C, 0)  # noqa: E731
        self.confidence = None
        out = DelayStage.generate_codes(self, rep(mulan), rep(semantic), frames, s, rep(prompt), generator, use_cache,
                                        progress) if frames > 0 else mulan.new_zeros(len(mulan) * C, self.hi - self.lo, 0)
        if C > 1:
            score = zscore(self.confidence.view(-1, C))
            if s.rescore_weight > 0:
                full = out if prompt is None else torch.cat([rep(prompt)[:, : self.hi - self.lo], out], -1)
                ll = ar.score(rep(mulan), rep(semantic), full, rep(attributes)).view(-1, C)
                score = (1 - s.rescore_weight) * score + s.rescore_weight * zscore(ll)
            out = out.view(-1, C, *out.shape[1:])[torch.arange(len(mulan)), score.argmax(1)]
        return out if head is None else torch.cat([head, out], -1)

    @torch.inference_mode()
    def decode(self, cond, null, codes, semantic, known, s: Sampling, generator, use_cache=True, progress=None,
               attrs=None, beat_start: float = 0.0):
        """Fill the -1 cells of codes [B, K, T], level by level (cells >= 0 are kept: a prompt). Leaves in
        self.confidence [B] the mean log-probability of the cells it filled, as they were last sampled.
        (`attrs` is always None and `beat_start` unused here: training refuses attribute_input for the masked kind.)"""
        B, K, T = codes.shape
        logp_sum, filled = torch.zeros(B), torch.zeros(B)
        guided = null is not None and s.guidance != 1.0
        both = lambda x: None if x is None else (torch.cat([x, x]) if guided else x)  # noqa: E731
        cond_rows = torch.cat([cond, null]) if guided else cond
        sem_rows = both(semantic)
        steps = list(s.steps) if isinstance(s.steps, (list, tuple)) else [s.steps]
        for k in range(K):
            todo = codes[:, k] < 0
            if not todo.any():
                continue
            mask_k = self.level_mask(k, T)
            n_steps = steps[min(k, len(steps) - 1)]
            level_s = s.at_level(k)
            for i in range(n_steps):
                masked = codes[:, k] < 0
                share = math.cos(math.pi / 2 * i / n_steps)          # masked share now: anneals guidance
                x = self.inputs(codes.clamp(min=0), k, masked)
                logits = self.model(cond_rows, both(x), sem_rows, both(known), mask_k)[:, :, k].float()
                if guided:
                    scale = s.guidance if s.guidance_end is None else share * s.guidance + (1 - share) * s.guidance_end
                    logits = cfg_mix(logits[:B], logits[B:], scale)
                temp = level_s.temperature * (1 - i / n_steps) if s.anneal_temperature else level_s.temperature
                ids, prob = sample_cells(logits, temp, level_s, generator)
                codes[:, k] = torch.where(masked, ids, codes[:, k])
                after = math.cos(math.pi / 2 * (i + 1) / n_steps)
                if after > 1e-6:
                    codes[:, k] = remask(codes[:, k], masked, torch.where(masked, prob, 2.0), todo, after, self.cfg.span)
                kept = masked & (codes[:, k] >= 0)          # sampled now and not masked again: final
                logp_sum += (prob.clamp(min=1e-12).log() * kept).sum(1)
                filled += kept.sum(1)
                if progress is not None:
                    progress.update(1)
        self.confidence = logp_sum / filled.clamp(min=1)
        return codes


_HELPERS: dict[tuple[str, str], object] = {}


def helper_stage(path: str, role: str):
    """The autoregressive stage at `path` (loaded once), for the hybrid and for rescoring."""
    from stages.base import load_stage
    if (path, role) not in _HELPERS:
        stage = load_stage(path, role)
        if not hasattr(stage, "score"):
            raise UserError(f"ar_stage {path} is a '{stage.kind}' stage; rescoring and the hybrid need a frame-aligned "
                            "autoregressive one (kind delay)")
        _HELPERS[path, role] = stage
    return _HELPERS[path, role]


def zscore(x: torch.Tensor) -> torch.Tensor:
    """Standardise each row [B, C] (candidates compared within a row only)."""
    return (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True).clamp(min=1e-6)


def sample_cells(logits: torch.Tensor, temperature: float, s: Sampling, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, T, V] -> sampled ids [B, T] and their probability under the (unfiltered) distribution."""
    probs = logits.softmax(-1)
    if temperature <= 1e-6:
        ids = logits.argmax(-1)
    else:
        filtered = top_p_filter(top_k_filter(logits / temperature, s.top_k), s.top_p)
        flat = filtered.reshape(-1, filtered.shape[-1]).softmax(-1)
        ids = torch.multinomial(flat, 1, generator=generator).reshape(logits.shape[:-1])
    return ids, probs.gather(-1, ids[..., None])[..., 0]


def remask(level: torch.Tensor, sampled: torch.Tensor, conf: torch.Tensor, todo: torch.Tensor, share: float,
           span: int) -> torch.Tensor:
    """Set back to -1 the least confident spans among those sampled at this step, so that `share` of the spans
    that had cells to fill stays masked. A span's confidence is the highest probability inside it."""
    B, T = level.shape
    n_spans = -(-T // span)
    pad = n_spans * span - T
    pad_to = lambda x, v: torch.nn.functional.pad(x, (0, pad), value=v)  # noqa: E731
    span_conf = pad_to(torch.where(sampled, conf, -1.0), -1.0).view(B, n_spans, span).amax(-1)
    span_sampled = pad_to(sampled, False).view(B, n_spans, span).any(-1)
    span_conf = torch.where(span_sampled, span_conf, float("inf"))          # only this step's spans may go back
    total = pad_to(todo, False).view(B, n_spans, span).any(-1).sum(1)      # spans that had anything to fill
    n_back = (share * total.float()).floor().long().clamp(max=span_sampled.sum(1))
    order = span_conf.argsort(1)
    back_spans = torch.zeros(B, n_spans, dtype=torch.bool).scatter(1, order, torch.arange(n_spans)[None] < n_back[:, None])
    back = back_spans.repeat_interleave(span, 1)[:, :T] & sampled
    return torch.where(back, -1, level)


if __name__ == "__main__":
    from stages.train import main
    main("masked")
