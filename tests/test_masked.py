"""The masked (MAGNeT) kind: span masks, re-masking, restricted context, decoding."""
import numpy as np
import pytest
import torch

from common.config import load_config
from data.tokenize import TokenCache
from stages.base import StageConfig, build_stage, load_stage
from stages.masked import attention_mask, remask, span_mask
from stages.sampling import Sampling
from stages.train import batch_at, train
from tests.helpers import ROOT
from tests.stage_helpers import make_cache


def masked_cfg(tmp_path, role="coarse", **kw):
    over = [f"cache={tmp_path / 'cache'}", f"out={tmp_path / role}", f"role={role}"] + [f"{k}={v}" for k, v in kw.items()]
    return load_config(StageConfig, ROOT / "configs/debug/masked.yaml", over)


@pytest.fixture
def cache(tmp_path):
    return TokenCache(make_cache(tmp_path / "cache"))


def test_span_masks_reach_the_rate_in_whole_spans():
    g = torch.Generator().manual_seed(0)
    m = span_mask(400, 200, torch.full((400,), 0.5), 3, g)
    assert 0.45 < m.float().mean() < 0.55
    # every masked run is at least a span long, except one clipped at the end of its row
    runs = [len(r) for row in m[:, :-3].int().numpy() for r in "".join(map(str, row)).split("0")[:-1] if r]
    assert runs and min(runs) >= 3
    assert span_mask(2, 50, torch.tensor([0.0, 1.0]), 3, g).sum(1).tolist()[0] >= 3   # at least one span


def test_remask_keeps_the_most_confident_spans_of_this_step():
    level = torch.arange(12)[None].clone()
    sampled = torch.tensor([[False] * 3 + [True] * 9])    # the first span was known before this step
    conf = torch.tensor([[2.0] * 3 + [0.9, 0.1, 0.1, 0.2, 0.2, 0.3, 0.05, 0.05, 0.05]])
    out = remask(level, sampled, conf, sampled, 2 / 3, 3)
    assert out[0].tolist() == [0, 1, 2, 3, 4, 5, -1, -1, -1, -1, -1, -1]   # spans (max 0.9) kept; 0.3 and 0.05 back


def test_restricted_context_for_levels_above_the_first(tmp_path, cache):
    torch.manual_seed(0)
    stage = build_stage(masked_cfg(tmp_path, "coarse", context_window=2))
    stage.model.eval()
    b, _ = batch_at(cache, cache.rows("train"), stage.cfg, 0, 2)
    codes = b["acoustic"][:, :2]
    masked = torch.zeros(2, 50, dtype=torch.bool)
    far = codes.clone()
    far[:, 0, 40:] = (far[:, 0, 40:] + 1) % 32           # change level-0 codes far from frame 10
    sem = b["semantic"].repeat_interleave(2, 1)
    out = {}
    for k in (0, 1):
        for name, c in (("a", codes), ("b", far)):
            out[k, name] = stage.model(b["mulan"], stage.inputs(c, k, masked), sem, None, stage.level_mask(k, 50))
    assert torch.allclose(out[1, "a"][:, :30], out[1, "b"][:, :30], atol=1e-5)   # level 1 sees +-2 frames only
    assert not torch.allclose(out[0, "a"][:, :30], out[0, "b"][:, :30])          # level 0 sees everything
    assert attention_mask(3, 5, 0) is None and attention_mask(3, 5, 1)[3:, :3].all()


def test_debug_masked_stage_learns_and_decodes(tmp_path, cache):
    cfg = masked_cfg(tmp_path, "coarse", steps=80, eval_every=80, ckpt_every=80, lr=0.01, warmup=5, cond_dropout=0.0)
    stage = load_stage(train(cfg), "coarse")
    rows = cache.rows("valid")
    b = cache.window(rows, np.zeros(len(rows), dtype=int), 25, 2)
    with torch.no_grad():
        out = stage.loss(b, None)
    acc = sum(int(v[1]) for v in out["per_level"].values()) / sum(v[2] for v in out["per_level"].values())
    assert set(out["per_level"]) == {0, 1} and acc > 0.8
    s = Sampling(temperature=1.0, top_p=0.9, guidance=2.0, guidance_end=1.0, steps=[6, 3])
    gen = [stage.generate(b["mulan"], b["semantic"], 50, s, generator=torch.Generator().manual_seed(1)) for _ in range(2)]
    assert torch.equal(gen[0], gen[1]) and gen[0].shape == (len(rows), 2, 50) and (gen[0] >= 0).all()
    assert (gen[0] == b["acoustic"][:, :2]).float().mean() > 0.7    # it renders the semantic ids it is given
    prompt = b["acoustic"][:, :2, :10]
    cont = stage.generate(b["mulan"], b["semantic"], 40, s, prompt=prompt, generator=torch.Generator().manual_seed(1))
    assert cont.shape == (len(rows), 2, 40)


def test_fine_role_keeps_known_cells(tmp_path, cache):
    torch.manual_seed(0)
    stage = build_stage(masked_cfg(tmp_path, "fine"))
    stage.model.eval()
    b, _ = batch_at(cache, cache.rows("train"), stage.cfg, 0, 2)
    known = torch.full((2, 2, 16), -1)
    known[..., :5] = b["acoustic"][:, 2:, :5]
    known[:, 1, 8] = 7
    out = stage.generate(b["acoustic"][:, :2, :16], Sampling(steps=3), fine_prompt=known,
                         generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[..., :5], b["acoustic"][:, 2:, :5]) and (out[:, 1, 8] == 7).all() and (out >= 0).all()


def test_rescoring_and_hybrid_with_an_autoregressive_helper(tmp_path, cache):
    from stages.base import save_stage
    torch.manual_seed(0)
    masked = build_stage(masked_cfg(tmp_path, "coarse"))
    masked.model.eval()
    delay_cfg = load_config(StageConfig, ROOT / "configs/debug/delay.yaml", [f"cache={tmp_path / 'cache'}"])
    save_stage(build_stage(delay_cfg), tmp_path / "ar")
    b, _ = batch_at(cache, cache.rows("train"), masked.cfg, 0, 2)
    base = dict(temperature=1.0, steps=[3, 2], ar_stage=str(tmp_path / "ar"))
    one = masked.generate(b["mulan"], b["semantic"], 50, Sampling(**base), generator=torch.Generator().manual_seed(1))
    best = masked.generate(b["mulan"], b["semantic"], 50, Sampling(**base, candidates=3, rescore_weight=0.5),
                           generator=torch.Generator().manual_seed(1))
    assert one.shape == best.shape == (2, 2, 50) and (best >= 0).all()
    from stages.masked import helper_stage
    ar = helper_stage(str(tmp_path / "ar"), "coarse")
    ll = ar.score(b["mulan"], b["semantic"], b["acoustic"][:, :2])
    assert ll.shape == (2,) and (ll < 0).all() and (ll > -4).all()           # ~ -ln(32) for an untrained stage
    hybrid = masked.generate(b["mulan"], b["semantic"], 50, Sampling(**base, hybrid_seconds=0.4),
                             generator=torch.Generator().manual_seed(1))
    head = ar.generate(b["mulan"], b["semantic"], 20, Sampling(**ar.sampling_defaults(), guidance=1.0),
                       generator=torch.Generator().manual_seed(1))
    assert hybrid.shape == (2, 2, 50) and torch.equal(hybrid[..., :20], head)   # the first 0.4 s: the AR stage's
    with pytest.raises(Exception, match="need ar_stage"):
        masked.generate(b["mulan"], b["semantic"], 10, Sampling(hybrid_seconds=1.0))
