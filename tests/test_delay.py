"""The delay-pattern kind, stage roles and the kind registry."""
import numpy as np
import pytest
import torch

from common.config import load_config
from common.errors import UserError
from data.tokenize import TokenCache
from pipeline import GenerationOptions, Pipeline, load_parts
from stages.base import StageConfig, build_stage, load_stage, register_kind, save_stage
from stages.delay import delay, undelay
from stages.sampling import Sampling
from stages.train import batch_at, train
from tests.helpers import ROOT, save_debug_parts
from tests.stage_helpers import make_cache

PARTS = ("mulan", "semantic_tokenizer", "acoustic", "semantic", "coarse", "fine")


def delay_cfg(tmp_path, role="coarse", **kw):
    over = [f"cache={tmp_path / 'cache'}", f"out={tmp_path / role}", f"role={role}"] + [f"{k}={v}" for k, v in kw.items()]
    return load_config(StageConfig, ROOT / "configs/debug/delay.yaml", over)


@pytest.fixture
def cache(tmp_path):
    return TokenCache(make_cache(tmp_path / "cache"))


def test_delay_pattern_layout_and_round_trip():
    codes = torch.arange(1, 13).reshape(1, 3, 4)
    steps = delay(codes, 0)
    assert steps[0].tolist() == [[1, 2, 3, 4, 0, 0], [0, 5, 6, 7, 8, 0], [0, 0, 9, 10, 11, 12]]
    assert torch.equal(undelay(steps), codes)


@pytest.mark.parametrize("role", ["coarse", "fine", "acoustic"])
def test_a_step_never_sees_the_cells_it_predicts(role, tmp_path, cache):
    """Logits of steps <= s do not change when the codes of pattern column s and later change."""
    torch.manual_seed(0)
    stage = build_stage(delay_cfg(tmp_path, role))
    b, _ = batch_at(cache, cache.rows("train"), stage.cfg, 0, 2)
    logits = {}
    stage.model.forward = (lambda f: lambda *a, **k: logits.setdefault(len(logits), f(*a, **k)))(stage.model.forward)
    stage.loss(b, None)
    changed = {k: v.clone() for k, v in b.items()}
    s = 20                                    # change every cell of column >= s (frame t + level k >= s)
    K, T = stage.hi - stage.lo, b["acoustic"].shape[-1]
    cells = torch.arange(T)[None] + torch.arange(K)[:, None] >= s
    part = changed["acoustic"][:, stage.lo:stage.hi]
    changed["acoustic"][:, stage.lo:stage.hi] = torch.where(cells, (part + 1) % 32, part)
    stage.loss(changed, None)
    assert torch.allclose(logits[0][:, : s + 1], logits[1][:, : s + 1], atol=1e-5)
    assert not torch.allclose(logits[0][:, s + 1:], logits[1][:, s + 1:])


@pytest.mark.parametrize("role", ["coarse", "fine", "acoustic"])
def test_kv_cache_equals_recompute_and_prompt_is_kept(role, tmp_path, cache):
    torch.manual_seed(0)
    stage = build_stage(delay_cfg(tmp_path, role))
    stage.model.eval()
    b, _ = batch_at(cache, cache.rows("train"), stage.cfg, 0, 2)
    s = Sampling(temperature=[1.0, 0.7], top_k=10, guidance=2.0)
    outs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(3)
        if role == "fine":
            prompt = torch.full((2, 2, 12), -1)
            prompt[..., :5] = b["acoustic"][:, 2:, :5]
            outs.append(stage.generate(b["acoustic"][:, :2, :12], s, generator=g, use_cache=use_cache, fine_prompt=prompt))
        else:
            prompt = b["acoustic"][:, stage.lo:stage.hi, :4]
            outs.append(stage.generate(b["mulan"], b["semantic"][:, :6], 8, s, prompt=prompt, generator=g,
                                       use_cache=use_cache))
    assert torch.equal(outs[0], outs[1])
    K = stage.hi - stage.lo
    assert tuple(outs[0].shape) == ((2, K, 12) if role == "fine" else (2, K, 8))
    if role == "fine":
        assert torch.equal(outs[0][..., :5], b["acoustic"][:, 2:, :5])
    assert ((outs[0] >= 0) & (outs[0] < 32)).all()


