"""Sampling: small plain functions and one dataclass for all the knobs."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from data.attributes import null_like


@dataclass
class Sampling:
    """Knobs of one stage. temperature, top_k and top_p may also be lists, one value per level of a
    stage that makes several levels at once (the last value repeats): see `at_level`."""
    temperature: float | list = 1.0
    top_k: int | list = 0          # 0: off
    top_p: float | list = 1.0      # 1.0: off
    guidance: float = 1.0          # classifier-free guidance scale; 1.0: off
    attribute_guidance: float = 0.0   # attribute stages: extra push toward the stated tempo and key (see `guide`)
    beat_copy: float = 0.0         # semantic stages, prompts stating a bpm: logit bonus of the id one beat back (`beat_bias`)
    beat_pick: int = 1             # semantic stages, prompts stating a bpm: make this many, keep the one whose ids pulse most
    beat_pick_by: str = "repeats"  # ... by data.attributes.PULSE_MEASURES: "repeats" (id_pulse) or "onsets" (onset_pulse)
    # masked (MAGNeT) decoding only
    steps: int | list = 10         # decoding steps per level (the paper: [20, 10, 10, 10])
    guidance_end: float | None = None   # anneal guidance to this as the mask empties (the paper: 10 -> 1)
    anneal_temperature: bool = True     # temperature falls linearly to 0 over each level's steps
    candidates: int = 1            # masked: decode this many per row and keep the best score
    rescore_weight: float = 0.0    # masked: weight of the ar_stage log-likelihood in that score (vs its own confidence)
    hybrid_seconds: float = 0.0    # masked: the first seconds of a window come from ar_stage, the rest from masking
    ar_stage: str = ""             # masked: an autoregressive stage of the same role (path), for the two above

    def at_level(self, k: int) -> "Sampling":
        pick = lambda v: v[min(k, len(v) - 1)] if isinstance(v, (list, tuple)) else v  # noqa: E731
        return replace(self, temperature=pick(self.temperature), top_k=pick(self.top_k), top_p=pick(self.top_p))


def parse_knob(key: str, text: str):
    """One knob from text ('temperature', '0.8' -> 0.8), checked against the Sampling field's type; ValueError
    naming the problem otherwise."""
    import dataclasses

    import yaml
    fields = {f.name: f for f in dataclasses.fields(Sampling)}
    if key not in fields or not text:
        raise ValueError(f"KEY is one of {', '.join(fields)}")
    value = yaml.safe_load(text)
    default = fields[key].default
    if isinstance(default, (int, float)) and not isinstance(default, bool) and not isinstance(value, (int, float, list)) \
            or isinstance(default, bool) and not isinstance(value, bool) or isinstance(default, str) and not isinstance(value, str):
        raise ValueError(f"{key} takes a value like {default!r}")
    return value


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of ids whose probability mass reaches p (nucleus sampling)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    mass = sorted_logits.softmax(-1).cumsum(-1)
    drop = mass - sorted_logits.softmax(-1) >= p          # mass before this id already reached p
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def cfg_mix(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on logits: uncond + scale * (cond - uncond)."""
    return uncond + scale * (cond - uncond)


def guide(logits: torch.Tensor, B: int, s: Sampling) -> torch.Tensor:
    """Mix the logits of guided rows [G * B, ...] -> [B, ...]. G = 2: [cond; uncond], classifier-free guidance.
    G = 3: [cond; uncond; cond with null attribute ids], and the attribute term is added on top (separate scales
    per condition, as multi-condition guidance does):  uncond + g * (cond - uncond) + a * (cond - cond_no_attrs)."""
    out = cfg_mix(logits[:B], logits[B:2 * B], s.guidance)
    if logits.shape[0] > 2 * B:
        out = out + s.attribute_guidance * (logits[:B] - logits[2 * B:])
    return out


def guided_rows(s: Sampling, has_null: bool, attrs: torch.Tensor | None) -> int:
    """How many row groups guidance needs: 1 (none), 2 (cond, uncond) or 3 (+ cond with null attributes: only where
    some row states an attribute; otherwise that group would equal the conditional one)."""
    if not has_null:
        return 1
    if attrs is not None and s.attribute_guidance != 0.0 and bool((attrs != null_like(attrs)).any()):
        return 3
    return 2 if s.guidance != 1.0 else 1


