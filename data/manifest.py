"""Manifests: JSON Lines, one clip per line, `{"audio": path, "caption": str, ...}`.

Relative audio paths are relative to the manifest's folder. A user's own music becomes a
manifest with one command:

    python -m data.manifest --audio-dir my_music/ --out my_music.jsonl \
        [--captions captions.jsonl | --captions musiccaps.csv]

Captions come from a JSON Lines file (`{"file": "a.wav", "caption": "..."}`), a MusicCaps-
style CSV (`ytid`, `caption`; a file matches when its name contains the ytid), or a sidecar
`a.txt` next to `a.wav`; uncaptioned audio is kept with an empty caption (the stages train
on audio alone). Every file is opened once; unreadable, empty and silent ones are skipped
and counted in the summary.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import soundfile as sf

from common.errors import AudioError, UserError, run_cli, umask_mode
from data.audio import load_audio

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".mp3"}


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL manifest, with `audio` made absolute. Bad lines are errors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"manifest {path} not found; build one with `python -m data.manifest`")
    rows = []
    for n, row in _json_lines(path, "each line must be one object"):
        if not isinstance(row, dict) or "audio" not in row:
            raise UserError(f'{path}:{n} lacks the "audio" field; each line needs {{"audio": path}}')
        row["audio"] = str((path.parent / row["audio"]).resolve())
        rows.append(row)
    return rows


def _json_lines(path: Path, what: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-empty line; a bad line is a one-line error ending in `what`."""
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f"{path}:{n} is not valid JSON; {what}") from None


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Prompts to generate from or score: a JSONL file (a manifest with reference audio, made absolute, or rows of
    metadata with a `caption`) or a text file with one prompt per line -> rows with a non-empty `caption`.
    A missing file, a bad JSON line or no prompt at all is a one-line error naming the line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompts file {path} not found; give a JSONL manifest or a text file, one prompt per line")
    if path.suffix != ".jsonl":
        rows = [{"caption": line.strip()} for line in path.read_text().splitlines() if line.strip()]
    else:
        rows = []
        for n, row in _json_lines(path, "each line must be one object with a caption"):
            if not isinstance(row, dict):
                raise UserError(f'{path}:{n} is not a JSON object; each line needs {{"caption": text}}')
            rows.append(row)
        if rows and all("audio" in r for r in rows):   # a manifest: its references are scored too
            for r in rows:
                r["audio"] = str((path.parent / r["audio"]).resolve())
    rows = [r for r in rows if isinstance(r.get("caption"), str) and r["caption"].strip()]
    if not rows:
        raise UserError(f"{path} has no prompts (empty captions are skipped)")
    return rows


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write rows as JSON Lines atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n")
    os.chmod(tmp, umask_mode())
    os.replace(tmp, path)


class SkipCounter:
    """Counts skipped files by reason ('unreadable', 'empty', 'silent', 'nan')."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def add(self, error: AudioError) -> None:
        reason = str(error).split(":", 1)[0]
        self.counts[reason] += 1
        self.examples.setdefault(reason, str(error))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "skipped 0 files"
        parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items()))
        return f"skipped {self.total} files ({parts}); e.g. {next(iter(self.examples.values()))}"


def iter_audio(rows: list[dict[str, Any]], sample_rate: int,
               skips: SkipCounter) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
    """Yield (row, mono audio [N]) for every readable, non-silent row; count the others."""
    for row in rows:
        try:
            yield row, load_audio(row["audio"], sample_rate)
        except AudioError as e:
            skips.add(e)


# ---------------------------------------------------------------- building from a folder

def _read_captions(path: Path | None) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """(by file name or stem, [(ytid, caption)]) from a JSONL or MusicCaps-style CSV."""
    if path is None:
        return {}, []
    if not path.is_file():
        raise UserError(f"captions file {path} not found")
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "caption" not in reader.fieldnames:
                raise UserError(f"{path} needs a 'caption' column (and 'ytid' or 'file')")
            key = "ytid" if "ytid" in reader.fieldnames else "file"
            pairs = [(r[key], r["caption"]) for r in reader]
        if key == "ytid":
            return {}, pairs
        return {Path(k).name: c for k, c in pairs}, []
    by_name = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                r = json.loads(line)
                name = r.get("file") or r.get("audio")
                by_name[Path(name).name] = r["caption"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f'{path}:{n} must be {{"file": name, "caption": text}}') from None
    return by_name, []


def _caption_for(file: Path, by_name: dict[str, str], ytids: list[tuple[str, str]]) -> str:
    if file.name in by_name:
        return by_name[file.name]
    if file.stem in by_name:
        return by_name[file.stem]
    for ytid, caption in ytids:
        if ytid and ytid in file.name:
            return caption
    sidecar = file.with_suffix(".txt")
    return sidecar.read_text().strip() if sidecar.is_file() else ""


def build_manifest(audio_dir: Path, out: Path, captions: Path | None = None) -> tuple[int, SkipCounter]:
    if not audio_dir.is_dir():
        raise UserError(f"audio folder {audio_dir} not found")
    by_name, ytids = _read_captions(captions)
    files = sorted(p for p in audio_dir.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise UserError(f"no audio files ({', '.join(sorted(AUDIO_SUFFIXES))}) under {audio_dir}")
    skips, rows = SkipCounter(), []
    for file in files:
        try:
            info = sf.info(str(file))
            load_audio(file, info.samplerate)
        except AudioError as e:
            skips.add(e)
            continue
        except (sf.LibsndfileError, RuntimeError) as e:
            skips.add(AudioError(f"unreadable: {file} ({e})"))
            continue
        rows.append({"audio": os.path.relpath(file.resolve(), out.parent.resolve()),
                     "caption": _caption_for(file, by_name, ytids),
                     "duration": round(info.frames / info.samplerate, 3)})
    write_jsonl(out, rows)
    return len(rows), skips


def main() -> None:
    ap = argparse.ArgumentParser(description="Turn a folder of audio (+ captions) into a manifest.")
    ap.add_argument("--audio-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="manifest to write (.jsonl)")
    ap.add_argument("--captions", type=Path, help="captions as JSON Lines or MusicCaps-style CSV")
    args = ap.parse_args()
    n, skips = build_manifest(args.audio_dir, args.out, args.captions)
    print(f"wrote {n} clips to {args.out}; {skips.summary()}")


if __name__ == "__main__":
    run_cli(main)
