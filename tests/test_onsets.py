"""Onset levels (data/onsets.py): what they read from audio, the metronome, and a delay stage that takes them."""
import json

import numpy as np
import pytest
import torch

from common.config import load_config
from common.errors import ConfigError, UserError
from data import onsets
from data.tokenize import TokenCache
from pipeline import GenerationOptions, Pipeline, load_parts
from stages.base import StageConfig, build_stage, save_stage
from stages.sampling import Sampling
from stages.train import batch_at, train
from tests.helpers import ROOT, assert_clean_error, run_module, save_debug_parts
from tests.stage_helpers import make_cache

PARTS = ("mulan", "semantic_tokenizer", "acoustic", "semantic", "coarse", "fine")


def clicks(times: list[float], seconds: float = 2.0, sr: int = 24000) -> torch.Tensor:
    """A click (5 ms of noise) at each time over silence -> [1, N]."""
    x, g = torch.zeros(1, int(seconds * sr)), torch.Generator().manual_seed(0)
    for t in times:
        a = int(t * sr)
        x[0, a:a + 120] = torch.randn(120, generator=g) * 0.5
    return x


def delay_cfg(tmp_path, role="coarse", **kw):
    over = [f"cache={tmp_path / 'cache'}", f"out={tmp_path / role}", f"role={role}"] + [f"{k}={v}" for k, v in kw.items()]
    return load_config(StageConfig, ROOT / "configs/debug/delay.yaml", over)


def test_onset_levels_peak_where_the_clicks_are():
    times = [0.3, 0.8, 1.3]
    lv = onsets.onset_levels(clicks(times), 24000, 50.0, 120)
    assert lv.shape == (1, 120) and lv.dtype == torch.long
    top = set(torch.nonzero(lv[0] == 3).ravel().tolist())
    # each click is a top-level frame and nothing else is (the flux of frame t rises into frame t + 1: it leads the
    # click by a frame or two, the same in training and at inference)
    assert all(any(abs(f - round(t * 50)) <= 2 for f in top) for t in times)
    assert all(any(abs(f - round(t * 50)) <= 2 for t in times) for f in top)
    assert (lv[0, 100:] == 0).all()                                              # past the audio: no onset
    assert (onsets.onset_levels(torch.zeros(1, 48000), 24000, 50.0, 100) == 0).all()   # silence: none


def test_the_metronome_clicks_on_each_stated_beat_and_carries_the_phase():
    bpm = torch.tensor([[120.0] * 100, [0.0] * 100, [100.0] * 50 + [150.0] * 50])
    m = onsets.metronome(bpm, 50.0)
    assert torch.nonzero(m[0]).ravel().tolist() == [0, 25, 50, 75] and set(m[0].tolist()) == {0, 3}
    assert (m[1] == onsets.NOT_GIVEN).all()                                      # no tempo stated: not given
    beats = torch.nonzero(m[2] == 3).ravel().tolist()
    assert beats[:2] == [0, 30] and np.diff(beats[-3:]).tolist() == [20, 20]      # 30 frames a beat, then 20
    assert onsets.fit(torch.tensor([[1, 2]]), 4).tolist() == [[1, 2, onsets.NOT_GIVEN, onsets.NOT_GIVEN]]


def test_a_delay_stage_reads_onsets_only_where_asked(tmp_path):
    stage = build_stage(delay_cfg(tmp_path, onset_input=True))
    m, ids = stage.model, torch.tensor([[3, 3, 5, 5, 7, 7]])
    levels = torch.tensor([[3, 0, 0, 1, 2, 0]])
    plain = m.semantic(ids)
    assert torch.equal(m.semantic_features(ids, onsets=levels), plain)   # starts at zero: a warm start is its parent
    torch.nn.init.normal_(m.onset_in.weight)
    added = m.semantic_features(ids, onsets=levels) - plain
    assert torch.allclose(added[0], m.onset_in.weight[levels[0]], atol=1e-6)
    none = m.semantic_features(ids) - plain                              # none given: the NOT_GIVEN row everywhere
    assert torch.allclose(none[0], m.onset_in.weight[onsets.NOT_GIVEN].expand(6, -1), atol=1e-6)
    short = m.semantic_features(ids, onsets=levels[:, :4]) - plain       # a short stream: NOT_GIVEN after its end
    assert torch.allclose(short[0, 4:], m.onset_in.weight[onsets.NOT_GIVEN].expand(2, -1), atol=1e-6)
    assert build_stage(delay_cfg(tmp_path)).model.onset_in is None
    with pytest.raises(ConfigError, match="onset_input"):
        build_stage(delay_cfg(tmp_path, "fine", onset_input=True))
    masked = load_config(StageConfig, ROOT / "configs/debug/masked.yaml", ["onset_input=true"])
    with pytest.raises(ConfigError, match="onset_input"):
        build_stage(masked)


