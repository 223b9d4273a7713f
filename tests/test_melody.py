"""Melody ids, the semantic stage's melody input, and --melody."""
import json

import numpy as np
import soundfile as sf
import torch

from audio_tokenizers.melody import NONE, SILENT, chroma_similarity, melody_ids
from common.config import load_config
from data.tokenize import TokenCache
from stages.base import StageConfig, build_stage, load_stage, save_stage
from stages.sampling import Sampling
from stages.train import train
from tests.helpers import ROOT, save_debug_parts, sine
from tests.stage_helpers import make_cache

SR = 24000


def test_melody_ids_name_the_pitch_class_and_silence():
    tune = np.concatenate([sine(440.0, 1.0, SR), sine(523.25, 1.0, SR), np.zeros(SR, np.float32)])
    ids = melody_ids(torch.from_numpy(tune)[None, None], SR, 25.0)[0]
    assert ids.shape == (75,)
    assert (ids[2:23] == 9).all() and (ids[27:48] == 0).all() and (ids[55:] == SILENT).all()   # A, C, silence
    a = torch.from_numpy(tune)[None, None]
    assert float(chroma_similarity(a, 0.3 * a, SR)) > 0.99
    assert float(chroma_similarity(a[..., :2 * SR], torch.from_numpy(sine(370.0, 2.0, SR))[None, None], SR)) < 0.3


def test_semantic_stage_follows_a_melody(tmp_path):
    cache = TokenCache(make_cache(tmp_path / "cache", melody=True))
    over = [f"cache={cache.root}", f"out={tmp_path / 's'}", "steps=120", "eval_every=120", "ckpt_every=120", "lr=0.01",
            "warmup=5", "melody_input=true", "melody_dropout=0.3"]
    stage = load_stage(train(load_config(StageConfig, ROOT / "configs/debug/semantic.yaml", over)))
    rows = cache.rows("valid")
    b = cache.window(rows, np.zeros(len(rows), dtype=int), 25, 2)
    shifted = (b["melody"] + 5) % 12                                     # a tune these clips never had
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    led = stage.generate(b["mulan"], 25, Sampling(temperature=0.5), generator=g(), melody=shifted)
    free = stage.generate(b["mulan"], 25, Sampling(temperature=0.5), generator=g())
    follows = lambda ids: float((ids % 12 == shifted).float().mean())  # noqa: E731
    assert follows(led) > follows(free) + 0.2, (follows(led), follows(free))
    valid = [json.loads(l)["valid"] for l in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines() if '"valid"' in l]
    assert valid[-1]["loss/with_melody"] < valid[-1]["loss"] - 0.1, valid[-1]   # held-out loss without / with the tune
    none = stage.side_positions(None, None, 2, 3, 4)
    assert none.shape == (2, 7) and (none == NONE).all()


def test_melody_on_the_command_line(tmp_path, monkeypatch, capsys):
    from tests.test_pipeline import cli, stage_args
    parts = save_debug_parts(tmp_path / "parts")
    sf.write(tmp_path / "tune.wav", sine(440.0, 1.0, SR), SR)
    code, _, err = cli(monkeypatch, capsys, "--text", "calm", "--duration", "1", "--melody", tmp_path / "tune.wav",
                       "--out", tmp_path / "a.wav", "--quiet", *stage_args(parts))
    assert code == 2 and "--melody needs a semantic stage trained with melody_input=true" in err
    cfg = load_config(StageConfig, ROOT / "configs/debug/semantic.yaml", ["melody_input=true"])
    save_stage(build_stage(cfg), tmp_path / "sem_melody")
    code, _, err = cli(monkeypatch, capsys, "--text", "calm", "--duration", "1.5", "--melody", tmp_path / "tune.wav",
                       "--out", tmp_path / "b.wav", "--quiet", *stage_args(parts, semantic=tmp_path / "sem_melody"))
    assert code == 0, err
    assert sf.read(tmp_path / "b.wav")[0].shape == (36000,)


def test_melody_evaluation_reports_both_runs(tmp_path, monkeypatch):
    import json
    import sys
    parts = save_debug_parts(tmp_path / "parts")
    cfg = load_config(StageConfig, ROOT / "configs/debug/semantic.yaml", ["melody_input=true"])
    save_stage(build_stage(cfg), parts / "semantic")
    rows = []
    for i, (f, label) in enumerate([(440.0, "flute"), (330.0, "violin"), (262.0, "flute"), (392.0, "violin")]):
        sf.write(tmp_path / f"{i}.wav", sine(f, 2.0, SR), SR)
        rows.append({"audio": f"{i}.wav", "caption": f"a {label} at {f} hertz", "instrument_label": label,
                     "source": "essen_folk"})
    for name in ("test", "train"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    from evaluation.melody import main
    stages = [x for n in ("mulan", "semantic_tokenizer", "acoustic", "semantic", "coarse", "fine")
              for x in ("--stage", f"{n}={parts / n}")]
    monkeypatch.setattr(sys, "argv", ["m", "--manifest", str(tmp_path / "test.jsonl"), "--clips", "4", "--seconds", "1.5",
                                      "--out", str(tmp_path / "m.json"), *stages])
    main()
    res = json.loads((tmp_path / "m.json").read_text())
    for run in ("with_melody", "without_melody"):
        assert 0 <= res[run]["chroma_similarity"] <= 1 and 0 <= res[run]["instrument_acc"] <= 1
    assert res["codec_roundtrip_chroma_similarity"] > res["other_clip_chroma_similarity"]
    for k, d in res["with_minus_without"].items():   # paired difference of the two runs, with its interval
        assert abs(d["mean"] - (res["with_melody"][k] - res["without_melody"][k])) < 1e-3, k
        assert d["ci95"][0] <= d["mean"] + 1e-4 and d["mean"] <= d["ci95"][1] + 1e-4, (k, d)


def test_paired_interval_brackets_the_mean_and_excludes_zero_only_for_a_clear_shift():
    from evaluation.metrics import paired_interval
    rng = np.random.default_rng(1)
    clear, noise = paired_interval(0.5 + 0.1 * rng.standard_normal(40)), paired_interval(rng.standard_normal(40))
    assert clear["ci95"][0] > 0.4 and clear["ci95"][1] < 0.6
    assert noise["ci95"][0] < 0 < noise["ci95"][1]
