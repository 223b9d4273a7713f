"""Attributes a prompt states in so many words, as a second condition beside MuLan's tokens: tempo and key.

MuLan's tokens say what a clip sounds like, but a contrastive embedding quantized into 12 tokens keeps "slow"
vs "fast" rather than 96 vs 120 bpm, and hardly the tonic: measured by the stage-wise oracle, the coarse stage
handed a clip's true semantic ids and its MuLan tokens gets the key right 0.16 of the time (the codec 0.44).
Every corpus clip's metadata has its exact tempo and key, so a stage can learn them as ids, dropped at random in
training (`attribute_dropout`, each attribute on its own) so that it also works when a prompt states neither,
and read them from the prompt at inference (`from_texts`: "96 bpm", "in G minor"). An attribute the prompt does
not state is its null id. Both ids index one table; their embeddings are summed into every position of the
stage's sequence (a stage with `attribute_input`).

    raw  [B, 2]  (bpm, key index 0..23 = C major .. B major, C minor .. B minor), 0 / -1 = unknown
    ids  [B, 2]  (tempo bin: 1 + round(log_1.03(bpm / 40)), 0 = none;  TEMPO_VOCAB + key + 1, TEMPO_VOCAB = none)
"""
from __future__ import annotations

import math
import re

import torch

from data.render import PITCH_NAMES as PITCHES   # the corpus's spelling of the twelve tonics

TEMPO_LOW, TEMPO_STEP, TEMPO_BINS = 40.0, 1.03, 63        # 40 .. ~250 bpm in 3% steps (the tempo check allows 4%)
TEMPO_VOCAB = 1 + TEMPO_BINS
KEY_VOCAB = 1 + 24
VOCAB = TEMPO_VOCAB + KEY_VOCAB
NULL = (0, TEMPO_VOCAB)
ALIASES = {"Db": "C#", "D#": "Eb", "Gb": "F#", "G#": "Ab", "A#": "Bb", "Cb": "B", "Fb": "E", "E#": "F", "B#": "C"}
_ACCIDENTAL = r"(#|♯|b|♭|-sharp|-flat| sharp| flat)?"
_TONIC = r"(?<![A-Za-z])(?-i:([A-G]))"   # a capital letter, whatever the case of the words around it
_KEY_WITH_MODE = re.compile(_TONIC + _ACCIDENTAL + r"[\s-]*(major|minor|maj|min)\b", re.I)
_KEY_BARE = re.compile(r"\b(?:in|key of|key:)\s+" + _TONIC + _ACCIDENTAL + r"(m)?(?=\s*(?:[-,.;:!()|]|$|key\b))", re.I)
_NUMBER = r"(?<![\d.])(\d{2,3}(?:\.\d+)?)"
_BPM_PATTERNS = [re.compile(_NUMBER + r"[\s-]*(?:bpm|b\.p\.m\.?|beats?\s+(?:per|a|each|every)\s+minute)", re.I),
                 re.compile(r"\b(?:tempo|metronome(?:\s+at)?|pulse\s+of|pace\s+of|bpm)\s*(?:of|at|=|:)?\s*" + _NUMBER
                            + r"(?![\d/]|s\b)", re.I)]


def key_index(key: str | None) -> int:
    """"G minor", "Bb major", "E- minor" (music21's flat) -> 0..23 (minor keys from 12); -1 for None or unknown."""
    if not key:
        return -1
    tonic, _, mode = key.strip().partition(" ")
    tonic = tonic[:1].upper() + tonic[1:].replace("-", "b")
    tonic = ALIASES.get(tonic, tonic)
    if tonic not in PITCHES or mode.lower() not in ("major", "minor"):
        return -1
    return PITCHES.index(tonic) + (12 if mode.lower() == "minor" else 0)


def bpm_in_text(text: str) -> float | None:
    """The tempo a text asks for in numbers ("96 bpm", "96-BPM", "tempo 96", "BPM: 96", "96 beats per minute",
    "metronome at 96"), or None when it names none (pace words like "slow" are left to the text condition).
    Meters ("6/8") and decades ("tempo 60s") never count."""
    for pattern in _BPM_PATTERNS:
        for m in pattern.finditer(text):
            bpm = float(m.group(1))
            if 20 <= bpm <= 400:
                return bpm
    return None


def _article(text: str, m: re.Match) -> bool:
    """Is this "A major ..." / "A minor ..." the article "a" before an adjective ("A major hit", "A minor-key
    ballad")? Only at the start of a sentence and when words go on after it."""
    if m.group(1) != "A" or m.group(2):
        return False
    before, after = text[: m.start()].rstrip(), text[m.end():]
    return (not before or before[-1] in ".!?;:") and re.match(r"\s*[-\w]", after) is not None


