"""Does the output follow the prompt? Tempo, key and instrument estimated from the audio.

- tempo: librosa's beat tracker; correct when within 4% of the requested bpm, allowing the
  usual octave errors (x2, x1/2, x3, x1/3: MIREX's "accuracy 2");
- key: mean chroma (CQT) correlated with the 24 rotated Krumhansl-Schmuckler profiles;
- instrument: MFCC statistics + logistic regression trained on corpus renders
  (evaluation.codec.instrument_classifier), also the source of label distributions for KL.
"""
from __future__ import annotations

import numpy as np

from data.attributes import ALIASES, PITCHES as NAMES   # one spelling of the keys for prompts and scores

MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])
OCTAVE_FACTORS = (1.0, 2.0, 0.5, 3.0, 1 / 3)
TEMPO_TOLERANCE = 0.04


def estimate_tempo(wav: np.ndarray, sr: int) -> float:
    import librosa
    tempo, _ = librosa.beat.beat_track(y=wav.astype(np.float32), sr=sr)
    return float(np.atleast_1d(tempo)[0])


def tempo_correct(estimated: float, requested: float, tolerance: float = TEMPO_TOLERANCE) -> bool:
    return any(abs(estimated - f * requested) <= tolerance * f * requested for f in OCTAVE_FACTORS)


def tempo_chance(estimated: list[float], requested: list[float], tolerance: float = TEMPO_TOLERANCE) -> float:
    """The tempo score with the prompts shuffled: each clip's estimate against every other prompt's bpm. A chain
    that ignores the asked tempo scores this much (the octave factors and the corpus's narrow tempo ranges make
    it far from 0); the tempo counterpart of MuLan's shuffled cycle consistency."""
    n = len(estimated)
    hits = [tempo_correct(estimated[i], requested[j], tolerance) for i in range(n) for j in range(n) if i != j]
    return float(np.mean(hits)) if hits else float("nan")


def estimate_key(wav: np.ndarray, sr: int) -> str:
    """-> e.g. "G major", "F# minor"."""
    import librosa
    chroma = librosa.feature.chroma_cqt(y=wav.astype(np.float32), sr=sr).mean(1)
    best, name = -2.0, ""
    for mode, profile in (("major", MAJOR), ("minor", MINOR)):
        for tonic in range(12):
            r = np.corrcoef(chroma, np.roll(profile, tonic))[0, 1]
            if r > best:
                best, name = r, f"{NAMES[tonic]} {mode}"
    return name


def normalise_key(key: str) -> str:
    tonic, _, mode = key.strip().partition(" ")
    tonic = tonic[:1].upper() + tonic[1:].replace("-", "b")
    return f"{ALIASES.get(tonic, tonic)} {mode.lower()}"


def adherence(rows: list[dict], waves: list[np.ndarray], sr: int, classifier=None,
              per_clip: list[dict] | None = None) -> dict:
    """Accuracy of tempo, key and instrument against the rows' metadata, each over the rows that state it
    (`n_tempo`, ... say how many when not all do); `instrument_distinct_correct` counts the different
    instruments recognised where asked for; `tempo_chance` is the tempo score with the prompts shuffled. With
    `per_clip` (one dict per row), each clip's outcome is added to its dict as `tempo_ok`, `key_ok`,
    `instrument_ok` (and `instrument_heard`, `tempo_estimated`)."""
    from evaluation.codec import mfcc_features
    out = {}
    for field, name in (("tempo", "tempo"), ("key", "key"), ("instrument_label", "instrument")):
        asked = [i for i, r in enumerate(rows) if field in r]
        if not asked or (name == "instrument" and classifier is None):
            continue
        if name == "tempo":
            est, want = [estimate_tempo(waves[i], sr) for i in asked], [float(rows[i]["tempo"]) for i in asked]
            ok = [tempo_correct(e, w) for e, w in zip(est, want)]
            out["tempo_chance"] = tempo_chance(est, want)
            if per_clip is not None:
                for i, e in zip(asked, est):
                    per_clip[i]["tempo_estimated"] = round(e, 2)
        elif name == "key":
            ok = [normalise_key(estimate_key(waves[i], sr)) == normalise_key(rows[i]["key"]) for i in asked]
        else:
            pred = classifier.predict(np.stack([mfcc_features(waves[i], sr) for i in asked]))
            ok = list(pred == np.array([rows[i]["instrument_label"] for i in asked]))
            out["instrument_distinct_correct"] = len({rows[i]["instrument_label"] for i, good in zip(asked, ok) if good})
            if per_clip is not None:
                for i, heard in zip(asked, pred):
                    per_clip[i]["instrument_heard"] = str(heard)
        out[f"{name}_acc"] = float(np.mean(ok))
        if per_clip is not None:
            for i, good in zip(asked, ok):
                per_clip[i][f"{name}_ok"] = bool(good)
        if len(asked) < len(rows):
            out[f"n_{name}"] = len(asked)
    return out
