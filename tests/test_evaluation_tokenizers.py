"""The codec and semantic-tokenizer evaluation commands, on a tiny rendered corpus."""
import json

import numpy as np
import pytest
import torch

from audio_tokenizers.acoustic import AcousticConfig, build_codec, tokenizer_for
from audio_tokenizers.semantic import SemanticTokenizerConfig
from audio_tokenizers.semantic_train import fit_kmeans
from common.config import load_config
from data.corpus import build_corpus
from evaluation.codec import evaluate_codec, mfcc_features
from evaluation.semantic import bags, evaluate_tokenizer, paired_interval
from tests.helpers import ROOT, run_module


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("evalcorpus")
    rows, _ = build_corpus(out, clips=12, seed=5, workers=1, seconds=2.0)
    # tiny corpora have few test works: use every clip as both splits
    for split in ("train", "test", "valid"):
        (out / f"{split}.jsonl").write_text((out / "metadata.jsonl").read_text())
    return out


def test_codec_evaluation_reports_every_number(corpus, tmp_path):
    torch.manual_seed(0)
    cfg = load_config(AcousticConfig, ROOT / "configs/debug/acoustic.yaml")
    res = evaluate_codec(tokenizer_for(build_codec(cfg)), corpus, clips=6, seconds=1.0, train_clips=12,
                         out=tmp_path)
    for key in ("mel_distance@2", "mel_distance@4", "instrument_acc_original", "instrument_retention"):
        assert key in res
    assert res["mel_distance@2"] > 0.3  # an untrained codec is far from the originals
    assert res["instrument_acc_original"] == 1.0  # trained and scored on the same clips
    assert (tmp_path / "spectrograms.png").stat().st_size > 1000
    assert json.loads((tmp_path / "results.json").read_text()) == res


def test_mfcc_features_tell_timbres_apart():
    t = np.arange(24000) / 24000
    pure = np.sin(2 * np.pi * 220 * t).astype(np.float32)
    bright = np.sign(pure).astype(np.float32) * 0.5
    a, b = mfcc_features(pure, 24000), mfcc_features(bright, 24000)
    assert a.shape == (80,) and np.linalg.norm(a - b) > 10


def test_semantic_evaluation_on_the_logmel_baseline(corpus):
    cfg = load_config(SemanticTokenizerConfig, ROOT / "configs/debug/semantic_tokenizer.yaml",
                      ["backend=logmel", f"train_manifest={corpus / 'train.jsonl'}", "kmeans_clips=12"])
    tok = fit_kmeans(cfg, None)
    res = evaluate_tokenizer(tok, corpus, train_clips=12, test_clips=12)
    assert res["probe_source"] == 1.0 and res["probe_instrument_label"] == 1.0  # seen clips
    assert res["unchanged_gain_3db"] == 1.0  # per-clip normalisation removes gain exactly
    assert 0.2 < res["unchanged_noise_30db"] <= 1.0
    assert 0 < res["codebook_usage"] <= 1.0
    assert 0 <= res["changes_per_second"] <= tok.frame_rate and res["changes_per_onset"] >= 0
    assert np.allclose(bags(torch.tensor([[0, 0, 1, 3]]), 4), [[0.5, 0.25, 0, 0.25]])
    # other held-out manifests replace CORPUS/test.jsonl, in order, up to test_clips
    lines = (corpus / "test.jsonl").read_text().splitlines()
    (corpus / "more").mkdir(exist_ok=True)
    (corpus / "more/a.jsonl").write_text("\n".join(l.replace('"audio/', '"../audio/') for l in lines[:3]) + "\n")
    (corpus / "more/b.jsonl").write_text("\n".join(l.replace('"audio/', '"../audio/') for l in lines[3:7]) + "\n")
    details = {}
    more = evaluate_tokenizer(tok, corpus, train_clips=12, test_clips=5,
                              test_manifests=[corpus / "more/a.jsonl", corpus / "more/b.jsonl"], details=details)
    assert more["test_clips"] == 5 and more["probe_source"] == 1.0
    assert details["source"].tolist() == [True] * 5 and len(details["works"]) == 5


def test_semantic_evaluation_command_pairs_each_checkpoint_with_the_last(corpus, tmp_path):
    cfg = load_config(SemanticTokenizerConfig, ROOT / "configs/debug/semantic_tokenizer.yaml",
                      ["backend=logmel", f"train_manifest={corpus / 'train.jsonl'}", "kmeans_clips=12"])
    tok = fit_kmeans(cfg, None)
    tok.save(tmp_path / "a")
    tok.save(tmp_path / "b")   # the same tokenizer twice: a zero difference on the same clips
    proc = run_module("evaluation.semantic", "--corpus", str(corpus), "--checkpoints", str(tmp_path / "a"),
                      str(tmp_path / "b"), "--train-clips", "12", "--out", str(tmp_path / "ev"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = list(json.loads((tmp_path / "ev/results.json").read_text()).values())
    assert res[0]["source_vs_last"] == "+0.0000 [+0.0000, +0.0000]" and "source_vs_last" not in res[1]
    assert "source_vs_last" in (tmp_path / "ev/results.md").read_text()


def test_churn_counts_id_changes_per_second_and_per_onset():
    from evaluation.semantic import churn
    sr, rate = 24000, 25.0
    wav = np.zeros(4 * sr, np.float32)
    for start in range(0, 4 * sr, sr // 2):   # a click every half second: 8 onsets in 4 s
        wav[start:start + 240] = np.hanning(240) * np.sin(np.arange(240) * 0.5)
    held = (torch.arange(100) / 12.5).long()[None]     # a new id at each click after the first: 7 changes
    flicker = torch.arange(100)[None] % 2              # a new id every frame: 99 changes
    waves = torch.from_numpy(wav)[None]
    steady, busy = churn(held, waves, rate, sr), churn(flicker, waves, rate, sr)
    assert steady["changes_per_second"] == 1.75 and busy["changes_per_second"] == 24.75
    assert 0.8 <= steady["changes_per_onset"] <= 1.2 and busy["changes_per_onset"] > 12   # 7-8 onsets found


def test_paired_interval_resamples_works_not_clips():
    a, b = np.array([1, 1, 1, 1, 0, 0]), np.zeros(6, int)
    assert paired_interval(a, a, list("abcdef")) == (0.0, 0.0, 0.0)
    # two works: the bootstrap draws (w1, w1), (w2, w2) or one of each, so the interval spans 0 to 1
    d, lo, hi = paired_interval(a, b, ["w1"] * 4 + ["w2"] * 2)
    assert abs(d - 4 / 6) < 1e-9 and lo == 0.0 and hi == 1.0
    # the same clips as six independent works: a narrower interval
    _, lo6, hi6 = paired_interval(a, b, list("abcdef"))
    assert 0.0 < lo6 and hi6 == 1.0