def beat_bias(logits: torch.Tensor, history: torch.Tensor, lag: torch.Tensor, weight: float) -> torch.Tensor:
    """Add `weight` to the logit of the id one beat back: logits [B, V], history [B, t] (the ids before this frame,
    at one id per frame), lag [B] the beat in frames (0: no tempo stated; left alone). Real semantic ids repeat at
    the beat more than off it, generated ones do not (data.attributes.id_pulse); this prior puts
    the stated pulse into the ids. A fractional beat (20.8 frames at 72 bpm and 25 Hz) splits the bonus between
    the ids floor(lag) and ceil(lag) back, in proportion, so the mean period is the beat itself, not a rounded one."""
    if weight == 0.0:
        return logits
    t = history.shape[1]
    for back, share in ((lag.floor(), 1 - lag.frac()), (lag.ceil(), lag.frac())):
        ok = (lag > 0) & (back >= 1) & (back <= t)
        if bool(ok.any()):
            ids = history.gather(1, (t - back.long()).clamp(0, max(t - 1, 0))[:, None])
            logits = logits.scatter_add(1, ids, (weight * share * ok).to(logits.dtype)[:, None])
    return logits


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> ids [B]; temperature 0 means greedy."""
    if s.temperature <= 0:
        return logits.argmax(-1)
    logits = top_p_filter(top_k_filter(logits / s.temperature, s.top_k), s.top_p)
    return torch.multinomial(logits.float().softmax(-1), 1, generator=generator)[:, 0]


@torch.inference_mode()   # like no_grad, minus the per-op autograd bookkeeping
def generate(model, prefix: torch.Tensor, prefix_levels: torch.Tensor, levels: torch.Tensor,
             s: Sampling = Sampling(), forced: torch.Tensor | None = None, null_prefix: torch.Tensor | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True, progress=None,
             extra: torch.Tensor | None = None, attrs: torch.Tensor | None = None,
             null_attrs: torch.Tensor | None = None, null_extra: torch.Tensor | None = None,
             beat_lag: torch.Tensor | None = None) -> torch.Tensor:
    """Continue `prefix` [B, P] with len(levels) tokens of the given levels -> [B, len(levels)].

    `forced` [B, N] gives tokens to copy instead of sampling where >= 0 (e.g. known coarse
    codes); a run of positions forced in every row is fed to the model in one call. With
    `null_prefix` (the prefix with its condition replaced by null tokens) and guidance != 1,
    conditional and unconditional rows run in one batch and their logits are mixed.
    `use_cache=False` recomputes the whole sequence each step (for tests/benchmarks). `extra` [B, P + N]: a
    side-input id of every position (e.g. the melody), summed into its input by the model. `attrs` [B, A]: each
    row's attribute ids (tempo, key), `null_attrs` those of the unconditional rows (the stages pass the null ids,
    as training drops them with the condition; default: the same as `attrs`); with s.attribute_guidance a third
    group of rows, the condition with `null_attrs`, runs beside them (see `guide`). `null_extra`: the side input
    of the rows with `null_attrs` where it differs (the beat clock follows the tempo attribute; default `extra`).
    `beat_lag` [B]: each row's beat in frames for s.beat_copy (a one-level stage, one id per frame: the ids looked
    back at are the prefix's positions of the generated level, then the new ones).
    """
    B, P = prefix.shape
    N = len(levels)
    G = guided_rows(s, null_prefix is not None, attrs)
    guided = G > 1
    seq = torch.cat([prefix, null_prefix, prefix][:G])
    all_levels = torch.cat([prefix_levels, levels])
    forced = forced if forced is not None else torch.full((B, N), -1, dtype=torch.long)
    known = forced >= 0
    everywhere = known.all(0).tolist()   # positions copied in every row need no logits
    first = int(levels.min()) if N else 0   # per-level knobs count from the first generated level
    groups = [extra] + [extra if null_extra is None else null_extra] * 2   # cond, uncond, cond without attributes
    side = lambda a, b: None if extra is None else torch.cat([x[:, a:b] for x in groups[:G]])  # noqa: E731
    if attrs is not None and guided:
        null_attrs = attrs if null_attrs is None else null_attrs
        attrs = torch.cat([attrs, null_attrs, null_attrs][:G])
    own = prefix[:, prefix_levels == levels[0]] if N else prefix   # the prompt's ids, for beat_lag
    cache = model.new_cache() if use_cache else None
    h = model.hidden(seq, prefix_levels, 0, cache, side(0, P), attrs)[:, -1]
    out = torch.zeros(B, N, dtype=torch.long)
    i = 0
    while i < N:
        if everywhere[i]:
            out[:, i] = forced[:, i]
        else:
            logits = model.logits(h, int(levels[i]))
            if guided:
                logits = guide(logits, B, s)
            if beat_lag is not None:
                logits = beat_bias(logits, torch.cat([own, out[:, :i]], 1), beat_lag, s.beat_copy)
            out[:, i] = torch.where(known[:, i], forced[:, i], sample(logits, s.at_level(int(levels[i]) - first), generator))
        j = i + 1
        while j < N and everywhere[j]:   # copy the forced run that follows and feed it with token i
            out[:, j] = forced[:, j]
            j += 1
        if progress is not None:
            progress.update(j - i)
        if j == N:
            break
        chunk = torch.cat([out[:, i:j]] * G)
        if use_cache:
            h = model.hidden(chunk, levels[i:j], P + i, cache, side(P + i, P + j), attrs)[:, -1]
        else:
            seq = torch.cat([seq, chunk], 1)
            h = model.hidden(seq, all_levels[: P + j], extra=side(0, P + j), attrs=attrs)[:, -1]
        i = j
    return out
