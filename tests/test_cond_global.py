"""cond_global (the pooled MuLan condition summed into every frame of a frame-aligned stage) and init (a warm
start from another checkpoint's weights)."""
import numpy as np
import pytest
import torch

from common.checkpoint import load_checkpoint
from common.config import load_config
from common.errors import UserError
from data.tokenize import TokenCache
from stages.base import StageConfig, load_stage
from stages.delay import DelayStage, frame_rate_ids
from stages.sampling import Sampling, cfg_mix
from stages.train import check_init, train, warm_start
from tests.helpers import ROOT
from tests.stage_helpers import delay_config, make_cache


def test_warm_start_begins_as_the_old_model_and_the_global_path_reaches_every_frame(tmp_path):
    plain = load_stage(train(delay_config(tmp_path, "plain")), "coarse")
    cfg = delay_config(tmp_path, "global", "cond_global=true", f"init={tmp_path / 'plain/model'}")
    stage = DelayStage(cfg)
    warm_start(stage.model, check_init(cfg), cfg.init)
    stage.model.eval()
    cache = TokenCache(tmp_path / "cache")
    b = cache.window(cache.rows("valid")[:2], np.zeros(2, dtype=int), 25, 2)
    with torch.no_grad():
        # the new linear map starts at zero: the warm-started model computes exactly what the old one did
        assert torch.allclose(stage.loss(b, None)["loss"], plain.loss(b, None)["loss"], atol=1e-5)
        torch.nn.init.normal_(stage.model.cond_global.weight)
        cond = b["mulan"][:1]
        other = (cond + 1) % 8
        g = stage.model.semantic_features(None, torch.cat([cond, other]))
    assert g.shape == (2, 1, 32) and not torch.allclose(g[0], g[1])


def test_decoding_with_guidance_agrees_with_the_teacher_forced_model(tmp_path):
    stage = load_stage(train(delay_config(tmp_path, "g", "cond_global=true", "cond_dropout=0.3")), "coarse")
    torch.nn.init.normal_(stage.model.cond_global.weight, std=0.5)   # make the global path matter
    mulan = torch.tensor([[1, 2, 3], [5, 0, 7]])
    semantic = torch.randint(0, 16, (2, 10))
    s = Sampling(top_k=1, guidance=3.0)
    codes = stage.generate(mulan, semantic, 20, s)
    # replay: the model run on the codes it made, conditional and null rows mixed, picks those same codes
    target, inputs = stage.teacher_forced(codes)
    sem = frame_rate_ids(semantic, 2, 20)
    sem = torch.cat([sem, sem[:, -1:]], 1)
    with torch.no_grad():
        cond = stage.model(mulan, inputs, sem)
        null = stage.model(stage.cond(mulan, torch.ones(2, dtype=torch.bool)), inputs, sem)
    picked = cfg_mix(cond, null, 3.0).argmax(-1).permute(0, 2, 1)
    valid = target != stage.model.empty
    assert (picked[valid] == target[valid]).all()


def test_cond_global_and_init_errors_name_the_fix(tmp_path):
    with pytest.raises(UserError, match="cond_global is an option"):
        train(delay_config(tmp_path, "f", "role=fine", "cond_global=true"))
    with pytest.raises(UserError, match="no checkpoint there"):
        train(delay_config(tmp_path, "a", f"init={tmp_path / 'nowhere'}"))
    fine = train(delay_config(tmp_path, "fine", "role=fine"))
    with pytest.raises(UserError, match="same kind and role"):
        train(delay_config(tmp_path, "b", f"init={fine}"))
    coarse = train(delay_config(tmp_path, "coarse"))
    with pytest.raises(UserError, match="does not fit"):
        train(delay_config(tmp_path, "c", f"init={coarse}", "dim=64"))
    for out in "fabc":
        assert not (tmp_path / out).exists()
    assert load_checkpoint(coarse).config["kind"] == "delay"


def test_init_takes_a_semantic_stage_whose_config_leaves_the_role_implied(tmp_path):
    """configs/semantic.yaml says role: '' (the kind's only role); its checkpoint records 'semantic'."""
    make_cache(tmp_path / "cache")
    over = [f"cache={tmp_path / 'cache'}", "steps=4", "eval_every=4", "ckpt_every=4"]
    sem = lambda out, *extra: load_config(StageConfig, ROOT / "configs/debug/semantic.yaml",  # noqa: E731
                                          over + [f"out={tmp_path / out}", *extra])
    first = train(sem("a"))
    assert load_checkpoint(first).config["role"] == "semantic" and sem("b").role == ""
    assert check_init(sem("b", f"init={first}")) is not None
    warm = load_stage(train(sem("b", f"init={first}")), "semantic")
    assert warm.cfg.init == str(first)
