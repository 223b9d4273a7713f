import json

import numpy as np
import pytest
import torch

from common.checkpoint import load_checkpoint
from common.config import load_config
from common.errors import UserError
from data.tokenize import TokenCache
from stages.base import StageConfig, build_stage, load_stage
from stages.coarse import flatten, unflatten
from stages.sampling import Sampling, top_k_filter, top_p_filter
from stages.train import batch_at, check_cache, train
from tests.helpers import ROOT
from tests.stage_helpers import make_cache

KINDS = ["semantic", "coarse", "fine"]


def cfg_for(kind, tmp_path, **kw) -> StageConfig:
    over = [f"cache={tmp_path / 'cache'}", f"out={tmp_path / kind}"] + [f"{k}={v}" for k, v in kw.items()]
    return load_config(StageConfig, ROOT / f"configs/debug/{kind}.yaml", over)


@pytest.fixture
def cache(tmp_path):
    return TokenCache(make_cache(tmp_path / "cache"))


def test_flatten_round_trip_and_order():
    codes = torch.arange(24).reshape(2, 3, 4)
    flat = flatten(codes)
    assert flat[0, :6].tolist() == [0, 4, 8, 1, 5, 9]  # frame by frame
    assert torch.equal(unflatten(flat, 3), codes)


@pytest.mark.parametrize("kind", KINDS)
def test_layouts_mark_only_the_predicted_part(kind, tmp_path, cache):
    cfg = cfg_for(kind, tmp_path)
    stage = build_stage(cfg)
    b, drop = batch_at(cache, cache.rows("train"), cfg, 0, 4)
    drop = torch.tensor([True, False, False, False])
    tokens, levels, predict = stage.training_sequence(b, drop)
    sizes = stage.model.shape.level_sizes
    assert tokens.shape[1] == len(levels) == len(predict)
    assert all(int(t) < sizes[int(l)] for t, l in zip(tokens[1], levels))
    if kind == "semantic":
        assert predict.tolist() == [False] * 3 + [True] * 25
        assert tokens[0, :3].tolist() == [8, 8, 8] and tokens[1, :3].tolist() == b["mulan"][1].tolist()
    elif kind == "coarse":
        assert predict.sum() == 50 * 2 and not predict[: 3 + 25].any()
        assert torch.equal(unflatten(tokens[:, 28:], 2), b["acoustic"][:, :2])
    else:
        assert levels[:8].tolist() == [0, 1, 2, 3, 0, 1, 2, 3] and predict[:4].tolist() == [False, False, True, True]
        assert torch.equal(unflatten(tokens, 4), b["acoustic"])


def test_fine_stage_never_sees_later_coarse_frames(tmp_path, cache):
    stage = build_stage(cfg_for("fine", tmp_path))
    b, _ = batch_at(cache, cache.rows("train"), stage.cfg, 0, 2)
    tokens, levels, _ = stage.training_sequence(b, None)
    h = stage.model.hidden(tokens, levels)
    t = 10  # change every coarse code after frame t
    changed = tokens.clone()
    later = (torch.arange(len(levels)) >= 4 * (t + 1)) & (levels < 2)
    changed[:, later] = (changed[:, later] + 1) % 32
    h2 = stage.model.hidden(changed, levels)
    upto = 4 * (t + 1)
    assert torch.allclose(h[:, :upto], h2[:, :upto], atol=1e-6)
    assert not torch.allclose(h[:, upto:], h2[:, upto:])


@pytest.mark.parametrize("kind,threshold", [("semantic", 0.3), ("coarse", 0.5), ("fine", 0.5)])
def test_debug_stage_overfits_one_batch(kind, threshold, tmp_path, cache):
    torch.manual_seed(0)
    stage = build_stage(cfg_for(kind, tmp_path))
    b, drop = batch_at(cache, cache.rows("train"), stage.cfg, 0, 4)
    tokens, levels, predict = stage.training_sequence(b, torch.zeros(4, dtype=torch.bool))
    opt = torch.optim.AdamW(stage.model.parameters(), lr=3e-3)
    first = None
    for _ in range(120):
        loss = stage.model(tokens, levels, predict)["loss"]
        first = first or loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < threshold < first


