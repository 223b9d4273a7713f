"""Generation metrics on cases whose answer is known, and the two harnesses end to end."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from common.errors import UserError
from evaluation.adherence import estimate_key, estimate_tempo, normalise_key, tempo_correct
from evaluation.metrics import cycle_consistency, frechet_distance, kl_divergence
from tests.helpers import assert_clean_error, run_module, save_debug_parts

SR = 24000


def click_track(bpm: float, seconds: float) -> np.ndarray:
    wav = np.zeros(int(seconds * SR), dtype=np.float32)
    click = np.sin(2 * np.pi * 1000 * np.arange(480) / SR) * np.exp(-np.arange(480) / 80)
    for start in np.arange(0, seconds, 60 / bpm):
        i = int(start * SR)
        wav[i:i + 480] += click[: len(wav) - i] * 0.8
    return wav


def chords(names: list[list[float]], seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    env = np.minimum(1, 20 * t) * np.exp(-t)
    return np.concatenate([sum(np.sin(2 * np.pi * f * t) for f in c) * env * 0.2 for c in names]).astype(np.float32)


def test_frechet_distance_of_a_set_with_itself_is_zero_and_grows_with_shift():
    x = np.random.default_rng(0).normal(size=(200, 8))
    assert abs(frechet_distance(x, x)) < 1e-4
    near, far = frechet_distance(x, x + 0.5), frechet_distance(x, x + 2.0)
    assert near == pytest.approx(8 * 0.25, rel=0.05) and far == pytest.approx(8 * 4.0, rel=0.05)
    assert frechet_distance(x, x * 2) > 1.0   # a scaled covariance counts too
    with pytest.raises(ValueError):
        frechet_distance(x[:1], x)


def test_click_track_at_120_bpm_is_measured_as_120():
    bpm = estimate_tempo(click_track(120, 12), SR)
    assert bpm == pytest.approx(120, rel=0.04)
    assert tempo_correct(bpm, 120) and tempo_correct(60.5, 120) and tempo_correct(181, 60)
    assert not tempo_correct(100, 120) and not tempo_correct(130, 120)


def test_tempo_chance_scores_each_estimate_against_the_other_prompts():
    from evaluation.adherence import tempo_chance
    assert tempo_chance([120.0, 80.0], [120.0, 60.0]) == 0.5     # 120 is 60's double; 80 is not 120's
    assert tempo_chance([100.0, 100.0, 100.0], [100.0, 50.0, 300.0]) == 1.0   # octave factors all the way
    assert tempo_chance([100.0, 100.0], [100.0, 130.0]) == 0.5


def test_tempo_ceiling_counts_a_prompt_only_where_its_tempo_is_knowable_and_its_reference_tracked(parts, tmp_path,
                                                                                              monkeypatch):
    import shutil
    from audio_tokenizers.mulan import load_conditioner
    from data import tempo_guess
    from evaluation.tempo_ceiling import main
    mulan_dir = tmp_path / "mulan"
    shutil.copytree(parts / "mulan", mulan_dir)
    assert_clean_error(run_module("evaluation.tempo_ceiling", "--prompts", str(parts / "test.jsonl"), "--mulan",
                                  str(mulan_dir)), "has no tempo table")
    mulan = load_conditioner(mulan_dir)
    tempo_guess.save(tempo_guess.build(mulan, ["an organ hymn"] * 2, [80.0, 80.0], [1, 1]), mulan_dir)  # guesses 80
    rows = [("a slow organ hymn", 80, 80),        # no bpm stated, the guess right, tracked: counts
            ("a brisk organ hymn", 110, 110),     # no bpm stated, the guess (80) wrong: does not
            ("piano at 120 bpm", 120, 120),       # stated and tracked: counts
            ("piano at 100 bpm", 100, 120)]       # stated, but its reference clicks at 120: the tracker misses it
    for i, (caption, tempo, clicks) in enumerate(rows):
        sf.write(tmp_path / f"{i}.wav", click_track(clicks, 6.0), SR)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"audio": f"{i}.wav", "caption": c, "tempo": t}) + "\n"
                                              for i, (c, t, _) in enumerate(rows)))
    in_process(monkeypatch, main, "--prompts", tmp_path / "p.jsonl", "--mulan", mulan_dir, "--out", tmp_path / "c.json")
    got = json.loads((tmp_path / "c.json").read_text())
    assert [p["tracked"] for p in got["prompts"]] == [True, True, True, False]
    assert [p["guess_right"] for p in got["prompts"]] == [True, False, False, False]
    s = got["summary"]
    assert (s["prompts"], s["stated"], s["ceiling"], s["knowable_only"]) == (4, 2, 0.5, 0.75)
    assert s["reference_tracked"] == 0.75 and s["guess_right_of_unstated"] == 0.5
    (tmp_path / "bare.jsonl").write_text('{"audio": "0.wav", "caption": "an organ"}\n')   # no metadata tempo
    assert_clean_error(run_module("evaluation.tempo_ceiling", "--prompts", str(tmp_path / "p.jsonl"), "--limit", "0",
                                  "--mulan", str(mulan_dir)), "no prompts to score")
    assert_clean_error(run_module("evaluation.tempo_ceiling", "--prompts", str(tmp_path / "bare.jsonl"), "--mulan",
                                  str(mulan_dir)), "needs its metadata tempo")


def test_onset_alignment_is_one_for_the_same_notes_and_low_for_shifted_ones():
    from evaluation.oracle import onset_alignment
    clicks = torch.from_numpy(np.stack([click_track(120, 4), click_track(120, 4)]))
    shifted = torch.roll(clicks, int(0.25 * SR), dims=-1)   # an eighth note later at 120 bpm
    same, off = onset_alignment(clicks, clicks, SR), onset_alignment(shifted, clicks, SR)
    assert torch.allclose(same, torch.ones(2), atol=1e-4) and (off < 0.2).all()
    noisy = clicks + 0.05 * torch.from_numpy(np.random.default_rng(0).normal(size=clicks.shape).astype(np.float32))
    assert (onset_alignment(noisy, clicks, SR) > 0.5).all()


def test_pulse_strength_is_sharp_in_tempo_and_allows_half_and_double():
    from audio_tokenizers.spectral import pulse_strength
    x = torch.from_numpy(np.stack([click_track(120, 10), click_track(96, 10),
                                   np.random.default_rng(0).normal(size=10 * SR).astype(np.float32) * 0.1]))
    at = {bpm: pulse_strength(x, SR, bpm) for bpm in (120, 60, 96, 115, 125)}
    assert at[120][0] > 0.5 and at[60][0] > 0.5 and at[96][1] > 0.5   # its own tempo, and half of it
    assert max(at[115][0], at[125][0], at[120][1], at[96][0]) < 0.25  # 4% off, or another tempo
    assert all(abs(v[2]) < 0.2 for v in at.values())                 # noise has no pulse


def test_key_of_a_cadence_in_g_major():
    G, B, D, C, E, A, Fs = 196.0, 246.9, 293.7, 261.6, 329.6, 220.0, 370.0
    wav = chords([[G, B, D], [C, E, G * 2], [D, Fs, A * 2], [G, B, D]] * 2)
    assert normalise_key(estimate_key(wav, SR)) == "G major"
    assert normalise_key("B- major") == "Bb major" and normalise_key("c# Minor") == "C# minor"
    assert normalise_key("D- major") == "C# major"


def test_cycle_consistency_and_kl():
    t = torch.nn.functional.normalize(torch.eye(4) + 0.1, dim=1)
    res = cycle_consistency(t, t)
    assert res["mcc"] == pytest.approx(1.0) and res["mcc_shuffled"] < 0.5
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    assert kl_divergence(p, p) == pytest.approx(0.0, abs=1e-9)
    assert kl_divergence(p, p[::-1]) > 0.5


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    d = save_debug_parts(tmp_path_factory.mktemp("parts"))
    # two corpus-style prompts with references and metadata, and a train split for the classifier
    rows = []
    for i, (bpm, label) in enumerate([(120, "piano"), (90, "organ"), (100, "piano"), (80, "organ")]):
        sf.write(d / f"{i}.wav", click_track(bpm, 2.0) + chords([[261.6 * (1 + i % 2), 329.6]], 2.0), SR)
        rows.append({"audio": f"{i}.wav", "caption": f"{label} at {bpm} bpm", "tempo": bpm, "key": "C major",
                     "instrument_label": label})
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def stage_flags(d):
    return [x for n in ("mulan", "semantic_tokenizer", "acoustic", "semantic", "coarse", "fine")
            for x in ("--stage", f"{n}={d / n}")]


def in_process(monkeypatch, main, *args):
    """Run a command's main() here (no interpreter start-up, librosa's JIT compiled once)."""
    monkeypatch.setattr(sys, "argv", ["prog", *map(str, args)])
    main()


def test_generate_and_score_writes_scores_table_and_grid(parts, tmp_path, monkeypatch):
    from evaluation.generate_and_score import main
    in_process(monkeypatch, main, "--prompts", parts / "test.jsonl", "--out", tmp_path / "gen", "--duration", "1.0",
               "--fad", "features", "mulan", *stage_flags(parts))
    res = json.loads((tmp_path / "gen/scores.json").read_text())
    assert res["clips"] == 2 and len(list((tmp_path / "gen/clips").glob("*.wav"))) == 2
    for key in ("fad_features", "fad_mulan", "mcc", "mcc_shuffled", "kl", "tempo_acc", "tempo_chance",
                "ref_tempo_acc", "instrument_acc", "codec_mel_distance", "seconds_per_clip"):
        assert key in res, key
    assert -1 <= res["mcc"] <= 1 and res["kl"] >= 0 and res["fad_features"] >= 0
    clips = [json.loads(l) for l in (tmp_path / "gen/clips.jsonl").read_text().splitlines()]   # the same, per clip
    assert len(clips) == 2 and abs(np.mean([c["mcc"] for c in clips]) - res["mcc"]) < 1e-3
    for key in ("tempo", "instrument"):
        assert np.mean([c[f"{key}_ok"] for c in clips]) == res[f"{key}_acc"]
    est = [c["tempo_estimated"] for c in clips]   # the chance baseline is the clips' estimates, prompts swapped
    assert res["tempo_chance"] == np.mean([tempo_correct(est[0], 90), tempo_correct(est[1], 120)])
    assert "| default |" in (tmp_path / "gen/scores.md").read_text()
    assert (tmp_path / "gen/grid.png").stat().st_size > 1000
    assert_clean_error(run_module("evaluation.generate_and_score", "--prompts", str(tmp_path / "none.txt"),
                                  "--out", str(tmp_path / "x")), "not found")
    # a manifest copied away from its audio/ fails before generating anything, not at scoring time
    (tmp_path / "moved").mkdir()
    (tmp_path / "moved/test.jsonl").write_text((parts / "test.jsonl").read_text())
    assert_clean_error(run_module("evaluation.generate_and_score", "--prompts", str(tmp_path / "moved/test.jsonl"),
                                  "--out", str(tmp_path / "y"), *map(str, stage_flags(parts))), "2 reference clips",
                       "missing", "own folder")
    assert not (tmp_path / "y").exists()


def test_rerank_keeps_the_candidate_at_the_stated_tempo(parts):
    from pipeline import Pipeline, load_parts
    pipe = Pipeline(load_parts({n: str(parts / n) for n in ("mulan", "semantic_tokenizer", "acoustic", "semantic",
                                                             "coarse", "fine")}))
    cands = torch.from_numpy(np.stack([click_track(96, 8), click_track(120, 8)]))[:, None]
    for text, want in (("drums at 96 bpm", 0), ("drums, 120 BPM", 1)):
        assert torch.equal(pipe.rerank([text], cands, 2, tempo_weight=100.0)[0], cands[want])
    by_mulan = pipe.rerank(["drums"] * 2, torch.cat([cands, cands.flip(0)]), 2, tempo_weight=100.0)
    assert torch.equal(by_mulan[0], by_mulan[1])   # no bpm stated: MuLan alone, whatever the order


def test_candidates_summary_counts_each_way_of_picking():
    from evaluation.candidates import summarise
    c = lambda ok, mulan, score, pulse: {"tempo_ok": ok, "mulan": mulan, "score": score, "pulse": pulse}  # noqa: E731
    per = [[c(False, 0.9, 0.9, 0.0), c(True, 0.1, 1.1, 1.0)],      # MuLan picks wrong, the rule with pulse right
           [c(False, 0.2, 0.2, 0.0), c(False, 0.5, 0.5, 0.1)]]     # nothing to pick
    s = summarise(per)["tempo_ok"]
    assert s == {"prompts": 2, "first": 0.0, "rerank": 0.5, "mulan": 0.0, "mean": 0.25, "any": 0.5}
    assert summarise(per)["pulse"]["median_if_tempo_ok"] == 1.0 and "key_ok" not in summarise(per)


def test_candidates_runs_end_to_end(parts, tmp_path, monkeypatch):
    from evaluation.candidates import main
    in_process(monkeypatch, main, "--prompts", parts / "test.jsonl", "--limit", "1", "--k", "2", "--duration", "1.0",
               "--out", tmp_path / "c", "--train-manifest", parts / "train.jsonl", *stage_flags(parts))
    row = json.loads((tmp_path / "c/candidates.jsonl").read_text())
    assert len(row["candidates"]) == 2 and all(-1 <= x["mulan"] <= 1 and "key_ok" in x for x in row["candidates"])
    assert "| key_ok (1) |" in (tmp_path / "c/summary.md").read_text()
    assert_clean_error(run_module("evaluation.candidates", "--prompts", str(parts / "test.jsonl"), "--k", "1",
                                  "--out", str(tmp_path / "d")), "--k must be at least 2")


def test_ablate_runs_each_variant_on_the_same_prompts(parts, tmp_path, monkeypatch):
    from evaluation.ablate import main
    (tmp_path / "a.yaml").write_text("name: cfg3\noptions: {guidance: 3.0}\n")
    (tmp_path / "b.yaml").write_text("name: greedy-fine\noptions: {guidance: 1.0, fine: {temperature: 0.0}, rerank: 2}\n")
    prompts = tmp_path / "p.txt"
    prompts.write_text("calm piano\nfast drums\n")
    flags = [f"{n}: {parts / n}" for n in ("mulan", "semantic_tokenizer", "acoustic", "semantic", "coarse", "fine")]
    for f in ("a.yaml", "b.yaml"):
        (tmp_path / f).write_text((tmp_path / f).read_text() + "stages: {" + ", ".join(flags) + "}\n")
    in_process(monkeypatch, main, "--variants", tmp_path / "a.yaml", tmp_path / "b.yaml", "--prompts", prompts,
               "--out", tmp_path / "abl", "--duration", "1.0", "--fad", "features")
    res = json.loads((tmp_path / "abl/ablation.json").read_text())
    assert set(res) == {"cfg3", "greedy-fine", "paired"} and all("mcc" in res[n] for n in ("cfg3", "greedy-fine"))
    assert "fad_features" not in res["cfg3"]   # text prompts have no references
    table = (tmp_path / "abl/ablation.md").read_text()
    assert "| cfg3 |" in table and "| greedy-fine |" in table
    clips = [json.loads(l) for l in (tmp_path / "abl/cfg3/clips.jsonl").read_text().splitlines()]
    assert [c["caption"] for c in clips] == ["calm piano", "fast drums"] and all(-1 <= c["mcc"] <= 1 for c in clips)
    other = [json.loads(l) for l in (tmp_path / "abl/greedy-fine/clips.jsonl").read_text().splitlines()]
    mcc = res["paired"]["greedy-fine"]["mcc"]   # the second variant minus the first, clip by clip
    assert mcc["clips"] == 2 and abs(mcc["mean"] - np.mean([b["mcc"] - a["mcc"] for a, b in zip(clips, other)])) < 1e-3
    assert mcc["ci95"][0] <= mcc["mean"] <= mcc["ci95"][1] and "greedy-fine" in (tmp_path / "abl/paired.md").read_text()
    from evaluation.ablate import load_variant
    assert load_variant(tmp_path / "b.yaml")[2].rerank == 2
    for bad in ("rerank: 0", "rerank_tempo: -1", "rerank: many"):
        (tmp_path / "r.yaml").write_text(f"options: {{{bad}}}\n")
        with pytest.raises(UserError, match="rerank"):
            load_variant(tmp_path / "r.yaml")
    for bad, says in (("semantic: {beat_pick: 0}", "at least 1"), ("coarse: {beat_pick: 4}", "semantic.beat_pick")):
        (tmp_path / "r.yaml").write_text(f"options: {{{bad}}}\n")
        with pytest.raises(UserError, match=says):
            load_variant(tmp_path / "r.yaml")
    (tmp_path / "bad.yaml").write_text("name: x\nstagez: {}\n")
    assert_clean_error(run_module("evaluation.ablate", "--variants", str(tmp_path / "bad.yaml"), "--prompts",
                                  str(prompts), "--out", str(tmp_path / "abl2")), "unknown keys")


def test_oracle_scores_every_row_on_labelled_clips(parts, tmp_path, monkeypatch):
    from evaluation.oracle import main
    in_process(monkeypatch, main, "--manifest", parts / "test.jsonl", "--out", tmp_path / "or", "--seconds", "1.5",
               "--per-label", "1", *stage_flags(parts))
    res = json.loads((tmp_path / "or/oracle.json").read_text())
    assert res["clips"] == 2 and res["labels"] == 2
    rows = res["rows"]
    assert list(rows) == ["original", "codec", "coarse_only", "fine_stage", "coarse_stage_only", "coarse_stage",
                          "coarse_stage_text", "chain"]
    assert rows["original"]["instrument_acc"] == 1.0 and "mel_distance" not in rows["original"]
    assert all(0 <= r["instrument_acc"] <= 1 and 0 <= r["tempo_acc"] <= 1 and 0 <= r["key_acc"] <= 1
               for r in rows.values())   # both clips state a tempo and a key
    assert rows["original"]["tempo_acc"] == 1.0   # click tracks: the beat tracker's ceiling
    assert rows["codec"]["mel_distance"] > 0 and "mel_distance" not in rows["chain"]
    assert -1 <= rows["codec"]["onset_alignment"] <= 1 and "onset_alignment" not in rows["chain"]
    assert all(-1 <= r["pulse"] <= 1 for r in rows.values())
    assert rows["original"]["pulse"] > 0.2   # click tracks (1.5 s: few beats)
    assert "| coarse_stage |" in (tmp_path / "or/oracle.md").read_text()
    assert "| tempo | key | mel distance | onset alignment | pulse |" in (tmp_path / "or/oracle.md").read_text()
    # --stated-bpm keeps captions that state one ("organ at 90 bpm" does); --group-by reports each group
    in_process(monkeypatch, main, "--manifest", parts / "test.jsonl", "--out", tmp_path / "g", "--seconds", "1.5",
               "--per-label", "1", "--rows", "original", "codec", "--stated-bpm", "--group-by", "instrument_label",
               *stage_flags(parts))
    res = json.loads((tmp_path / "g/oracle.json").read_text())
    groups = res["rows"]["original"]["groups"]
    assert res["clips"] == 2 and set(groups) == {"piano", "organ"} and groups["organ"]["clips"] == 1
    assert groups["organ"]["tempo_hits"] == 1 and res["rows"]["original"]["tempo_hits"] == 2
    assert "| row | organ | piano |" in (tmp_path / "g/oracle.md").read_text()
    per = [json.loads(l) for l in (tmp_path / "g/clips.jsonl").read_text().splitlines()]
    assert [(o["row"], Path(o["audio"]).name) for o in per] == [(r, f"{i}.wav") for r in ("original", "codec")
                                                                 for i in (0, 1)]
    assert all(o["tempo_ok"] for o in per[:2]) and "onset_alignment" in per[2]
    unstated = tmp_path / "unstated.jsonl"
    unstated.write_text("".join(json.dumps(dict(json.loads(l), caption="a calm organ")) + "\n"
                                for l in (parts / "test.jsonl").read_text().splitlines()))
    assert_clean_error(run_module("evaluation.oracle", "--manifest", str(unstated), "--out", str(tmp_path / "u"),
                                  "--stated-bpm", "--train-manifest", str(parts / "train.jsonl")),
                       "a caption stating a bpm")
    assert_clean_error(run_module("evaluation.oracle", "--manifest", str(tmp_path / "none.jsonl"),
                                  "--out", str(tmp_path / "x"), "--train-manifest", str(parts / "train.jsonl")),
                       "not found")
    # --knob reaches the generation options the rows are rendered with
    import evaluation.oracle as oracle
    seen = []
    real = oracle.run_oracle
    monkeypatch.setattr(oracle, "run_oracle", lambda *a: seen.append(a[5]) or real(*a))
    in_process(monkeypatch, main, "--manifest", parts / "test.jsonl", "--out", tmp_path / "k", "--seconds", "1.5",
               "--per-label", "1", "--rows", "coarse_stage_only", "--knob", "coarse.temperature=0.5",
               "--knob", "coarse.top_k=3", *stage_flags(parts))
    assert seen[0].coarse == {"temperature": 0.5, "top_k": 3} and seen[0].semantic == {}
    assert json.loads((tmp_path / "k/oracle.json").read_text())["knobs"] == ["coarse.temperature=0.5", "coarse.top_k=3"]
    assert_clean_error(run_module("evaluation.oracle", "--manifest", str(parts / "test.jsonl"), "--out",
                                  str(tmp_path / "y"), "--knob", "coarse.warmth=2"), "--knob")


def test_classifier_features_are_kept_and_reused_only_for_the_same_clips(parts, tmp_path, monkeypatch):
    """--classifier-features: the second fit reads no audio and predicts the same; other clips recompute."""
    import evaluation.codec as codec
    from data.manifest import read_manifest
    rows = read_manifest(parts / "train.jsonl")
    feats = tmp_path / "f.npz"
    first = codec.instrument_classifier(rows, 24000, 1.0, features=feats)
    assert feats.is_file()
    monkeypatch.setattr(codec, "iter_audio", lambda *a: (_ for _ in ()).throw(AssertionError("read audio again")))
    again = codec.instrument_classifier(rows, 24000, 1.0, features=feats)
    X = np.load(feats)["X"]
    assert (first.predict(X) == again.predict(X)).all()
    with pytest.raises(AssertionError, match="read audio again"):
        codec.instrument_classifier(rows[:-1], 24000, 1.0, features=feats)


def test_semantic_pulse_finds_ids_that_repeat_at_the_beat(tmp_path):
    from evaluation.semantic_pulse import pulse
    rng = np.random.default_rng(0)
    bar = rng.integers(0, 50, 25)                    # 120 bpm at 25 Hz: 12.5 frames a beat, a 2-beat pattern
    assert pulse(np.tile(bar, 10), 120, 25.0) > 0.5
    assert abs(pulse(rng.integers(0, 50, 250), 120, 25.0)) < 0.05
    assert np.isnan(pulse(np.tile(bar, 1)[:12], 120, 25.0))
    held = np.repeat(np.arange(17) * 7 % 50, 15)     # 100 bpm: a new id every 15 frames, held in between
    assert pulse(held, 100, 25.0, "onsets") > 0.5 > pulse(held, 100, 25.0, "repeats")
    assert abs(pulse(rng.integers(0, 50, 250), 100, 25.0, "onsets")) < 0.1
    (tmp_path / "p.txt").write_text("a calm piano piece\n")
    assert_clean_error(run_module("evaluation.semantic_pulse", "--prompts", str(tmp_path / "p.txt")), "states a bpm")
