"""Onset levels: where notes start, one small integer per acoustic frame, for a coarse stage with `onset_input`.

A clip's onset strength is the project's spectral flux (`audio_tokenizers.spectral.onset_envelope`) at the codec's
frame rate, over the clip's own maximum, cut into four levels:

    flux / max    < 0.1   0.1-0.25   0.25-0.5   >= 0.5
    level           0        1          2          3         NOT_GIVEN = 4: no onset stream for this frame

In training each clip's levels come from its audio (the cache's `onsets.npy`, `python -m data.tokenize
--onsets-only`); at inference from a recording (`pipeline.py --rhythm FILE`: its rhythm, another instrument) or, for
a prompt that states a bpm, from a metronome (`metronome`: level 3 on every beat, 0 between), so the stage is told
where the beats fall. A frame without either is NOT_GIVEN, as a share of training rows is (`onset_dropout`).
"""
from __future__ import annotations

import torch

LEVELS = 4
NOT_GIVEN = LEVELS
VOCAB = LEVELS + 1
EDGES = (0.1, 0.25, 0.5)


def onset_levels(wav: torch.Tensor, sample_rate: int, frame_rate: float, frames: int) -> torch.Tensor:
    """Audio [B, N] -> onset levels [B, frames] (int64, 0..3; zeros past the audio's end)."""
    from audio_tokenizers.spectral import onset_envelope
    hop = int(round(sample_rate / frame_rate))
    e = onset_envelope(wav.float(), sample_rate, hop)
    e = e / e.amax(-1, keepdim=True).clamp_min(1e-8)
    q = torch.bucketize(e, torch.tensor(EDGES))
    if q.shape[1] < frames:
        q = torch.nn.functional.pad(q, (0, frames - q.shape[1]))
    return q[:, :frames]


def metronome(bpm: torch.Tensor, frame_rate: float, level: int | torch.Tensor = LEVELS - 1) -> torch.Tensor:
    """The tempo of each frame [B, T] in bpm (0: none stated) -> onset levels [B, T]: `level` (3: a hard attack;
    one for all rows or one per row [B]) on the frame where each beat falls (the first at frame 0, the phase carried
    across tempo changes), 0 between; NOT_GIVEN where no tempo is stated."""
    step = bpm.double() / 60.0 / frame_rate                 # beats per frame
    phase = step.cumsum(1) - step                           # beats elapsed before each frame
    count = torch.floor(phase + 1e-9)
    beat = torch.ones_like(count, dtype=torch.bool)
    beat[:, 1:] = count[:, 1:] > count[:, :-1]
    out = torch.where(beat, torch.as_tensor(level).long().view(-1, 1), 0)
    return torch.where(bpm > 0, out, NOT_GIVEN).long()


def fit(onsets: torch.Tensor, frames: int) -> torch.Tensor:
    """Onset levels [B, T'] cut or padded (NOT_GIVEN) to [B, frames]."""
    return torch.nn.functional.pad(onsets[:, :frames], (0, max(0, frames - onsets.shape[1])), value=NOT_GIVEN)
