"""Playing note events through FluidSynth with the FluidR3 GM soundfont, and the
musical helpers the corpus needs (instrument ranges, key finding)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from common.errors import UserError

SOUNDFONT = Path(os.environ.get("MUSICLM_SOUNDFONT", "/usr/share/sounds/sf2/FluidR3_GM.sf2"))
APT_HINT = "install them with: sudo apt-get install -y fluidsynth fluid-soundfont-gm"
DRUM_CHANNEL = 9

# Playable MIDI range per GM program (written pitch after transposition must fit).
PROGRAM_RANGE = {
    0: (21, 108), 1: (21, 108), 4: (28, 103), 11: (53, 89), 12: (45, 96), 13: (65, 108), 16: (36, 96),
    19: (36, 96), 21: (53, 89), 22: (60, 84), 24: (40, 83), 25: (40, 83), 26: (40, 83), 27: (40, 86),
    29: (40, 86), 30: (40, 86), 32: (28, 60), 33: (28, 60), 34: (28, 60), 36: (28, 60), 37: (28, 60),
    38: (24, 60), 39: (24, 60), 40: (55, 100), 41: (48, 88), 42: (36, 76), 43: (28, 67), 46: (24, 103),
    48: (36, 96), 49: (36, 96), 52: (40, 81), 56: (54, 86), 57: (40, 72), 58: (28, 58), 60: (41, 77),
    61: (40, 84), 62: (36, 84), 64: (56, 88), 65: (49, 81), 66: (44, 76), 68: (58, 91), 70: (34, 75),
    71: (50, 94), 73: (60, 96), 74: (60, 96), 75: (60, 96), 77: (55, 91), 78: (62, 96), 79: (60, 88),
    80: (36, 96), 81: (36, 96), 85: (48, 84), 88: (36, 96), 89: (36, 96), 90: (36, 96), 91: (36, 96),
    104: (48, 84), 105: (48, 84), 107: (55, 91), 109: (55, 79), 110: (55, 100),
}

# Krumhansl-Kessler key profiles (major, minor), tonic first.
KK_MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
KK_MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])
PITCH_NAMES = ["C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B"]


def estimate_key(pitches: np.ndarray, durations: np.ndarray) -> tuple[str, str]:
    """Krumhansl-Schmuckler key finding on duration-weighted pitch classes -> ('D', 'minor')."""
    hist = np.bincount(np.asarray(pitches) % 12, weights=durations, minlength=12)
    best, best_r = ("C", "major"), -2.0
    for tonic in range(12):
        for mode, profile in (("major", KK_MAJOR), ("minor", KK_MINOR)):
            r = np.corrcoef(hist, np.roll(profile, tonic))[0, 1] if hist.std() > 0 else 0.0
            if r > best_r:
                best, best_r = (PITCH_NAMES[tonic], mode), r
    return best


def fit_to_range(pitches: np.ndarray, program: int) -> np.ndarray:
    """Shift a part by whole octaves to fit the program's range, then fold stray notes in."""
    lo, hi = PROGRAM_RANGE.get(program, (36, 96))
    shifts = [k * 12 for k in range(-4, 5)]
    cost = [(np.sum((pitches + s < lo) | (pitches + s > hi)), abs(s)) for s in shifts]
    p = pitches + shifts[min(range(len(shifts)), key=lambda i: cost[i])]
    while np.any(p < lo):
        p = np.where(p < lo, p + 12, p)
    while np.any(p > hi):
        p = np.where(p > hi, p - 12, p)
    return p


class Renderer:
    """One FluidSynth instance (load the 148 MB soundfont once per process)."""

    def __init__(self, sample_rate: int):
        if not SOUNDFONT.is_file():
            raise UserError(f"soundfont {SOUNDFONT} not found; {APT_HINT}")
        try:
            import fluidsynth
        except ImportError as e:
            raise UserError(f"FluidSynth library not found ({e}); {APT_HINT}") from None
        self.sample_rate = sample_rate
        # FluidSynth's own reverb and chorus keep state from clip to clip, which would make a
        # clip's audio depend on the clip rendered before it; `add_reverb` replaces them.
        self.synth = fluidsynth.Synth(samplerate=float(sample_rate), gain=0.4,
                                      **{"synth.reverb.active": 0, "synth.chorus.active": 0})
        self.sfid = self.synth.sfload(str(SOUNDFONT))

    def render(self, tracks: list[dict], seconds: float) -> np.ndarray:
        """tracks: [{"program": int, "drums": bool, "kit": int, "notes": [(t, dur, pitch, vel)]}]
        -> mono float32 [round(seconds * sample_rate)]."""
        # FluidSynth renders in 64-sample blocks and applies events at block boundaries, so
        # events are snapped to blocks and every call renders whole blocks: a clip then sounds
        # the same whatever was rendered before it.
        s, block = self.synth, 64
        s.system_reset()
        s.get_samples(block * 80)  # let voices of the previous clip die out
        events = []
        melodic = [c for c in range(16) if c != DRUM_CHANNEL]
        for k, track in enumerate(tracks):
            chan = DRUM_CHANNEL if track.get("drums") else melodic[k % len(melodic)]
            if track.get("drums"):
                s.program_select(chan, self.sfid, 128, track.get("kit", 0))
            else:
                s.program_select(chan, self.sfid, 0, track["program"])
            for t, dur, pitch, vel in track["notes"]:
                on = int(round(t * self.sample_rate / block)) * block
                off = on + max(1, int(round(dur * self.sample_rate / block))) * block
                events.append((on, 1, chan, int(pitch), int(vel)))
                events.append((off, 0, chan, int(pitch), 0))
        events.sort()  # at equal times note-offs (0) come before note-ons (1)
        samples = int(round(seconds * self.sample_rate))
        total = -(-samples // block) * block
        chunks, now = [], 0
        for when, on, chan, pitch, vel in events:
            if when >= total:
                break
            if when > now:
                chunks.append(s.get_samples(when - now))
                now = when
            if on:
                s.noteon(chan, pitch, vel)
            else:
                s.noteoff(chan, pitch)
        if total > now:
            chunks.append(s.get_samples(total - now))
        stereo = np.concatenate(chunks).astype(np.float32).reshape(-1, 2) / 32768.0
        return stereo.mean(axis=1)[:samples]


def add_reverb(wav: np.ndarray, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """A small room: convolve with exponentially decaying noise (RT60 0.3-1.5 s, random wet mix)."""
    from scipy.signal import fftconvolve
    rt60, wet = rng.uniform(0.3, 1.5), rng.uniform(0.05, 0.3)
    n = int(rt60 * sample_rate)
    ir = rng.standard_normal(n) * np.exp(-6.9 * np.arange(n) / n)
    ir /= np.sqrt(np.sum(ir ** 2))
    return ((1 - wet) * wav + wet * fftconvolve(wav, ir)[: len(wav)]).astype(np.float32)
