"""mulan_vectors: the semantic stage embeds MuLan tokens by their RVQ code vectors (one learned linear map)."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.checkpoint import save_checkpoint
from common.config import load_config
from common.errors import UserError
from data.tokenize import TokenCache, checkpoint_hash
from stages.base import StageConfig, load_stage
from stages.train import train
from tests.helpers import ROOT
from tests.stage_helpers import make_cache

LEVELS, CODES = 3, 9


def fake_mulan(path, seed: int = 0):
    """A 'MuLan' checkpoint holding only RVQ codebooks: on level 0, code c points along axis c % 3 (the
    make_cache rule: the first MuLan token's residue mod 3 sets the step of the semantic cycle)."""
    g = torch.Generator().manual_seed(seed)
    books = {f"rvq.levels.{q}.codebook": 0.1 * torch.randn(CODES, 4, generator=g) for q in range(LEVELS)}
    books["rvq.levels.0.codebook"][:, :3] += torch.eye(3)[torch.arange(CODES) % 3]
    save_checkpoint(path, "mulan", {}, books)
    return path


def cache_with_unseen_codes(root, mulan_path):
    """Train rows use first-level codes 0-5 only, valid rows 6-8: conditions no training row had."""
    make_cache(root, clips=48, mulan=(LEVELS, CODES))
    index = json.loads((root / "index.json").read_text())
    m = np.load(root / "mulan.npy").astype(np.int64)
    valid = np.array([c["split"] == "valid" for c in index["clips"]])
    m[:, 0] = np.where(valid, 6 + m[:, 0] % 3, m[:, 0] % 6)     # same residue, so the same semantic rule
    np.save(root / "mulan.npy", m.astype(np.int16))
    index["tokenizer_hashes"]["mulan"] = checkpoint_hash(mulan_path)
    (root / "index.json").write_text(json.dumps(index))
    return TokenCache(root)


def second_token_loss(stage, cache) -> float:
    """Loss on each valid row's second semantic id: only the condition says how far the cycle steps."""
    rows = cache.rows("valid")
    b = cache.window(rows, np.zeros(len(rows), dtype=int), 25, 2)
    tokens, levels, _ = stage.training_sequence(b, torch.zeros(len(rows), dtype=torch.bool))
    with torch.no_grad():
        h = stage.model.hidden(tokens[:, :-1], levels[:-1])
        logits = stage.model.logits(h[:, LEVELS], stage.semantic_level)
    return float(F.cross_entropy(logits, b["semantic"][:, 1]))


def config(cache, out, *extra):
    over = [f"cache={cache.root}", f"out={out}", f"mulan_levels={LEVELS}", f"mulan_codebook={CODES}", "steps=120",
            "eval_every=120", "ckpt_every=120", "lr=0.01", "warmup=5", "cond_dropout=0.0", *extra]
    return load_config(StageConfig, ROOT / "configs/debug/semantic.yaml", over)


def test_code_vectors_carry_a_condition_no_training_row_had(tmp_path):
    mulan = fake_mulan(tmp_path / "mulan")
    cache = cache_with_unseen_codes(tmp_path / "cache", mulan)
    vec = load_stage(train(config(cache, tmp_path / "vec", f"mulan_vectors={mulan}")), "semantic")
    rows = load_stage(train(config(cache, tmp_path / "rows")), "semantic")
    assert vec.cfg.mulan_vector_dim == 4 and rows.cfg.mulan_vector_dim == 0
    assert torch.allclose(vec.model.cond_vectors[0, :CODES].float(), fake_books(mulan)[0], atol=1e-3)
    assert (vec.model.cond_vectors[:, CODES] == 0).all()                   # the null id has no vector
    with_vectors, with_rows = second_token_loss(vec, cache), second_token_loss(rows, cache)
    assert with_vectors + 0.3 < with_rows, (with_vectors, with_rows)
    assert vec.generate(torch.full((2, LEVELS), 7), 5).shape == (2, 5)


def fake_books(mulan) -> torch.Tensor:
    from common.checkpoint import load_checkpoint
    state = load_checkpoint(mulan, kind="mulan").state_dict
    return torch.stack([state[f"rvq.levels.{q}.codebook"].float() for q in range(LEVELS)])


def test_mulan_vectors_errors_name_the_fix(tmp_path):
    mulan = fake_mulan(tmp_path / "mulan")
    cache = cache_with_unseen_codes(tmp_path / "cache", mulan)
    with pytest.raises(UserError, match="no MuLan checkpoint there"):
        train(config(cache, tmp_path / "a", f"mulan_vectors={tmp_path / 'nowhere'}"))
    other = fake_mulan(tmp_path / "other", seed=1)
    with pytest.raises(UserError, match="is not the MuLan that made"):
        train(config(cache, tmp_path / "b", f"mulan_vectors={other}"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_delay_stage_reads_mulan_tokens_through_code_vectors(tmp_path):
    mulan = fake_mulan(tmp_path / "mulan")
    cache = cache_with_unseen_codes(tmp_path / "cache", mulan)
    over = [f"cache={cache.root}", f"mulan_levels={LEVELS}", f"mulan_codebook={CODES}", "steps=4", "eval_every=4",
            "ckpt_every=4", f"mulan_vectors={mulan}"]
    cfg = load_config(StageConfig, ROOT / "configs/debug/delay.yaml", [*over, "role=coarse", f"out={tmp_path / 'c'}"])
    stage = load_stage(train(cfg), "coarse")
    model = stage.model
    assert stage.cfg.mulan_vector_dim == 4 and torch.allclose(model.cond_vectors[:, :CODES].float(), fake_books(mulan),
                                                               atol=1e-3)
    # a token is its vector: two codes with the same vector embed alike, a learned row per code would not
    model.cond_vectors[0, 8] = model.cond_vectors[0, 2]
    e = model.embed_prefix(torch.tensor([[2, 0, 0], [8, 0, 0], [1, 0, 0]]))
    assert torch.allclose(e[0], e[1]) and not torch.allclose(e[0], e[2])
    with pytest.raises(UserError, match="mulan_vectors"):   # the fine stage reads no MuLan tokens
        train(load_config(StageConfig, ROOT / "configs/debug/delay.yaml", [*over, "role=fine", f"out={tmp_path / 'f'}"]))
    assert not (tmp_path / "f").exists()