def key_in_text(text: str) -> str | None:
    """The key a text names ("in G minor", "F# maj", "key of Eb", "In Am, slow"), as "G minor"; None if it names
    none. The tonic must be a capital letter ("in a minute" is no key) and a sentence-initial "A major hit" is an
    article; a bare tonic ("in G") means major, a trailing m minor."""
    for m in _KEY_WITH_MODE.finditer(text):
        if not _article(text, m):
            return _name(m, "minor" if m.group(3).lower().startswith("min") else "major")
    m = _KEY_BARE.search(text)
    return _name(m, "minor" if m.group(3) else "major") if m else None


def _name(m: re.Match, mode: str) -> str:
    acc = (m.group(2) or "").strip().lstrip("-").lower()
    sign = {"#": "#", "♯": "#", "sharp": "#", "b": "b", "♭": "b", "flat": "b"}.get(acc, "")
    tonic = m.group(1) + sign
    return f"{ALIASES.get(tonic, tonic)} {mode}"


BEAT_BINS = 8                # phase of the beat in eighths
BEAT_VOCAB = 1 + BEAT_BINS   # 0: no tempo stated, no grid


def tempo_bpm(tempo_ids: torch.Tensor) -> torch.Tensor:
    """Tempo ids [B] -> the bpm at each bin's centre [B] (0 where the id is none)."""
    bpm = TEMPO_LOW * TEMPO_STEP ** (tempo_ids.double() - 1)
    return torch.where(tempo_ids > 0, bpm, torch.zeros_like(bpm))


def beat_frames(attrs: torch.Tensor, rate: float) -> torch.Tensor:
    """ids [B, 2] -> each row's beat in frames at `rate` Hz [B] (float; 0 where no tempo is stated)."""
    bpm = tempo_bpm(attrs[:, 0])
    return torch.where(bpm > 0, rate * 60 / bpm.clamp(min=1e-9), torch.zeros_like(bpm)).float()


def id_pulse(ids: torch.Tensor, beat: float) -> float:
    """Semantic ids [T] -> the share of frames whose id equals the id 1, 2 and 4 beats (`beat`, in frames) earlier,
    minus the share at off-beat lags (half and quarter beats between): above 0 where the ids repeat with the beat
    (the corpus's ids: +0.05 on average, README "Where the beat is lost"); nan for a clip under a beat + 10 frames."""
    def match(lag: float) -> float:
        k = int(round(lag))
        return float((ids[:-k] == ids[k:]).double().mean()) if 0 < k < len(ids) - 10 else math.nan
    on = [match(k * beat) for k in (1, 2, 4)]
    off = [match((k + 0.5) * beat) for k in range(4)] + [match((k + 0.25) * beat) for k in (1, 2, 3)]
    mean = lambda v: sum(x for x in v if not math.isnan(x)) / max(1, sum(not math.isnan(x) for x in v))  # noqa: E731
    return mean(on) - mean(off) if not math.isnan(on[0]) else math.nan


def onset_pulse(ids: torch.Tensor, beat: float) -> float:
    """Semantic ids [T] -> how much their onsets keep the beat: the autocorrelation of the id-change indicator (1
    where a frame's id differs from the one before, as at a new note) at 1 and 2 beats (`beat`, in frames), minus
    its mean at off-beat lags (0.5, 1.25, 1.5, 2.25, 3.25 beats). Scored pieces' ids hold a note's id across a beat
    less often than grooves', so `id_pulse` misses their beat (reference ids above 0.02 in 38% of 245 held-out
    scored clips) where this finds it (80%; grooves 92% / 88%); nan for a clip too short or without changes."""
    c = (ids[1:] != ids[:-1]).double()
    c = c - c.mean()
    var = float((c * c).mean())

    def corr(lag: float) -> float:
        k = int(round(lag))
        return float((c[:-k] * c[k:]).mean()) / var if 0 < k < len(c) - 10 and var > 0 else math.nan
    on = [x for x in (corr(beat), corr(2 * beat)) if not math.isnan(x)]
    off = [x for x in (corr(f * beat) for f in (0.5, 1.25, 1.5, 2.25, 3.25)) if not math.isnan(x)]
    return sum(on) / len(on) - sum(off) / len(off) if on and off else math.nan


PULSE_MEASURES = {"repeats": id_pulse, "onsets": onset_pulse}   # Sampling.beat_pick_by


