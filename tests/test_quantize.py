import json

import torch
import torch.nn as nn

from stages.base import build_stage, save_stage
from stages.quantize import Int8Linear, quantize_int8
from stages.sampling import Sampling
from stages.train import batch_at
from tests.helpers import assert_clean_error, run_module
from tests.stage_helpers import make_cache
from tests.test_stages import cfg_for


def test_int8_linear_is_close_for_short_chunks_and_exact_float_for_long_ones():
    torch.manual_seed(0)
    lin = nn.Linear(64, 96)
    q = Int8Linear(lin, max_rows=8)
    assert q.qweight.dtype == torch.int8 and q.qweight.shape == (96, 64)
    x = torch.randn(2, 1, 64)
    with torch.no_grad():
        ref, got = lin(x), q(x)
    err = float((got - ref).norm() / ref.norm())
    assert 0 < err < 0.02, err            # quantized (not the float path), and close
    long = torch.randn(1, 20, 64)
    assert torch.equal(q(long), lin(long))  # 20 rows > max_rows: the float weight
    assert Int8Linear(lin, max_rows=None)(long).dtype == torch.float32


def test_int8_stage_keeps_its_loss_and_generates(tmp_path):
    from data.tokenize import TokenCache
    cache = TokenCache(make_cache(tmp_path / "cache"))
    torch.manual_seed(0)
    stage = build_stage(cfg_for("coarse", tmp_path))
    b, _ = batch_at(cache, cache.rows("train"), stage.cfg, 0, 4)
    tokens, levels, predict = stage.training_sequence(b, torch.zeros(4, dtype=torch.bool))
    stage.model.eval()
    with torch.no_grad():
        before = float(stage.model(tokens, levels, predict)["loss"])
        quantize_int8(stage.model, max_rows=None)
        after = float(stage.model(tokens, levels, predict)["loss"])
    assert sum(isinstance(m, Int8Linear) for m in stage.model.modules()) == 4 * stage.cfg.depth
    assert before != after and abs(after - before) < 0.01 * before
    out = stage.generate(b["mulan"][:1], b["semantic"][:1, :4], 8, Sampling(top_k=10),
                         generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, stage.cfg.coarse_levels, 8)
    assert int(out.min()) >= 0 and int(out.max()) < stage.cfg.acoustic_codebook


def test_quantize_command_reports_float_and_int8_loss(tmp_path):
    cache = make_cache(tmp_path / "cache")
    torch.manual_seed(0)
    stage = build_stage(cfg_for("semantic", tmp_path))
    save_stage(stage, tmp_path / "stage")
    proc = run_module("stages.quantize", "--checkpoint", str(tmp_path / "stage"), "--cache", str(cache),
                      "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert abs(res["int8"]["loss"] - res["float"]["loss"]) < 0.02 * res["float"]["loss"]
    bad = run_module("stages.quantize", "--checkpoint", str(tmp_path / "stage"), "--cache", str(tmp_path / "none"))
    assert_clean_error(bad, "no token cache")