def test_debug_delay_stage_learns_the_semantic_alignment(tmp_path, cache):
    """On the synthetic cache the codes are a function of the semantic id of their frame: a frame-aligned
    stage gets them almost all right after a short training, and gets much worse with another clip's ids."""
    cfg = delay_cfg(tmp_path, "coarse", steps=60, eval_every=60, ckpt_every=60, lr=0.01, warmup=5)
    stage = load_stage(train(cfg), "coarse")
    rows = cache.rows("valid")
    b = cache.window(rows, np.zeros(len(rows), dtype=int), 25, 2)
    with torch.no_grad():
        own = stage.loss(b, None)
        shuffled = stage.loss({**b, "semantic": b["semantic"].roll(1, 0)}, None)
    acc = sum(int(v[1]) for v in own["per_level"].values()) / sum(v[2] for v in own["per_level"].values())
    assert acc > 0.9 and float(shuffled["loss"]) > float(own["loss"]) + 1.0


def test_roles_are_checked_on_load_and_in_config(tmp_path):
    save_stage(build_stage(delay_cfg(tmp_path, "fine")), tmp_path / "f")
    assert load_stage(tmp_path / "f", "fine").role == "fine"
    with pytest.raises(UserError, match="is a fine stage \\(delay\\), not a coarse or acoustic stage"):
        load_stage(tmp_path / "f", ("coarse", "acoustic"))
    with pytest.raises(UserError, match="fills the role coarse or fine or acoustic, not 'semantic'"):
        build_stage(delay_cfg(tmp_path, "semantic"))


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    return save_debug_parts(tmp_path_factory.mktemp("parts"))


def paths(parts, **swap):
    return {k: str(swap.get(k, parts / k)) for k in PARTS}


def test_pipeline_runs_delay_stages_in_every_slot(parts, tmp_path):
    for role in ("coarse", "fine", "acoustic"):
        save_stage(build_stage(delay_cfg(tmp_path, role, acoustic_rate=100)), tmp_path / role)
    mixed = Pipeline(load_parts(paths(parts, coarse=tmp_path / "coarse", fine=tmp_path / "fine")))
    wav = mixed.generate(["calm piano"], 2.2, options=GenerationOptions(seed=1))   # > 2 windows of 1 s
    assert wav.shape == (1, 1, int(2.2 * 24000)) and mixed.last_codes["acoustic"].shape == (1, 4, 220)
    single = Pipeline(load_parts(paths(parts, coarse=tmp_path / "acoustic", fine=tmp_path / "missing")))
    assert single.parts["fine"] is None
    single.generate(["calm piano"], 1.0)
    assert single.last_codes["acoustic"].shape == (1, 4, 100)
    for role in ("coarse", "fine"):                                      # the masked kind, through the same slots
        cfg = load_config(StageConfig, ROOT / "configs/debug/masked.yaml", [f"role={role}", "acoustic_rate=100"])
        save_stage(build_stage(cfg), tmp_path / f"masked_{role}")
    masked = Pipeline(load_parts(paths(parts, coarse=tmp_path / "masked_coarse", fine=tmp_path / "masked_fine")))
    masked.generate(["calm piano"], 1.5, options=GenerationOptions(coarse={"steps": [3, 2]}, fine={"steps": 2}))
    assert masked.last_codes["acoustic"].shape == (1, 4, 152) and (masked.last_codes["acoustic"] >= 0).all()
    ids = torch.randint(0, 16, (1, 30))                                # --semantic-from: the ids are used as given
    mixed.generate(["calm piano"], 5.0, semantic_ids=ids)
    assert torch.equal(mixed.last_codes["semantic"], ids) and mixed.last_codes["acoustic"].shape[-1] == 120


