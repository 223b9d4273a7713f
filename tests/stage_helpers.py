"""A small synthetic token cache with learnable structure, for stage tests."""
import json
from pathlib import Path

import numpy as np


def make_cache(root: Path, clips: int = 24, seconds: float = 2.0, mulan=(3, 8), semantic_k=16, acoustic=(4, 32),
               text: bool = False, melody: bool = False):
    """With `text`, also mulan_text.npy: 2 "captions" per clip whose tokens equal the audio tokens on the first
    level and are 0 or 1 on the others (a text condition that carries what matters, worded two ways).
    With `melody`, melody.npy: each semantic id's residue mod 12 (a tune the ids follow)."""
    rng = np.random.default_rng(0)
    ts = int(seconds * 25)
    m = rng.integers(0, mulan[1], (clips, mulan[0]))
    # semantic: a cycle whose step is set by the first MuLan token; acoustic: a function of semantic
    start = rng.integers(0, semantic_k, clips)
    sem = (start[:, None] + np.arange(ts)[None] * (1 + m[:, :1] % 3)) % semantic_k
    ac = np.stack([(np.repeat(sem, 2, axis=1) * (q + 1) + q) % acoustic[1] for q in range(acoustic[0])], 1)
    root.mkdir(parents=True, exist_ok=True)
    np.save(root / "mulan.npy", m.astype(np.int16))
    np.save(root / "semantic.npy", sem.astype(np.int16))
    np.save(root / "acoustic.npy", ac.astype(np.int16))
    if melody:
        np.save(root / "melody.npy", (sem % 12).astype(np.int16))
    if text:
        t = np.zeros((clips, 2, mulan[0]), dtype=np.int64)
        t[:, 1, 1:] = 1
        t[:, :, 0] = m[:, None, 0]
        np.save(root / "mulan_text.npy", t.astype(np.int16))
    splits = ["valid" if i % 6 == 0 else "train" for i in range(clips)]
    index = {"format_version": 1, "seconds": seconds, "tokenizer_hashes": {"acoustic": "a", "semantic": "s", "mulan": "m"},
             "acoustic": {"levels": acoustic[0], "codebook": acoustic[1], "frame_rate": 50.0, "sample_rate": 24000},
             "semantic": {"codebook": semantic_k, "frame_rate": 25.0, "fingerprint": "5e3a"}, "mulan": {"levels": mulan[0], "codebook": mulan[1]},
             "clips": [{"audio": f"{i}.wav", "caption": "", "split": s} for i, s in enumerate(splits)]}
    (root / "index.json").write_text(json.dumps(index))
    return root


def delay_config(tmp_path: Path, out: str, *extra: str, make=make_cache):
    """A debug delay-stage config for 6 steps on the cache at tmp_path/cache (built by `make` the first time)."""
    from common.config import load_config
    from stages.base import StageConfig
    from tests.helpers import ROOT
    cache = tmp_path / "cache"
    if not cache.exists():
        make(cache)
    over = [f"cache={cache}", f"out={tmp_path / out}", "steps=6", "eval_every=6", "ckpt_every=6", *extra]
    return load_config(StageConfig, ROOT / "configs/debug/delay.yaml", over)


def damage_cache(root: Path, damage: str) -> None:
    """Break a token cache one of three ways: "index" (not JSON), "missing" (an array gone), "short" (an array
    with fewer rows than the index has clips)."""
    if damage == "index":
        (root / "index.json").write_text("{not json")
    elif damage == "missing":
        (root / "semantic.npy").unlink()
    else:
        np.save(root / "acoustic.npy", np.load(root / "acoustic.npy")[:2])
