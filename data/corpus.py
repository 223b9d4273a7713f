"""Render a captioned music corpus offline.

    python -m data.corpus --out DIR --clips N --seed S [--workers K] [--seconds 10]

Clip i is planned from `default_rng([S, i])` alone, so the result does not depend on the
number of workers: a source (music21 scores or generated grooves), a work, instruments by
General MIDI program within their range, a tempo fit for the style, a transposition and a
window. It is rendered through FluidSynth (24 kHz mono), loudness-normalised, and rejected
and re-planned if the window is near-empty. Writes DIR/audio/*.wav, DIR/metadata.jsonl
(every field) and DIR/{train,valid,test}.jsonl; the split is a hash of the work id, so no
work spans two splits, in this corpus or any other seed's. `--splits valid,test` renders only
held-out works: more clips to evaluate on, none of whose works any model trained on saw.
"""
from __future__ import annotations

import argparse
import hashlib
import multiprocessing as mp
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np

from common.errors import UserError, run_cli
from data import captions as cap
from data.audio import rms_dbfs, write_wav
from data.grooves import GENRES, VARIANTS_PER_GENRE, make_groove
from data.manifest import write_jsonl
from data.render import PITCH_NAMES, Renderer, add_reverb, estimate_key, fit_to_range
from data.scores import build_index, parse_work

SAMPLE_RATE = 24000
TARGET_DBFS = -20.0
SOURCE_WEIGHTS = {"groove": 0.40, "bach_chorale": 0.12, "palestrina": 0.07, "madrigal": 0.03,
                  "trecento": 0.03, "essen_folk": 0.13, "oneills": 0.11, "ryans": 0.11}
# source -> (style phrase for captions, genre label, tempo range in beats per minute)
SCORE_STYLES = {
    "bach_chorale": ("Bach chorale", "baroque chorale", (56, 92)),
    "palestrina": ("Renaissance motet in the style of Palestrina", "renaissance polyphony", (48, 76)),
    "madrigal": ("Monteverdi madrigal", "Italian madrigal", (60, 100)),
    "trecento": ("medieval trecento song", "medieval song", (50, 80)),
}
ENSEMBLES = {"string_quartet": (40, 40, 41, 42), "brass": (56, 56, 60, 57, 58), "woodwinds": (73, 68, 71, 70),
             "choir": (52,), "organ": (19,), "piano": (0,), "recorders": (74,)}
SOLO_POOLS = {
    "Germany": (0, 40, 73, 71, 68, 21, 74, 46, 24, 11, 22, 12), "China": (73, 75, 77, 107, 40, 0),
    "Ireland": (110, 40, 73, 78, 21, 105, 22, 0, 46, 24), "Scotland": (109, 110, 40, 73, 21),
}
TUNE_TEMPO = {"reel": (96, 118), "hornpipe": (80, 110), "jig": (100, 124), "slip jig": (100, 124),
              "strathspey": (60, 80), "highland fling": (70, 90), "clog dance": (80, 110), "air": (54, 80)}


SPLITS = ("train", "valid", "test")