def test_a_new_kind_is_one_file_and_one_registry_line(parts, tmp_path):
    register_kind("toy", "tests.toy_stage:ToyStage")
    cache = TokenCache(make_cache(tmp_path / "cache", acoustic=(4, 32)))
    cfg = load_config(StageConfig, ROOT / "configs/debug/coarse.yaml",
                      ["kind=toy", f"cache={cache.root}", f"out={tmp_path / 'toy'}", "steps=40", "lr=0.3", "warmup=1"])
    model_dir = train(cfg)
    stage = load_stage(model_dir, "coarse")
    assert stage.kind == "toy" and stage.meta["steps"] == 40
    rows = cache.rows("valid")
    b = cache.window(rows, np.zeros(len(rows), dtype=int), 25, 2)
    codes = stage.generate(b["mulan"], b["semantic"], 50)
    assert (codes == b["acoustic"][:, :2]).float().mean() > 0.9      # it learned the synthetic rule
    cfg_d = load_config(StageConfig, ROOT / "configs/debug/coarse.yaml",
                        ["kind=toy", "acoustic_rate=100", "semantic_codebook=16", "acoustic_codebook=32"])
    save_stage(build_stage(cfg_d), tmp_path / "toy_debug")
    pipe = Pipeline(load_parts(paths(parts, coarse=tmp_path / "toy_debug")))
    wav = pipe.generate(["fast drums"], 1.0)
    assert wav.shape == (1, 1, 24000) and pipe.parts["coarse"].kind == "toy"


def test_semantic_context_lets_a_frame_see_the_ids_ahead(tmp_path, cache):
    torch.manual_seed(0)
    b, _ = batch_at(cache, cache.rows("train"), delay_cfg(tmp_path), 0, 2)
    later = {**b, "semantic": b["semantic"].clone()}
    later["semantic"][:, 12:] = (later["semantic"][:, 12:] + 1) % 16       # ids from frame 24 on change
    for context, sees in ((0, False), (2, True)):
        stage = build_stage(delay_cfg(tmp_path, "coarse", semantic_context=context))
        if context:   # it starts at zero (a warm start begins as its parent); give it weights to see through
            torch.nn.init.normal_(stage.model.semantic_conv.weight, std=0.02)
        stage.model.eval()
        seen = []
        stage.model.forward = (lambda f: lambda *a, **k: seen.append(f(*a, **k)) or seen[-1])(stage.model.forward)
        stage.loss(b, None)
        stage.loss(later, None)
        assert torch.allclose(seen[0][:, :22], seen[1][:, :22], atol=1e-5)       # 2+ frames before: unchanged
        assert torch.allclose(seen[0][:, 22:24], seen[1][:, 22:24], atol=1e-5) != sees   # just before: only with context


def test_semantic_onsets_mark_the_frames_where_the_id_changes(tmp_path):
    stage = build_stage(delay_cfg(tmp_path, "coarse", semantic_onsets=True))
    m = stage.model
    ids = torch.tensor([[3, 3, 3, 5, 5, 3, 3]])
    plain = m.semantic(ids)
    assert torch.equal(m.semantic_features(ids), plain)   # starts at zero: a warm start begins as its parent
    torch.nn.init.normal_(m.onsets.weight)
    added = m.semantic_features(ids) - plain
    changed = torch.tensor([False, False, False, True, False, True, False])
    assert torch.allclose(added[0, changed], m.onsets.weight[1].expand(2, -1), atol=1e-6)
    assert torch.allclose(added[0, ~changed], m.onsets.weight[0].expand(5, -1), atol=1e-6)
    assert build_stage(delay_cfg(tmp_path, "coarse")).model.onsets is None


def test_code_dropout_hides_history_in_training_only(tmp_path, cache):
    torch.manual_seed(0)
    stage = build_stage(delay_cfg(tmp_path, "coarse", code_dropout=0.5))
    b, _ = batch_at(cache, cache.rows("train"), stage.cfg, 0, 2)
    stage.model.eval()
    a1, a2 = float(stage.loss(b, None)["loss"]), float(stage.loss(b, None)["loss"])
    stage.model.train()
    t1, t2 = float(stage.loss(b, None)["loss"]), float(stage.loss(b, None)["loss"])
    assert a1 == a2 and t1 != t2
