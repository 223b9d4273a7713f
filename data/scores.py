"""Works from music21's bundled corpus, as note events the renderer can play.

The index is built without parsing anything: single-file works are listed by path, and the
multi-tune ABC collections (Essen folk songs, O'Neill's 1850) are split into one text per
tune, so a clip parses just the one tune it uses (parsing a whole Essen file takes ~16 s).

A parsed work is a list of parts, each a list of `Note(start, duration, pitch)` in quarter
notes, plus the meter string.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import music21
from music21 import corpus as m21corpus

# Essen file prefix -> (what the songs are, where they come from). Test files are skipped.
ESSEN_COLLECTIONS = {
    "altdeu": ("old German folk song", "Germany"), "ballad": ("German ballad", "Germany"),
    "boehme": ("German folk song", "Germany"), "dva": ("German folk song", "Germany"),
    "erk": ("German folk song", "Germany"), "fink": ("German folk song", "Germany"),
    "zuccal": ("German folk song", "Germany"), "kinder": ("German children's song", "Germany"),
    "han": ("Chinese Han folk song", "China"), "lot": ("folk song from Lorraine", "Lorraine"),
    "lux": ("Luxembourgish folk song", "Luxembourg"), "irl": ("Irish folk song", "Ireland"),
    "folkHaydn": ("folk song", "Europe"),
}
# Irish/Scottish tune types as they appear in R: fields, normalised.
TUNE_TYPES = {"reel": "reel", "hornpipe": "hornpipe", "jig": "jig", "double jig": "jig",
              "slipjig": "slip jig", "slip jig": "slip jig", "air": "air", "strathspey": "strathspey",
              "clog": "clog dance", "highland fling": "highland fling", "fling": "highland fling",
              "polka": "polka", "waltz": "waltz", "march": "march", "set dance": "set dance"}


@dataclass(frozen=True)
class Work:
    source: str            # e.g. "bach_chorale", "essen_folk", "oneills", "ryans"
    work_id: str           # unique within the corpus, stable across runs
    path: str              # file in music21's corpus
    tune_index: int = -1   # position in a multi-tune ABC file, -1 for single-work files
    meta: tuple = ()       # extra (key, value) pairs: genre, origin, title, tune_type


@dataclass
class Note:
    start: float      # quarter notes from the start of the work
    duration: float   # quarter notes
    pitch: int        # MIDI


@dataclass
class ParsedWork:
    parts: list[list[Note]]
    meter: str
    length: float = field(default=0.0)  # quarter notes


# ---------------------------------------------------------------- index

def _split_abc(text: str) -> list[str]:
    """One ABC text per tune: split at every 'X:' header line."""
    chunks = re.split(r"(?m)^(?=X:)", text)
    return [c for c in chunks if c.startswith("X:")]


def _abc_field(tune: str, name: str) -> str:
    m = re.search(rf"(?m)^{name}:\s*(.*)$", tune)
    return m.group(1).strip() if m else ""


def _tune_type(tune: str) -> str:
    r = _abc_field(tune, "R").lower().strip(" .]")
    if r in TUNE_TYPES:
        return TUNE_TYPES[r]
    title = _abc_field(tune, "T").lower()
    for word, kind in TUNE_TYPES.items():
        if word in title:
            return kind
    return ""


def _corpus_paths(composer: str) -> list[Path]:
    return sorted(Path(p) for p in m21corpus.getComposer(composer))


@lru_cache(maxsize=1)
def build_index() -> dict[str, list[Work]]:
    """All usable works by source, in a deterministic order."""
    index: dict[str, list[Work]] = {}
    index["bach_chorale"] = [Work("bach_chorale", f"bach/{p.stem}", str(p))
                             for p in _corpus_paths("bach") if p.name.startswith("bwv") and p.suffix == ".mxl"]
    index["palestrina"] = [Work("palestrina", f"palestrina/{p.stem}", str(p))
                           for p in _corpus_paths("palestrina") if p.suffix == ".krn"]
    index["madrigal"] = [Work("madrigal", f"monteverdi/{p.stem}", str(p))
                         for p in _corpus_paths("monteverdi") if p.suffix == ".mxl"]
    index["trecento"] = [Work("trecento", f"trecento/{p.stem}", str(p))
                         for p in _corpus_paths("trecento") if p.suffix == ".xml"]
    essen = []
    for p in _corpus_paths("essenFolksong"):
        prefix = re.match(r"[a-zA-Z]+", p.stem).group(0)
        if prefix not in ESSEN_COLLECTIONS:
            continue
        genre, origin = ESSEN_COLLECTIONS[prefix]
        for i, tune in enumerate(_split_abc(p.read_text(errors="replace"))):
            essen.append(Work("essen_folk", f"essen/{p.stem}/{i}", str(p), i,
                              (("genre", genre), ("origin", origin), ("title", _abc_field(tune, "T")))))
    index["essen_folk"] = essen
    for source, composer in (("oneills", "oneills1850"), ("ryans", "ryansMammoth")):
        works = []
        for p in _corpus_paths(composer):
            for i, tune in enumerate(_split_abc(p.read_text(errors="replace"))):
                kind = _tune_type(tune) or "air"
                origin = "Ireland" if source == "oneills" else ("Scotland" if kind in ("strathspey", "highland fling") else "Ireland")
                works.append(Work(source, f"{composer}/{p.stem}/{i}", str(p), i,
                                  (("tune_type", kind), ("origin", origin), ("title", _abc_field(tune, "T")))))
        index[source] = works
    return index


# ---------------------------------------------------------------- parsing

@lru_cache(maxsize=64)
def parse_work(work: Work) -> ParsedWork:
    """Parse a work into note events (cached per process)."""
    if work.tune_index >= 0:
        tunes = _split_abc(Path(work.path).read_text(errors="replace"))
        score = music21.converter.parse(tunes[work.tune_index], format="abc")
    else:
        score = music21.converter.parse(work.path)
    if isinstance(score, music21.stream.Opus):
        score = score.scores[0]
    parts = list(score.parts) or [score]
    out = []
    for part in parts:
        notes = []
        for n in part.stripTies().flatten().notes:
            dur = float(n.quarterLength)
            if dur <= 0:  # grace notes
                continue
            for p in n.pitches:
                notes.append(Note(float(n.offset), dur, int(p.midi)))
        if notes:
            out.append(sorted(notes, key=lambda x: (x.start, x.pitch)))
    ts = next(iter(score.recurse().getElementsByClass("TimeSignature")), None)
    meter = ts.ratioString if ts is not None else "4/4"
    length = max((n.start + n.duration for part in out for n in part), default=0.0)
    return ParsedWork(out, meter, length)
