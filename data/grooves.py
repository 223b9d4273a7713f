"""Generated grooves: drums on GM channel 10, bass, chords and an optional lead line.

A genre is a small table: tempo range, meter, drum patterns (one string per drum, one
character per step: `X` accent, `x` hit, `o` ghost, `.` rest), bass rhythms (`R` root,
`5` fifth, `8` octave, `3` third, `7` seventh, `.` rest), chord rhythms (`x` hit, `.`),
progressions (scale degrees) and instrument pools (GM programs). A groove *work* is a
(genre, variant) pair; the variant fixes pattern and progression choices so that the
corpus can split by work. Tempo, key and instruments are drawn per clip.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KICK, SNARE, RIM, CLAP, HAT, OPEN_HAT, PEDAL_HAT, RIDE, CRASH = 36, 38, 37, 39, 42, 46, 44, 51, 49
TAMB, COWBELL, CLAVES, HI_CONGA, LO_CONGA, SHAKER, LO_TOM = 54, 56, 75, 62, 64, 70, 45

VARIANTS_PER_GENRE = 64


@dataclass(frozen=True)
class Genre:
    name: str
    tempo: tuple[int, int]
    meter: str
    steps: int                         # steps per bar
    drums: tuple[dict[int, str], ...]  # alternative drum patterns
    bass: tuple[str, ...]
    chords: tuple[str, ...]
    progressions: tuple[tuple[int, ...], ...]  # scale degrees 1..7, one per bar
    modes: tuple[str, ...]
    bass_programs: tuple[int, ...]
    chord_programs: tuple[int, ...]
    lead_programs: tuple[int, ...]
    kits: tuple[int, ...] = (0,)       # GM drum kit bank-128 presets
    swing: float = 0.0                 # delay of off-beat steps, as a fraction of a step
    seventh: bool = False              # four-note chords


FOUR = dict(steps=16, meter="4/4")
POP_PROGS = ((1, 4), (1, 5, 6, 4), (6, 4, 1, 5), (1, 6, 4, 5), (4, 1, 5, 6))
MINOR_PROGS = ((1, 6, 7, 1), (1, 4, 5, 1), (1, 7, 6, 7), (1, 4, 1, 5))

GENRES: dict[str, Genre] = {g.name: g for g in [
    Genre("rock", (100, 140), drums=(
        {KICK: "X.....x.X.......", SNARE: "....X.......X...", HAT: "x.x.x.x.x.x.x.x."},
        {KICK: "X.......X.x.....", SNARE: "....X.......X...", OPEN_HAT: "x.x.x.x.x.x.x.x."}),
        bass=("R.R.R.R.R.R.R.R.", "R...R.5.R...R.5."), chords=("x.......x.......", "x..x..x.x..x..x."),
        progressions=POP_PROGS, modes=("major", "minor"), bass_programs=(33, 34),
        chord_programs=(29, 30, 27), lead_programs=(30, 29), kits=(0, 16), **FOUR),
    Genre("pop", (90, 124), drums=(
        {KICK: "X.......X.......", CLAP: "....X.......X...", HAT: "x.x.x.x.x.x.x.x."},
        {KICK: "X..x..x.X.......", SNARE: "....X.......X...", HAT: "xxxxxxxxxxxxxxxx"}),
        bass=("R.......R...5...", "R..R..R.R..R..R."), chords=("x...x...x...x...", "x.....x.....x..."),
        progressions=POP_PROGS, modes=("major",), bass_programs=(33, 38),
        chord_programs=(0, 4, 88, 89), lead_programs=(80, 81, 73, 11), **FOUR),
    Genre("funk", (95, 118), drums=(
        {KICK: "X..x..x...X..x..", SNARE: "....X..o.o..X..o", HAT: "xxxxxxxxxxxxxxxx"},
        {KICK: "X.x...x.X.....x.", SNARE: "....X.o.....X.o.", HAT: "x.xxx.xxx.xxx.xx"}),
        bass=("R..8.R.5R..7.R.8", "R.8..R.R..5.7.8."), chords=("..x..x....x..x..", ".x.x...x.x.x...x"),
        progressions=((1,), (1, 4), (2, 5)), modes=("minor",), bass_programs=(36, 37, 33),
        chord_programs=(27, 4, 16), lead_programs=(61, 62, 66), seventh=True, **FOUR),
    Genre("disco", (112, 128), drums=(
        {KICK: "X...X...X...X...", SNARE: "....X.......X...", OPEN_HAT: "..x...x...x...x.", HAT: "x...x...x...x..."},),
        bass=("R.8.R.8.R.8.R.8.", "R8R8R8R8R8R8R8R8"), chords=("x.x.x.x.x.x.x.x.", "..x...x...x...x."),
        progressions=((1, 4), (2, 5), (1, 6, 2, 5)), modes=("major", "minor"), bass_programs=(33, 38),
        chord_programs=(48, 49, 27), lead_programs=(48, 61, 80), seventh=True, **FOUR),
    Genre("house", (118, 128), drums=(
        {KICK: "X...X...X...X...", CLAP: "....X.......X...", OPEN_HAT: "..x...x...x...x.", HAT: "x.x.x.x.x.x.x.x."},),
        bass=("..R...R...R...R.", "R..R..R...R..R.."), chords=("..x..x....x..x..", "x.....x.....x..."),
        progressions=((1, 6), (1, 4), (6, 4, 1, 5)), modes=("minor", "major"), bass_programs=(38, 39),
        chord_programs=(4, 0, 89, 90), lead_programs=(80, 81, 85), kits=(24, 25), **FOUR),
    Genre("hip hop", (80, 98), drums=(
        {KICK: "X......xX.x.....", SNARE: "....X.......X...", HAT: "x.x.x.x.x.x.x.x."},
        {KICK: "X.x.......X..x..", SNARE: "....X.......X...", HAT: "xxxxxxxxxxxxxxxx"}),
        bass=("R.......R.x.....", "R......RR......."), chords=("x...............", "x.......x......."),
        progressions=((1, 6), (1, 4), (1, 7, 6, 7)), modes=("minor",), bass_programs=(38, 33, 39),
        chord_programs=(4, 0, 89, 48), lead_programs=(80, 11, 10), kits=(25, 0), swing=0.15, **FOUR),
    Genre("reggae", (70, 90), drums=(
        {KICK: "........X.......", RIM: "........X.......", HAT: "x.x.x.x.x.x.x.x."},),
        bass=("R...R..5..R.....", "R.....R.3...5..."), chords=("....x.......x...", "..x...x...x...x."),
        progressions=((1, 4), (1, 5, 4, 1), (6, 4, 1, 5)), modes=("major", "minor"), bass_programs=(33, 34),
        chord_programs=(16, 27, 1), lead_programs=(56, 61, 16), **FOUR),
    Genre("bossa nova", (120, 145), drums=(
        {KICK: "X..xX..xX..xX..x", RIM: "X..X..X...X..X..", HAT: "xxxxxxxxxxxxxxxx"},),
        bass=("R..5R..5R..5R..5", "R...5...R...5..."), chords=("x..x..x...x..x..", "x..x..x..x..x..."),
        progressions=((1, 2, 5, 1), (2, 5, 1, 1), (1, 6, 2, 5)), modes=("major",), bass_programs=(32, 33),
        chord_programs=(24, 0), lead_programs=(73, 65, 66), kits=(40, 32), seventh=True, **FOUR),
    Genre("swing jazz", (110, 170), steps=12, meter="4/4", drums=(
        {RIDE: "x..x.xx..x.x", PEDAL_HAT: "...x.....x..", KICK: "x.....x....."},),
        bass=("R..3..5..7..", "R..5..8..5.."), chords=("x.....x.....", "...x.....x.."),
        progressions=((2, 5, 1, 1), (1, 6, 2, 5), (1, 4, 2, 5)), modes=("major",), bass_programs=(32,),
        chord_programs=(0, 26, 11), lead_programs=(65, 66, 56, 73), kits=(32, 40), seventh=True),
    Genre("blues", (70, 110), steps=12, meter="4/4", drums=(
        {KICK: "X.....X.....", SNARE: "...X.....X..", HAT: "x.xx.xx.xx.x"},),
        bass=("R.R3.35.58.8", "R..3..5..6.."), chords=("x.xx.xx.xx.x", "x.....x....."),
        progressions=((1, 4, 1, 1, 4, 4, 1, 1, 5, 4, 1, 5),), modes=("major",), bass_programs=(33, 32),
        chord_programs=(26, 0, 16), lead_programs=(22, 26, 65), seventh=True),
    Genre("country", (100, 140), drums=(
        {KICK: "X.......X.......", SNARE: "....X.......X...", HAT: "x.x.x.x.x.x.x.x."},),
        bass=("R.......5.......", "R...5...R...5..."), chords=("..x...x...x...x.", "x.x.x.x.x.x.x.x."),
        progressions=((1, 4, 5, 1), (1, 1, 4, 5)), modes=("major",), bass_programs=(32, 33),
        chord_programs=(25, 24), lead_programs=(105, 40, 110, 22), **FOUR),
    Genre("metal", (140, 190), drums=(
        {KICK: "XxXxXxXxXxXxXxXx", SNARE: "....X.......X...", CRASH: "x.......x......."},
        {KICK: "X.X.X.X.X.X.X.X.", SNARE: "....X.......X...", RIDE: "x.x.x.x.x.x.x.x."}),
        bass=("RRRRRRRRRRRRRRRR", "R.R.R.R.R.R.R.R."), chords=("x.x.x.x.x.x.x.x.", "xxxxxxxxxxxxxxxx"),
        progressions=MINOR_PROGS, modes=("minor",), bass_programs=(34, 33),
        chord_programs=(30, 29), lead_programs=(30,), kits=(16,), **FOUR),
    Genre("waltz", (84, 150), steps=6, meter="3/4", drums=(
        {KICK: "X.....", SNARE: "..x.x.", HAT: "x.x.x."},),
        bass=("R.....", "R...5."), chords=("..x.x.", "x.x.x."),
        progressions=((1, 5, 5, 1), (1, 4, 5, 1)), modes=("major", "minor"), bass_programs=(32, 43),
        chord_programs=(0, 21, 48), lead_programs=(40, 21, 73, 71), kits=(40, 0)),
    Genre("salsa", (160, 210), drums=(
        {CLAVES: "X..X..X...X.X...", COWBELL: "X.x.X.x.X.x.X.x.", HI_CONGA: "..x..xx...x..xx.", LO_CONGA: "......x.......x."},),
        bass=("...5..R.....5..R", "R..5..R.R..5..R."), chords=("x.x..x.x.x.x..x.", ".x..x..x.x..x..x"),
        progressions=((1, 4, 5, 4), (2, 5, 1, 1)), modes=("major", "minor"), bass_programs=(32, 33),
        chord_programs=(0, 1), lead_programs=(56, 57, 73), **FOUR),
    Genre("drum and bass", (160, 178), drums=(
        {KICK: "X.........X.....", SNARE: "....X.......X...", HAT: "x.x.x.x.x.x.x.x.", OPEN_HAT: ".............x.."},),
        bass=("R...............", "R.......R.....5."), chords=("x...............", "x.......x......."),
        progressions=((1, 6), (1, 7, 6, 7)), modes=("minor",), bass_programs=(38, 39),
        chord_programs=(89, 88, 91), lead_programs=(81, 80), kits=(24, 25), **FOUR),
    Genre("punk", (160, 200), drums=(
        {KICK: "X...X...X...X...", SNARE: "..X...X...X...X.", CRASH: "x...x...x...x..."},),
        bass=("R.R.R.R.R.R.R.R.",), chords=("x.x.x.x.x.x.x.x.",),
        progressions=((1, 4, 5, 4), (1, 5, 6, 4)), modes=("major",), bass_programs=(34, 33),
        chord_programs=(30, 29), lead_programs=(30,), kits=(16, 0), **FOUR),
]}

MAJOR = (0, 2, 4, 5, 7, 9, 11)
MINOR = (0, 2, 3, 5, 7, 8, 10)
BASS_DEGREE = {"R": 0, "3": 2, "5": 4, "7": 6, "8": 7}  # scale steps above the chord root


def _chord_tone(scale, tonic, degree, step):
    """MIDI offset (from `tonic`) of the note `step` scale steps above `degree`."""
    i = degree - 1 + step
    return scale[i % 7] + 12 * (i // 7)


def make_groove(genre: Genre, variant: int, tonic: int, mode: str, tempo: float,
                seconds: float, rng: np.random.Generator, lead: bool) -> dict:
    """Tracks for one groove clip: {"drums": [(t, dur, pitch, vel)], "bass": [...], ...}
    with times in seconds; `variant` picks patterns, `rng` only humanizes velocities."""
    vrng = np.random.default_rng([sum(map(ord, genre.name)), variant])
    drums = genre.drums[vrng.integers(len(genre.drums))]
    bass = genre.bass[vrng.integers(len(genre.bass))]
    chords = genre.chords[vrng.integers(len(genre.chords))]
    prog = genre.progressions[vrng.integers(len(genre.progressions))]
    melody_seed = int(vrng.integers(1 << 30))
    scale = MAJOR if mode == "major" else MINOR
    beats_per_bar = int(genre.meter.split("/")[0])
    step_sec = 60.0 / tempo * beats_per_bar / genre.steps
    n_bars = int(np.ceil(seconds / (step_sec * genre.steps))) + 1

    def when(bar, step):
        t = (bar * genre.steps + step) * step_sec
        return t + (genre.swing * step_sec if step % 2 == 1 else 0.0)

    def vel(ch):
        base = {"X": 112, "x": 92, "o": 55}.get(ch, 90)
        return int(np.clip(base + rng.normal(0, 6), 30, 127))

    tracks = {"drums": [], "bass": [], "chords": [], "lead": []}
    mrng = np.random.default_rng(melody_seed)
    for bar in range(n_bars):
        degree = prog[bar % len(prog)]
        for drum, pattern in drums.items():
            for s, ch in enumerate(pattern):
                if ch != ".":
                    tracks["drums"].append((when(bar, s), 0.1, drum, vel(ch)))
        for s, ch in enumerate(bass):
            if ch in BASS_DEGREE:
                pitch = tonic - 24 + _chord_tone(scale, tonic, degree, BASS_DEGREE[ch])
                tracks["bass"].append((when(bar, s), step_sec * 1.8, pitch, vel("x")))
        hits = [s for s, ch in enumerate(chords) if ch == "x"]
        for k, s in enumerate(hits):
            end = hits[k + 1] if k + 1 < len(hits) else genre.steps
            tones = (0, 2, 4, 6) if genre.seventh else (0, 2, 4)
            for st in tones:
                pitch = tonic - 12 + _chord_tone(scale, tonic, degree, st)
                tracks["chords"].append((when(bar, s), (end - s) * step_sec * 0.9, pitch, vel("x") - 15))
        if lead:
            tracks["lead"] += _lead_bar(mrng, bar, degree, scale, tonic, genre.steps, when, step_sec, vel)
    return tracks


def _lead_bar(mrng, bar, degree, scale, tonic, steps, when, step_sec, vel):
    """A simple melody: chord tones on strong steps, scale steps between, some rests."""
    notes, s, pos = [], 0, 4
    while s < steps:
        length = int(mrng.choice([1, 2, 2, 3, 4]))
        if mrng.random() < 0.8:
            if s % 4 == 0:
                pos = int(mrng.choice([0, 2, 4, 7]))
            else:
                pos = int(np.clip(pos + mrng.choice([-1, 1, -2, 2]), -2, 9))
            pitch = tonic + _chord_tone(scale, tonic, degree, pos)
            notes.append((when(bar, s), length * step_sec * 0.95, pitch, vel("x")))
        s += length
    return notes
