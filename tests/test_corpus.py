import json
from collections import defaultdict

import numpy as np
import pytest
import soundfile as sf

from data import captions as cap
from data.corpus import _normalise, _Retry, build_corpus, split_of
from data.grooves import GENRES
from data.render import estimate_key, fit_to_range
from tests.helpers import assert_clean_error, run_module, sine


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    rows, levels = build_corpus(out, clips=10, seed=3, workers=1, seconds=3.0)
    return out, rows, levels


def test_corpus_files_levels_and_fields(small_corpus):
    out, rows, levels = small_corpus
    assert [r["clip"] for r in rows] == list(range(10))
    for r in rows:
        wav, sr = sf.read(out / r["audio"])
        assert sr == 24000 and wav.ndim == 1 and len(wav) == 72000
        for key in ("source", "work_id", "instruments", "programs", "tempo", "key", "meter", "genre",
                    "caption", "seed", "split"):
            assert key in r, key
    assert min(levels) > -45.0
    splits = {s: [json.loads(l) for l in (out / f"{s}.jsonl").read_text().splitlines()]
              for s in ("train", "valid", "test")}
    assert sum(len(v) for v in splits.values()) == 10


def test_same_seed_gives_identical_metadata(small_corpus, tmp_path):
    out, _, _ = small_corpus
    build_corpus(tmp_path, clips=10, seed=3, workers=2, seconds=3.0)
    assert (tmp_path / "metadata.jsonl").read_bytes() == (out / "metadata.jsonl").read_bytes()


def test_split_is_by_work_so_no_work_spans_two_splits(small_corpus):
    from data.scores import build_index
    _, rows, _ = small_corpus
    for r in rows:
        assert r["split"] == split_of(r["work_id"])
    by_split = defaultdict(set)
    for works in build_index().values():
        for w in works:
            by_split[split_of(w.work_id)].add(w.work_id)
    for g in GENRES:
        for v in range(64):
            by_split[split_of(f"groove/{g}/{v}")].add(f"groove/{g}/{v}")
    assert not (by_split["train"] & by_split["valid"]) and not (by_split["train"] & by_split["test"])
    total = sum(len(s) for s in by_split.values())
    assert 0.85 < len(by_split["train"]) / total < 0.95 and len(by_split["test"]) > 100


def test_held_out_only_corpus_draws_works_of_the_asked_splits(tmp_path):
    rows, _ = build_corpus(tmp_path, clips=6, seed=3, workers=1, seconds=3.0, splits=("valid", "test"))
    assert {r["split"] for r in rows} <= {"valid", "test"}
    assert all(split_of(r["work_id"]) == r["split"] for r in rows)
    assert not (tmp_path / "train.jsonl").exists()
    n = sum(len((tmp_path / f"{s}.jsonl").read_text().splitlines()) for s in ("valid", "test"))
    assert n == 6


def test_captions_vary_in_phrasing():
    rng = np.random.default_rng(0)
    meta = {"style": "Irish reel", "players": "solo fiddle", "tempo": 110, "key": "D major",
            "mode": "major", "meter": "2/2", "origin": "Ireland"}
    captions = [cap.make_caption(meta, rng) for _ in range(300)]
    assert len(set(captions)) > 150  # the same metadata, many phrasings
    assert all("Irish reel" in c and ("fiddle" in c) for c in captions)
    assert any(c.startswith("Solo fiddle playing") for c in captions)
    assert any("D major" in c for c in captions) and any("110" in c for c in captions)


def test_key_finding_and_instrument_ranges():
    c_major = np.array([60, 62, 64, 65, 67, 69, 71, 72, 67, 64, 60])
    assert estimate_key(c_major, np.ones(len(c_major))) == ("C", "major")
    a_minor = np.array([57, 60, 64, 57, 59, 60, 62, 64, 65, 64, 62, 60, 59, 57, 56, 57])
    assert estimate_key(a_minor, np.ones(len(a_minor))) == ("A", "minor")
    assert estimate_key(c_major + 2, np.ones(len(c_major))) == ("D", "major")
    low = np.array([40, 43, 47, 52])  # far below the flute (60-96)
    fitted = fit_to_range(low, 73)
    assert fitted.min() >= 60 and fitted.max() <= 96 and np.all(np.diff(fitted) == np.diff(low))


def test_near_empty_windows_are_rejected():
    tone = sine(440, 10.0, 24000)
    gappy = tone.copy()
    gappy[: 24000 * 3] = 0.0  # 30% silence
    with pytest.raises(_Retry):
        _normalise(gappy)
    with pytest.raises(_Retry):
        _normalise(np.zeros(240000, np.float32))
    out = _normalise(tone * 0.01)
    assert abs(20 * np.log10(np.sqrt(np.mean(out ** 2))) + 20.0) < 0.1


def test_cli_errors(tmp_path):
    assert_clean_error(run_module("data.corpus", "--out", str(tmp_path), "--clips", "0"), "--clips")
    assert_clean_error(run_module("data.corpus", "--out", str(tmp_path), "--clips", "2", "--splits", "test,holdout"),
                       "--splits", "train,valid,test")
    import os
    env_sf = os.environ.get("MUSICLM_SOUNDFONT")
    os.environ["MUSICLM_SOUNDFONT"] = str(tmp_path / "missing.sf2")
    try:
        proc = run_module("data.corpus", "--out", str(tmp_path / "c"), "--clips", "2", "--workers", "1")
    finally:
        os.environ.pop("MUSICLM_SOUNDFONT") if env_sf is None else os.environ.update(MUSICLM_SOUNDFONT=env_sf)
    assert_clean_error(proc, "soundfont", "apt-get install -y fluidsynth fluid-soundfont-gm")