@pytest.mark.parametrize("kind", KINDS)
def test_kv_cache_generation_equals_full_recompute(kind, tmp_path, cache):
    torch.manual_seed(0)
    stage = build_stage(cfg_for(kind, tmp_path))
    stage.model.eval()
    b, _ = batch_at(cache, cache.rows("train"), stage.cfg, 0, 2)
    s = Sampling(temperature=1.0, top_k=10, guidance=1.0 if kind == "fine" else 2.0)
    outs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(3)
        if kind == "semantic":
            outs.append(stage.generate(b["mulan"], 12, s, generator=g, use_cache=use_cache))
        elif kind == "coarse":
            outs.append(stage.generate(b["mulan"], b["semantic"][:, :4], 8, s, generator=g, use_cache=use_cache))
        else:
            outs.append(stage.generate(b["acoustic"][:, :2, :6], s, generator=g, use_cache=use_cache))
    assert torch.equal(outs[0], outs[1])
    expected = {"semantic": (2, 12), "coarse": (2, 2, 8), "fine": (2, 2, 6)}[kind]
    assert tuple(outs[0].shape) == expected


def test_guidance_changes_the_distribution(tmp_path, cache):
    torch.manual_seed(0)
    stage = build_stage(cfg_for("semantic", tmp_path))
    m = cache.window(cache.rows("train")[:1], np.array([0]), 4, 2)["mulan"]
    a = stage.generate(m, 20, Sampling(temperature=0), generator=torch.Generator().manual_seed(0))
    c = stage.generate(m, 20, Sampling(temperature=0, guidance=5.0), generator=torch.Generator().manual_seed(0))
    assert a.shape == c.shape and not torch.equal(a, c)


