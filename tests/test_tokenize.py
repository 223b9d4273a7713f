import json

import pytest
import soundfile as sf
import torch

from audio_tokenizers.acoustic import AcousticConfig, build_codec
from audio_tokenizers.semantic import load_semantic
from common.checkpoint import save_checkpoint
from common.config import config_to_dict, load_config
from common.errors import UserError
from audio_tokenizers.tokenize import tokenize
from data.tokenize import TokenCache
from tests.helpers import ROOT, assert_clean_error, run_module, run_modules, save_debug_tokenizers, sine


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Debug tokenizers saved as checkpoints, and a manifest of four tones."""
    d = tmp_path_factory.mktemp("tok")
    save_debug_tokenizers(d, "semantic")
    rows = []
    for i, f in enumerate([220, 330, 440, 550]):
        sf.write(d / f"{i}.wav", sine(f, 1.5 if i else 0.7, 24000), 24000)
        rows.append(json.dumps({"audio": f"{i}.wav", "caption": f"tone {f}", "split": "valid" if i == 3 else "train"}))
    (d / "m.jsonl").write_text("\n".join(rows) + "\n")
    (d / "bad.wav").write_bytes(b"junk")
    (d / "with_bad.jsonl").write_text(json.dumps({"audio": "bad.wav"}) + "\n" + rows[0] + "\n")
    return d


def paths(d):
    return {"acoustic": str(d / "acoustic"), "semantic": str(d / "semantic"), "mulan": str(d / "mulan")}


def test_cache_arrays_index_and_append(parts, tmp_path):
    n = tokenize([parts / "m.jsonl"], tmp_path / "cache", paths(parts), seconds=1.0)
    cache = TokenCache(tmp_path / "cache")
    assert n == 4 and cache.arrays["acoustic"].shape == (4, 4, 100)  # debug codec: 100 Hz, 4 levels
    assert cache.arrays["semantic"].shape == (4, 25) and cache.arrays["mulan"].shape == (4, 3)
    assert cache.index["acoustic"]["codebook"] == 32 and cache.index["mulan"]["levels"] == 3
    assert cache.index["semantic"]["fingerprint"] == load_semantic(parts / "semantic").fingerprint
    assert list(cache.rows("valid")) == [3] and len(cache.rows("train")) == 3
    assert int(cache.arrays["acoustic"].max()) < 32 and int(cache.arrays["mulan"].max()) < 8
    tokenize([parts / "with_bad.jsonl"], tmp_path / "cache", paths(parts), seconds=1.0)  # same tokenizers: appends
    assert TokenCache(tmp_path / "cache").arrays["semantic"].shape == (5, 25)


def test_cache_refuses_other_tokenizers(parts, tmp_path):
    tokenize([parts / "m.jsonl"], tmp_path / "cache", paths(parts), seconds=1.0)
    other = dict(paths(parts), acoustic=str(tmp_path / "acoustic2"))
    acfg = load_config(AcousticConfig, ROOT / "configs/debug/acoustic.yaml")
    torch.manual_seed(1)
    save_checkpoint(tmp_path / "acoustic2", "acoustic_spectral", config_to_dict(acfg), build_codec(acfg).state_dict())
    with pytest.raises(UserError, match="made by other tokenizers"):
        tokenize([parts / "m.jsonl"], tmp_path / "cache", other, seconds=1.0)
    assert TokenCache(tmp_path / "cache").arrays["semantic"].shape[0] == 4  # untouched


def test_editing_a_models_card_keeps_the_caches_made_with_it(parts, tmp_path):
    """A card (*.md) is not part of a checkpoint's identity; a cache that recorded the hash over all files (as
    caches made before cards were left out did) is still accepted while the card is unedited."""
    import shutil

    from data.tokenize import checkpoint_hash
    for name in ("acoustic", "semantic", "mulan"):
        shutil.copytree(parts / name, tmp_path / name)
        (tmp_path / name / "CARD.md").write_text("first card\n")
    tokenize([parts / "m.jsonl"], tmp_path / "cache", paths(tmp_path), seconds=1.0)
    index_file = tmp_path / "cache/index.json"
    index = json.loads(index_file.read_text())
    index["tokenizer_hashes"] = {k: checkpoint_hash(tmp_path / k, docs=True) for k in index["tokenizer_hashes"]}
    index["text_tokens_by"] = index["tokenizer_hashes"]["mulan"]
    index_file.write_text(json.dumps(index))            # as an old cache recorded them
    tokenize([parts / "m.jsonl"], tmp_path / "cache", paths(tmp_path), seconds=1.0)
    before = checkpoint_hash(tmp_path / "mulan")
    for name in ("acoustic", "semantic", "mulan"):
        (tmp_path / name / "CARD.md").write_text("the card, edited\n")
    assert checkpoint_hash(tmp_path / "mulan") == before != checkpoint_hash(tmp_path / "mulan", docs=True)
    fresh = tmp_path / "cache2"
    tokenize([parts / "m.jsonl"], fresh, paths(tmp_path), seconds=1.0)
    (tmp_path / "mulan" / "CARD.md").write_text("edited again\n")
    tokenize([parts / "m.jsonl"], fresh, paths(tmp_path), seconds=1.0)
    assert TokenCache(fresh).arrays["mulan"].shape[0] == 8 and TokenCache(tmp_path / "cache").arrays["mulan"].shape[0] == 8


def test_append_accepts_a_mulan_retrained_on_the_locked_audio_tower(parts, tmp_path):
    import shutil

    from data.tokenize import checkpoint_hash
    tokenize([parts / "m.jsonl"], tmp_path / "cache", paths(parts), seconds=1.0)
    made_by = TokenCache(tmp_path / "cache").index["tokenizer_hashes"]
    for name, locked in (("lit", checkpoint_hash(parts / "mulan")), ("other", "0123456789abcdef")):
        shutil.copytree(parts / "mulan", tmp_path / name)   # stands in for a LiT run: it names the MuLan it locked
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        cfg["config"]["locked_audio_hash"] = locked
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
    lit = dict(paths(parts), mulan=str(tmp_path / "lit"))
    # its caption tokens would be another vocabulary than the cache's: refused until all are re-made with it
    with pytest.raises(UserError, match="caption tokens were made by the text tower"):
        tokenize([parts / "m.jsonl"], tmp_path / "cache", lit, seconds=1.0)
    assert TokenCache(tmp_path / "cache").arrays["mulan"].shape[0] == 4          # nothing half-written
    from audio_tokenizers.tokenize import add_text_tokens
    add_text_tokens([parts / "m.jsonl"], tmp_path / "cache", lit["mulan"], 3)
    with pytest.raises(UserError, match="append with --rephrasings 3"):
        tokenize([parts / "m.jsonl"], tmp_path / "cache", lit, seconds=1.0)
    assert TokenCache(tmp_path / "cache").index["text_tokens_by"] == checkpoint_hash(tmp_path / "lit")
    tokenize([parts / "m.jsonl"], tmp_path / "cache", lit, seconds=1.0, rephrasings=3)
    cache = TokenCache(tmp_path / "cache")
    assert cache.arrays["mulan"].shape[0] == 8 and cache.index["tokenizer_hashes"] == made_by
    assert (cache.arrays["mulan"][:4] == cache.arrays["mulan"][4:]).all()   # the same audio tokens
    with pytest.raises(UserError, match="made by other tokenizers"):
        tokenize([parts / "m.jsonl"], tmp_path / "cache", dict(paths(parts), mulan=str(tmp_path / "other")), seconds=1.0)


def test_command_line(parts, tmp_path):
    p = paths(parts)
    tokenizers = ["--acoustic", p["acoustic"], "--semantic", p["semantic"], "--mulan", p["mulan"]]
    proc, missing = run_modules(
        ["data.tokenize", "--manifest", str(parts / "m.jsonl"), "--out", str(tmp_path / "c"), *tokenizers, "--seconds", "1"],
        ["data.tokenize", "--manifest", str(parts / "none.jsonl"), "--out", str(tmp_path / "d"), *tokenizers])
    assert proc.returncode == 0 and "cached 4 clips" in proc.stdout, proc.stderr[-2000:]
    assert_clean_error(missing, "not found")


def test_text_tokens_of_captions_and_rephrasings(parts, tmp_path):
    from audio_tokenizers.mulan import load_conditioner
    tokenize([parts / "m.jsonl"], tmp_path / "cache", paths(parts), seconds=1.0, rephrasings=3)
    cache = TokenCache(tmp_path / "cache")
    text = cache.arrays["mulan_text"]
    assert text.shape == (4, 3, 3)
    mulan = load_conditioner(parts / "mulan")
    own = mulan.tokens(mulan.embed_text(["tone 220", "tone 330", "tone 440", "tone 550"])).numpy()
    assert (text[:, 0] == own).all()              # the first caption of a clip is its own
    assert "mulan_text" in cache.window(cache.rows("train"), [0, 0, 0], 5, 4)
    # --text-only rewrites them for an existing cache, refusing another MuLan's
    (tmp_path / "cache" / "mulan_text.npy").unlink()
    p = paths(parts)
    proc = run_module("data.tokenize", "--text-only", "--manifest", str(parts / "m.jsonl"), "--out",
                      str(tmp_path / "cache"), "--mulan", p["mulan"], "--rephrasings", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert TokenCache(tmp_path / "cache").arrays["mulan_text"].shape == (4, 2, 3)
    assert_clean_error(run_module("data.tokenize", "--text-only", "--manifest", str(parts / "m.jsonl"), "--out",
                                  str(tmp_path / "cache"), "--mulan", p["acoustic"]), "another MuLan")


@pytest.mark.parametrize("damage", ["index", "missing", "short"])
def test_a_damaged_cache_is_named_not_a_traceback(damage, parts, tmp_path):
    from tests.stage_helpers import damage_cache
    tokenize([parts / "m.jsonl"], tmp_path / "c", paths(parts), seconds=1.0)
    damage_cache(tmp_path / "c", damage)
    with pytest.raises(UserError, match="damaged"):
        TokenCache(tmp_path / "c")


def test_cache_is_swapped_in_whole(parts, tmp_path, monkeypatch):
    """A crash while the new arrays are written leaves the old cache as it was, and no temporary folder is
    taken for the cache."""
    import numpy as np

    import data.tokenize as tk
    tokenize([parts / "m.jsonl"], tmp_path / "c", paths(parts), seconds=1.0)
    before = {f.name: f.read_bytes() for f in (tmp_path / "c").iterdir()}
    calls = []

    def crash_on_second(path, array):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return np.lib.format.write_array(open(path, "wb"), array)
    monkeypatch.setattr(tk.np, "save", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        tokenize([parts / "m.jsonl"], tmp_path / "c", paths(parts), seconds=1.0)   # an append that dies midway
    monkeypatch.undo()
    assert {f.name: f.read_bytes() for f in (tmp_path / "c").iterdir()} == before
    assert TokenCache(tmp_path / "c").arrays["semantic"].shape[0] == 4