def pulse_measure(name: str):
    """The PULSE_MEASURES function called `name` (Sampling.beat_pick_by); ValueError naming the choices otherwise."""
    if name not in PULSE_MEASURES:
        raise ValueError(f"beat_pick_by is one of {', '.join(PULSE_MEASURES)}, got {name!r}")
    return PULSE_MEASURES[name]


def beat_grid(attrs: torch.Tensor, frames: int, rate: float, start: float | torch.Tensor = 0.0) -> torch.Tensor:
    """A beat clock from each row's tempo id: ids [B, 2] -> [B, frames] beat-phase ids, frame t (at `rate` Hz) of a
    window that begins `start` seconds into the clip (a number, or one per row [B]) in bin
    1 + floor(BEAT_BINS * frac((start + t / rate) * bpm / 60)), 0 for every frame of a row whose tempo is none.

        120 bpm at 25 Hz (12.5 frames a beat), start 0:  1 1 2 2 3 4 4 5 6 6 7 8 8 1 1 2 ...

    Frames one beat apart share an id: a stage that sums these into its frames need not find the period itself.
    The clock counts from the clip's start (a corpus clip starts on a note onset), so a window cut from the
    middle of a clip, in training or in the pipeline's sliding windows, passes its own start."""
    t0 = torch.as_tensor(start, dtype=torch.float64, device=attrs.device).reshape(-1, 1)
    t = t0 + torch.arange(frames, dtype=torch.float64, device=attrs.device)[None] / rate
    beats = t * tempo_bpm(attrs[:, 0])[:, None] / 60
    phase = 1 + (beats.frac() * BEAT_BINS).long().clamp(max=BEAT_BINS - 1)
    return torch.where(attrs[:, :1] > 0, phase, torch.zeros_like(phase))


def ids(raw: torch.Tensor) -> torch.Tensor:
    """raw [B, 2] (bpm, key index) -> ids [B, 2] in the one table (unknowns -> the null ids)."""
    bpm, key = raw[:, 0].double(), raw[:, 1].long()
    tempo = 1 + torch.round(torch.log(bpm.clamp(min=1.0) / TEMPO_LOW) / math.log(TEMPO_STEP)).clamp(0, TEMPO_BINS - 1)
    tempo = torch.where(bpm > 0, tempo.long(), torch.zeros_like(key))
    return torch.stack([tempo, TEMPO_VOCAB + torch.where(key >= 0, key + 1, torch.zeros_like(key))], 1)


def null_like(x: torch.Tensor) -> torch.Tensor:
    """The null ids, shaped like ids x [B, 2] (or [B, ...]: one row per row of x), on x's device."""
    return torch.tensor(NULL, dtype=torch.long, device=x.device).expand(len(x), -1).clone()


def for_rows(attrs: torch.Tensor | None, like: torch.Tensor, dropped: torch.Tensor | None = None) -> torch.Tensor:
    """What an attribute stage is given for the rows of `like` [B, ...]: `attrs` [B, 2], or the null ids where none
    are known (as in training, a stage never sees "no input", only null ids), and null in the rows whose condition
    is `dropped` [B] (guidance's unconditional rows)."""
    out = null_like(like) if attrs is None else attrs.to(like.device)
    return out if dropped is None else drop(out, dropped.to(out.device))


def drop(x: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """ids x [B, 2] with the cells `where` [B, 2] (or rows, [B]) set to their null id."""
    where = where[:, None].expand_as(x) if where.dim() == 1 else where
    return torch.where(where, null_like(x), x)


def from_texts(texts: list[str]) -> torch.Tensor:
    """Prompts -> ids [B, 2] of the tempo and key they state in words."""
    raw = [[bpm_in_text(t) or 0.0, key_index(key_in_text(t))] for t in texts]
    return ids(torch.tensor(raw, dtype=torch.float64))


def stated(text: str) -> str:
    """What a prompt states, in words for the user: "120 bpm, G minor", or "no tempo or key"."""
    bpm, key = bpm_in_text(text), key_in_text(text)
    low, high = TEMPO_LOW, TEMPO_LOW * TEMPO_STEP ** (TEMPO_BINS - 1)
    note = f" (read as {min(max(bpm, low), high):.0f}: the stages know {low:.0f}-{high:.0f})" if bpm and not low <= bpm <= high else ""
    parts = ([f"{bpm:g} bpm{note}"] if bpm else []) + ([key] if key else [])
    return ", ".join(parts) or "no tempo or key"


def raw_from_metadata(rows: list[dict]) -> torch.Tensor:
    """Manifest rows (corpus metadata: "tempo", "key") -> raw [N, 2] int16-ready values."""
    return torch.tensor([[float(r.get("tempo") or 0.0), key_index(r.get("key"))] for r in rows])