def test_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(top_k_filter(logits, 2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(top_p_filter(logits, 0.75)).tolist() == [[False, False, True, True]]
    assert torch.isinf(top_p_filter(logits, 0.5)).tolist() == [[False, True, True, True]]
    assert not torch.isinf(top_p_filter(logits, 1.0)).any()


def test_resume_continues_exactly(tmp_path, cache):
    cfg = cfg_for("coarse", tmp_path, steps=12, ckpt_every=6, eval_every=100, dropout=0.1)
    train(cfg)
    straight = load_checkpoint(tmp_path / "coarse" / "last").state_dict
    cfg2 = cfg_for("coarse", tmp_path, steps=12, ckpt_every=6, eval_every=100, dropout=0.1, out=tmp_path / "b")
    train(cfg2, stop_after=5)  # "killed" after step 5, between checkpoints
    assert not (tmp_path / "b" / "model").exists()
    train(cfg2, resume=True)
    resumed = load_checkpoint(tmp_path / "b" / "last").state_dict
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    stage = load_stage(tmp_path / "b" / "model")
    assert stage.kind == "coarse" and stage.meta["steps"] == 12
    assert stage.cfg.semantic_tokens == "5e3a"   # the cache's semantic tokenizer, recorded for the pipeline
    log = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert any("valid" in r and "acc/coarse0" in r["valid"] for r in log)


def test_cache_that_does_not_fit_is_refused(tmp_path, cache):
    with pytest.raises(UserError, match="semantic codebook 1024 \\(config\\) vs 16 \\(cache\\)"):
        check_cache(cfg_for("semantic", tmp_path, semantic_codebook=1024), cache)
    with pytest.raises(UserError, match="coarse_levels \\+ fine_levels = 6"):
        check_cache(cfg_for("fine", tmp_path, fine_levels=4), cache)
    with pytest.raises(UserError, match="semantic tokenizer 0bad \\(config\\) vs 5e3a \\(cache\\)"):
        check_cache(cfg_for("coarse", tmp_path, semantic_tokens="0bad"), cache)


def test_training_conditions_text_mix_and_level_dropout(tmp_path):
    from stages.train import condition_draws, training_condition
    cache = TokenCache(make_cache(tmp_path / "cache", text=True))
    rows = cache.rows("train")
    cfg = cfg_for("semantic", tmp_path, cond_source="text")
    b, _ = batch_at(cache, rows, cfg, 3, 8)
    assert b["mulan"].shape == (8, 3)
    # text: the level-0 token equals the audio one by construction, the others come from the captions
    audio_b, _ = batch_at(cache, rows, cfg_for("semantic", tmp_path), 3, 8)
    assert torch.equal(b["mulan"][:, 0], audio_b["mulan"][:, 0]) and not torch.equal(b["mulan"], audio_b["mulan"])
    g = torch.Generator().manual_seed(0)
    mix = cfg_for("semantic", tmp_path, cond_source="mix", cond_text_prob=0.5, cond_level_dropout=1.0)
    use_text, which, keep, cut, no_melody, no_attribute, no_onsets = condition_draws(mix, g, 400)
    assert 0.4 < no_melody.float().mean() < 0.6   # melody dropout 0.5 by default
    assert no_attribute.shape == (400, 2) and 0.4 < no_attribute.float().mean() < 0.6   # each attribute on its own
    assert 0.4 < use_text.float().mean() < 0.6 and cut.all() and set(keep.tolist()) == {1, 2}
    m = training_condition({"mulan": torch.zeros(400, 3, dtype=torch.long),
                            "mulan_text": torch.ones(400, 2, 3, dtype=torch.long)}, mix, use_text, which, keep, cut)
    assert torch.equal(m[:, 0], use_text.long())                  # text rows carry text tokens
    assert (m[:, 2] == 8).all() and torch.equal(m[:, 1] == 8, keep == 1)   # levels from k on are null
    with pytest.raises(UserError, match="needs text tokens"):
        check_cache(cfg_for("semantic", tmp_path, cond_source="text"), TokenCache(make_cache(tmp_path / "c2")))


def test_conditioning_signal_of_a_stage_that_reads_its_condition(tmp_path):
    from evaluation.conditioning import signal
    cache = TokenCache(make_cache(tmp_path / "cache", text=True))
    cfg = cfg_for("semantic", tmp_path, steps=100, eval_every=100, ckpt_every=100, lr=0.01, warmup=5,
                  cond_source="mix", window_seconds=0.5)
    stage = load_stage(train(cfg))
    log = [json.loads(l) for l in (tmp_path / "semantic" / "metrics.jsonl").read_text().splitlines()]
    valid = [r["valid"] for r in log if "valid" in r][-1]
    assert {"cond/audio", "cond/other", "cond/null", "cond/text", "cond/text_new"} <= set(valid)
    res = signal(stage, cache, np.arange(24), 0.12, batch=12)   # (the measure, on the clips it learned)
    # 3 ids: the first is uniform, the step to the second is set by the first MuLan token (worth up to ln 3 / 3
    # nats per id), the third follows: the audio and the text condition (same first token) carry it
    assert res["null-audio"] > 0.1 and res["null-text"] > 0.1 and res["null-other"] < res["null-audio"]
    # generated ids, probed: label each clip by its cycle step; prompts ask for a step through the first token
    from evaluation.conditioning import generated_probe

    class Words:   # a stand-in MuLan: "step N" -> a first token that sets step N + 1
        def embed_text(self, texts):
            return torch.tensor([int(t.split()[1]) for t in texts])

        def tokens(self, x):
            return torch.stack([x, torch.zeros_like(x), torch.zeros_like(x)], 1)
    # (a bag of ids tells step 2, which visits half of the 16 ids, from steps 1 and 3, which visit all)
    labels = [{"instrument_label": str(int(m) % 3 == 1)} for m in cache.arrays["mulan"][:, 0]]
    prompts = [{"caption": f"step {n}", "instrument_label": str(n % 3 == 1)} for n in range(8)] * 2
    probe = generated_probe(stage, Words(), cache, labels, prompts, seconds=1.0)
    assert probe["instrument"]["prompts"] == 16 and probe["instrument"]["generated"] > 0.8
    assert "real_held_out" in probe["instrument"] and "tempo_band" not in probe
    three = generated_probe(stage, Words(), cache, labels, prompts, seconds=1.0, samples=3)   # seeds 0, 1, 2
    each = three["instrument"]["per_sample"]
    assert three["samples"] == 3 and len(each) == 3 and each[0] == probe["instrument"]["generated"]
    assert three["instrument"]["generated"] == pytest.approx(np.mean(each), abs=1e-4)
    from stages.sampling import Sampling   # the sweep records its setting; guidance 0 samples the prompt-blind model
    blind = generated_probe(stage, Words(), cache, labels, prompts, seconds=1.0, sampling=Sampling(guidance=0.0))
    assert (blind["guidance"], blind["temperature"]) == (0.0, 1.0)
    assert blind["instrument"]["generated"] < probe["instrument"]["generated"] - 0.15
    from tests.helpers import assert_clean_error, run_module
    # --trained-clips: the same measures on clips the stage trained on, beside the held-out ones
    proc = run_module("evaluation.conditioning", "--stage", f"semantic={tmp_path / 'semantic' / 'model'}", "--cache",
                      str(cache.root), "--clips", "6", "--trained-clips", "--out", str(tmp_path / "c.json"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads((tmp_path / "c.json").read_text())["semantic"]
    assert got["trained_on"]["clips"] == 6 and got["trained_on"]["first_second"]["null-audio"] > 0
    assert set(got["trained_on"]["window"]) == set(got["window"])
    assert_clean_error(run_module("evaluation.conditioning", "--stage", "semantic=x", "--cache", "y",
                                  "--guidance", "-1"), "--guidance")
    assert_clean_error(run_module("evaluation.conditioning", "--stage", "semantic=x", "--cache", "y",
                                  "--samples", "0"), "--samples")