def split_of(work_id: str) -> str:
    h = int(hashlib.sha1(work_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "train" if h < 0.9 else ("valid" if h < 0.95 else "test")


def quarters_per_beat(meter: str) -> float:
    num, den = (int(x) for x in meter.split("/"))
    compound = den >= 8 and num % 3 == 0 and num > 3
    return 4.0 / den * (3 if compound else 1)


# ---------------------------------------------------------------- planning

def plan_groove(rng: np.random.Generator, seconds: float,
                splits: tuple[str, ...] = SPLITS) -> tuple[list[dict], dict]:
    genre = GENRES[cap.pick(rng, sorted(GENRES))]
    variant = int(rng.integers(VARIANTS_PER_GENRE))
    _check_split(f"groove/{genre.name}/{variant}", splits)
    mode = cap.pick(rng, genre.modes)
    tonic_pc = int(rng.integers(12))
    tempo = int(rng.integers(genre.tempo[0], genre.tempo[1] + 1))
    lead = rng.random() < 0.6
    parts = make_groove(genre, variant, 55 + (tonic_pc + 5) % 12, mode, tempo, seconds, rng, lead)
    programs = {"bass": cap.pick(rng, genre.bass_programs), "chords": cap.pick(rng, genre.chord_programs),
                "lead": cap.pick(rng, genre.lead_programs)}
    tracks = [{"drums": True, "kit": cap.pick(rng, genre.kits), "notes": parts["drums"], "program": -1}]
    for role in ("bass", "chords", "lead"):
        if parts[role]:
            pitches = fit_to_range(np.array([n[2] for n in parts[role]]), programs[role])
            tracks.append({"program": programs[role], "role": role,
                           "notes": [(t, d, int(p), v) for (t, d, _, v), p in zip(parts[role], pitches)]})
    names = ["drums"] + [cap.instrument_name(t["program"], rng) for t in tracks[1:]]
    meta = {"source": "groove", "work_id": f"groove/{genre.name}/{variant}", "genre": genre.name,
            "style": f"{genre.name} {cap.pick(rng, ['groove', 'beat', 'jam', 'track'])}",
            "players": cap.join_words(names), "tempo": tempo, "meter": genre.meter, "mode": mode,
            "key": f"{PITCH_NAMES[tonic_pc]} {mode}", "origin": "", "transpose": 0,
            "instrument_label": cap.INSTRUMENT_NAMES[programs["chords"]][0]}
    return tracks, meta


def plan_score(source: str, rng: np.random.Generator, seconds: float,
               splits: tuple[str, ...] = SPLITS) -> tuple[list[dict], dict]:
    works = build_index()[source]
    work = works[int(rng.integers(len(works)))]
    _check_split(work.work_id, splits)
    info = dict(work.meta)
    parsed = parse_work(work)
    if not parsed.parts or parsed.length <= 0:
        raise _Retry(f"{work.work_id} has no notes")
    poly = len(parsed.parts) > 1
    if poly:
        style, genre, tempo_range = SCORE_STYLES[source]
        ensemble = cap.pick(rng, sorted(ENSEMBLES))
        order = np.argsort([-np.mean([n.pitch for n in p]) for p in parsed.parts])
        progs = ENSEMBLES[ensemble]
        part_programs = {int(part): progs[min(len(progs) - 1, rank * len(progs) // len(order))]
                         for rank, part in enumerate(order)}
        players, label = cap.pick(rng, cap.ENSEMBLE_NAMES[ensemble]), ensemble
    else:
        kind = info.get("tune_type") or ""
        origin = info.get("origin", "Europe")
        genre = f"{'Scottish' if origin == 'Scotland' else 'Irish'} {kind}" if kind else info.get("genre", "folk song")
        style = genre
        tempo_range = TUNE_TEMPO.get(kind, (72, 126))
        program = cap.pick(rng, SOLO_POOLS.get(origin, SOLO_POOLS["Germany"]))
        part_programs = {0: program}
        players = cap.pick(rng, [f"solo {cap.instrument_name(program, rng)}", article_name(program, rng)])
        label = cap.INSTRUMENT_NAMES[program][0]
    tempo = int(rng.integers(tempo_range[0], tempo_range[1] + 1))
    qps = tempo * quarters_per_beat(parsed.meter) / 60.0  # quarter notes per second
    window_q = seconds * qps
    # Loop short works; start the window on a note onset.
    reps = int(np.ceil((window_q * 2) / parsed.length)) + 1
    onsets = sorted({n.start for p in parsed.parts for n in p if n.start <= max(0.0, parsed.length - window_q)})
    start = onsets[int(rng.integers(len(onsets)))] if onsets else 0.0
    transpose = int(rng.integers(-5, 7))
    tracks, all_p, all_d = [], [], []
    for k, part in enumerate(parsed.parts):
        notes = [(n.start + r * parsed.length - start, n.duration, n.pitch + transpose)
                 for r in range(reps) for n in part]
        notes = [n for n in notes if 0 <= n[0] < window_q]
        if not notes:
            continue
        program = part_programs.get(k, part_programs.get(0, 0))
        pitches = fit_to_range(np.array([n[2] for n in notes]), program)
        base_vel = int(rng.integers(70, 100))
        tracks.append({"program": program, "notes": [
            (t / qps, d / qps, int(p), int(np.clip(base_vel + rng.normal(0, 5), 30, 127)))
            for (t, d, _), p in zip(notes, pitches)]})
        all_p += [int(p) for p in pitches]
        all_d += [d for _, d, _ in notes]
    if not tracks:
        raise _Retry(f"{work.work_id}: empty window")
    tonic, mode = estimate_key(np.array(all_p), np.array(all_d))
    meta = {"source": source, "work_id": work.work_id, "genre": genre, "style": style,
            "players": players, "tempo": tempo, "meter": parsed.meter, "mode": mode,
            "key": f"{tonic} {mode}", "origin": info.get("origin", ""), "title": info.get("title", ""),
            "transpose": transpose, "instrument_label": label}
    return tracks, meta


def article_name(program: int, rng: np.random.Generator) -> str:
    return cap.article(cap.instrument_name(program, rng))


class _OtherSplit(Exception):
    """The drawn work belongs to a split not asked for (checked before the costly parse)."""


def _check_split(work_id: str, splits: tuple[str, ...]) -> None:
    if split_of(work_id) not in splits:
        raise _OtherSplit(work_id)


class _Retry(Exception):
    """This plan did not give a usable clip; draw another."""


# ---------------------------------------------------------------- rendering one clip

_RENDERER: Renderer | None = None


def _init_worker() -> None:
    global _RENDERER
    _RENDERER = Renderer(SAMPLE_RATE)
    build_index()


def plan_clip(rng: np.random.Generator, seconds: float, splits: tuple[str, ...]) -> tuple[list[dict], dict]:
    """Draw a source and plan a window of one of its works, redrawing until the work's split is in
    `splits` (with all three splits the first draw is kept, so the default corpus is unchanged)."""
    sources, weights = zip(*SOURCE_WEIGHTS.items())
    for _ in range(2000):
        source = sources[int(rng.choice(len(sources), p=np.array(weights) / sum(weights)))]
        try:
            if source == "groove":
                return plan_groove(rng, seconds, splits)
            return plan_score(source, rng, seconds, splits)
        except _OtherSplit:
            continue
    raise RuntimeError(f"no work of split {splits} in 2000 draws")


def render_clip(args: tuple[int, int, float, str, tuple[str, ...]]) -> dict:
    """Plan, render, check and write clip `i`; returns its metadata row."""
    seed, i, seconds, out_dir, splits = args
    rng = np.random.default_rng([seed, i])
    for attempt in range(20):
        try:
            tracks, meta = plan_clip(rng, seconds, splits)
            wav = add_reverb(_RENDERER.render(tracks, seconds), SAMPLE_RATE, rng)
            wav = _normalise(wav)
        except _Retry:
            continue
        break
    else:
        raise RuntimeError(f"clip {i}: no usable window after 20 attempts")
    name = f"audio/{i:06d}.wav"
    write_wav(Path(out_dir) / name, wav, SAMPLE_RATE)
    meta.update({"clip": i, "seed": seed, "audio": name, "duration": seconds, "split": split_of(meta["work_id"]),
                 "programs": [t["program"] for t in tracks if t["program"] >= 0],
                 "instruments": (["drums"] if tracks[0].get("drums") else []) +
                                [cap.INSTRUMENT_NAMES[t["program"]][0] for t in tracks if t["program"] >= 0],
                 "rms_dbfs": round(rms_dbfs(wav), 2), "attempts": attempt + 1})
    meta["instruments"] = list(dict.fromkeys(meta["instruments"]))
    meta["caption"] = cap.make_caption(meta, rng)
    return meta


def _normalise(wav: np.ndarray) -> np.ndarray:
    """Scale to TARGET_DBFS RMS (peak kept below 0.98); reject silent or gappy windows."""
    if rms_dbfs(wav) < -60:
        raise _Retry("silent render")
    frames = wav[: len(wav) // 2400 * 2400].reshape(-1, 2400)  # 100 ms frames
    frame_db = 10 * np.log10(np.mean(frames ** 2, axis=1) + 1e-12)
    if np.mean(frame_db < rms_dbfs(wav) - 35) > 0.2:
        raise _Retry("more than 20% of the window is near-silent")
    wav = wav * 10 ** ((TARGET_DBFS - rms_dbfs(wav)) / 20)
    peak = np.max(np.abs(wav))
    return (wav * (0.98 / peak) if peak > 0.98 else wav).astype(np.float32)


# ---------------------------------------------------------------- the command

def build_corpus(out: Path, clips: int, seed: int, workers: int, seconds: float = 10.0,
                 splits: tuple[str, ...] = SPLITS) -> tuple[list[dict], list[float]]:
    (out / "audio").mkdir(parents=True, exist_ok=True)
    jobs = [(seed, i, seconds, str(out), tuple(splits)) for i in range(clips)]
    if workers <= 1:
        _init_worker()
        rows = [render_clip(j) for j in _progress(jobs, clips)]
    else:
        # spawn, not fork: a forked copy of a process that already holds a FluidSynth
        # instance can deadlock in the child.
        with mp.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
            rows = list(_progress(pool.imap(render_clip, jobs, chunksize=2), clips))
    rows.sort(key=lambda r: r["clip"])
    # Levels go to the summary, not the metadata: FluidSynth's output differs from run to run
    # by a few LSB (its dither), and metadata must be byte-identical for a given seed.
    levels = [r.pop("rms_dbfs") for r in rows]
    write_jsonl(out / "metadata.jsonl", rows)
    for split in splits:
        write_jsonl(out / f"{split}.jsonl", [r for r in rows if r["split"] == split])
    return rows, levels


def _progress(it, total):
    from tqdm import tqdm
    return tqdm(it, total=total, desc="rendering", unit="clip", mininterval=1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description="Render a captioned music corpus with FluidSynth.")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--clips", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--splits", default=",".join(SPLITS),
                    help="render only works of these splits, e.g. valid,test for a larger held-out set")
    args = ap.parse_args()
    if args.clips <= 0 or args.seconds <= 0:
        raise UserError("--clips and --seconds must be positive")
    splits = tuple(dict.fromkeys(x.strip() for x in args.splits.split(",") if x.strip()))
    if not splits or set(splits) - set(SPLITS):
        raise UserError(f"--splits {args.splits!r}: give a comma-separated subset of {','.join(SPLITS)}")
    t0 = time.time()
    rows, levels = build_corpus(args.out, args.clips, args.seed, args.workers, args.seconds, splits)
    dt = time.time() - t0
    caps = [r["caption"] for r in rows]
    splits = Counter(r["split"] for r in rows)
    print(f"wrote {len(rows)} clips to {args.out} in {dt:.1f} s ({len(rows) / dt:.2f} clips/s); "
          f"splits {dict(splits)}; unique captions {len(set(caps)) / len(caps):.1%}; "
          f"RMS min {min(levels):.1f} / median {np.median(levels):.1f} dBFS; "
          f"sources {dict(Counter(r['source'] for r in rows))}")


if __name__ == "__main__":
    run_cli(main)