def test_training_reads_the_cache_onsets_and_drops_some_rows(tmp_path):
    root = make_cache(tmp_path / "cache")
    with pytest.raises(UserError, match="--onsets-only"):
        train(delay_cfg(tmp_path, onset_input=True, steps=2))
    assert not (tmp_path / "coarse").exists()
    levels = np.random.default_rng(0).integers(0, 4, (24, 100)).astype(np.int8)
    np.save(root / "onsets.npy", levels)
    cache = TokenCache(root)
    cfg = delay_cfg(tmp_path, onset_input=True, onset_dropout=0.5, batch_size=64)
    b, _ = batch_at(cache, cache.rows("train"), cfg, 0, 64)
    b_eval, _ = batch_at(cache, cache.rows("train"), cfg, 0, 64, train=False)
    dropped = (b["onsets"] == onsets.NOT_GIVEN).all(1)
    assert 0.25 < dropped.float().mean() < 0.75                              # about half the rows go without
    assert torch.equal(b["onsets"][~dropped], b_eval["onsets"][~dropped])    # the rest keep their own
    assert not (b_eval["onsets"] == onsets.NOT_GIVEN).any()                  # held-out batches keep them all
    stage = build_stage(cfg)
    torch.nn.init.normal_(stage.model.onset_in.weight)
    with torch.no_grad():
        with_own = float(stage.loss(b_eval, None)["loss"])
        assert with_own != float(stage.loss({**b_eval, "onsets": b_eval["onsets"].roll(1, 0)}, None)["loss"])
    out = train(delay_cfg(tmp_path, onset_input=True, steps=3, eval_every=3, ckpt_every=3))
    assert (out / "config.json").is_file()


def test_onsets_only_adds_each_clips_levels_from_its_audio(tmp_path):
    import soundfile as sf
    root = make_cache(tmp_path / "cache", clips=2)
    index = json.loads((root / "index.json").read_text())
    for i, c in enumerate(index["clips"]):
        c["audio"] = str(tmp_path / f"{i}.wav")
        sf.write(c["audio"], clicks([0.5 + 0.25 * i])[0].numpy(), 24000)
    (root / "index.json").write_text(json.dumps(index))
    proc = run_module("data.tokenize", "--onsets-only", "--out", str(root))
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = TokenCache(root).arrays["onsets"]
    assert got.shape == (2, 100) and got.dtype == np.int8
    assert all(abs(int(np.argmax(row)) - f) <= 2 for row, f in zip(got, (25, 37.5)))


def test_the_pipeline_gives_the_stage_a_metronome_or_a_rhythm(tmp_path, monkeypatch):
    parts = save_debug_parts(tmp_path / "parts")
    save_stage(build_stage(delay_cfg(tmp_path, acoustic_rate=100, onset_input=True)), tmp_path / "onset_coarse")
    paths = {k: str(parts / k) for k in PARTS}
    plain = Pipeline(load_parts(paths))
    with pytest.raises(UserError, match="onset_input"):
        plain.generate(["a jig"], 1.0, rhythm=clicks([0.5]).view(1, 1, -1))
    pipe = Pipeline(load_parts({**paths, "coarse": str(tmp_path / "onset_coarse")}))
    seen = []
    real = pipe.parts["coarse"].generate
    monkeypatch.setattr(pipe.parts["coarse"], "generate", lambda *a, **k: seen.append(k["onsets"]) or real(*a, **k))
    pipe.generate(["a jig at 120 bpm", "a jig"], 1.0, options=GenerationOptions(seed=0))
    got = torch.cat(seen, 1)
    assert torch.nonzero(got[0] == 3).ravel().tolist() == [0, 50]            # 120 bpm at 100 frames a second
    assert (got[1] == onsets.NOT_GIVEN).all()                                # no bpm stated: not given
    seen.clear()
    pipe.generate(["a jig at 120 bpm"], 1.0, options=GenerationOptions(seed=0, metronome=False))
    assert (torch.cat(seen, 1) == onsets.NOT_GIVEN).all()
    seen.clear()
    pipe.generate(["a jig at 120 bpm"], 1.0, rhythm=clicks([0.3], seconds=0.6).view(1, 1, -1))
    got = torch.cat(seen, 1)[0]
    assert abs(int(torch.argmax(got[:60])) - 30) <= 3 and (got[60:] == onsets.NOT_GIVEN).all()   # 30 ms early at most


def test_rhythm_on_the_command_line_needs_a_stage_that_reads_onsets(tmp_path):
    import soundfile as sf
    parts = save_debug_parts(tmp_path / "parts")
    sf.write(tmp_path / "beat.wav", clicks([0.2, 0.7])[0].numpy(), 24000)
    args = [a for k in PARTS for a in ("--stage", f"{k}={parts / k}")]
    proc = run_module("pipeline", "--text", "a jig", "--duration", "1", "--out", str(tmp_path / "a.wav"),
                      "--rhythm", str(tmp_path / "beat.wav"), "--quiet", *args)
    assert_clean_error(proc, "--rhythm needs a coarse stage trained with onset_input")
    assert not (tmp_path / "a.wav").exists()
