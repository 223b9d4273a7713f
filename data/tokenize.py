"""The token cache: every tokenizer run once over a manifest; stages train only from it. This file reads and
writes caches; running the tokenizers is audio_tokenizers/tokenize.py (the command below).

    python -m data.tokenize --manifest corpus/train.jsonl --manifest corpus/valid.jsonl --out cache/corpus \
        [--acoustic PATH] [--semantic PATH] [--mulan PATH] [--seconds 10]

Writes memory-mappable arrays (one row per clip, cropped or padded to `--seconds`):
`acoustic.npy` [N, Q, T_a], `semantic.npy` [N, T_s], `mulan.npy` [N, Q_m] (MuLan tokens of the
clip's audio), `mulan_text.npy` [N, R, Q_m] (MuLan tokens of R captions of the clip: its own
caption first, then R - 1 re-phrasings from its metadata by data.captions.describe), `melody.npy`
[N, T_s] (the dominant pitch class per semantic frame, audio_tokenizers/melody.py) (int16) and
`index.json` (clips with their split, the shapes, vocabularies and frame rates, and a hash of
each tokenizer checkpoint). Appending to an existing cache is allowed only with the very
same tokenizers: a cache never mixes tokens from different ones.

    python -m data.tokenize --text-only --manifest ... --out cache/corpus [--mulan PATH] [--rephrasings 8]

adds (or replaces) `mulan_text.npy` of an existing cache, with the MuLan that made its audio tokens;
`--melody-only` likewise adds `melody.npy` (from the clips' audio), and `--attributes-only` (with the manifests)
`attributes.npy` [N, 2]: each clip's tempo in bpm and key index from its metadata (data/attributes.py; 0 and
-1 where a row has none), and `--onsets-only` `onsets.npy` [N, T_a] (int8): each acoustic frame's onset level
(data/onsets.py), from the clips' audio.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError, run_cli

ARRAYS = ("acoustic", "semantic", "mulan")
OPTIONAL = ("mulan_text", "melody", "attributes", "onsets")   # caches made before these existed lack them
BATCH = 8
REPHRASINGS = 8


def checkpoint_hash(path: str | Path, docs: bool = False) -> str:
    """sha256 over a checkpoint folder's files (or a single file), first 16 hex digits. Its cards and notes (*.md)
    are left out unless `docs`: editing a card must not make every cache built with the model look foreign."""
    path, h = Path(path), hashlib.sha256()
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if f.is_file() and not f.name.startswith(".") and (docs or f.suffix != ".md" or not path.is_dir()):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def checkpoint_hashes(path: str | Path) -> set[str]:
    """The hashes a cache may have recorded for this checkpoint: the current one and, for caches made before cards
    were left out, the hash over all its files (valid while its card is unedited)."""
    return {checkpoint_hash(path), checkpoint_hash(path, docs=True)}


def mulan_audio_hashes(path: str | Path) -> set[str]:
    """The hashes that identify the audio tokens a MuLan checkpoint makes: its own, and for a MuLan whose text tower
    was retrained against a locked audio tower (audio_tokenizers/mulan_lit.py) the hashes of the MuLans it locked."""
    cfg_file = Path(path) / "config.json"
    locked = json.loads(cfg_file.read_text()).get("config", {}).get("locked_audio_hash") if cfg_file.is_file() else None
    return checkpoint_hashes(path) | set(filter(None, (locked or "").split(",")))


class TokenCache:
    """Read side: memory-mapped arrays and the index."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        remake = f"make it again with `python -m data.tokenize --out {self.root} ...`"
        if not (self.root / "index.json").is_file():
            raise UserError(f"no token cache at {self.root}; make one with `python -m data.tokenize`")
        try:
            self.index = json.loads((self.root / "index.json").read_text())
            n = len(self.index["clips"])
            names = list(ARRAYS) + [k for k in OPTIONAL if (self.root / f"{k}.npy").is_file()]
            self.arrays = {k: np.load(self.root / f"{k}.npy", mmap_mode="r") for k in names}
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise UserError(f"the token cache {self.root} is damaged ({type(e).__name__}: {str(e)[:80]}); {remake}") from None
        short = [f"{k} has {len(a)}" for k, a in self.arrays.items() if len(a) != n]
        if short:
            raise UserError(f"the token cache {self.root} is damaged: its index lists {n} clips but "
                            f"{', '.join(short)} rows; {remake}")
        splits = np.array([c["split"] for c in self.index["clips"]])
        self.split_rows = {s: np.flatnonzero(splits == s) for s in ("train", "valid", "test")}

    def rows(self, split: str) -> np.ndarray:
        return self.split_rows[split]

    def window(self, rows: np.ndarray, start_s: np.ndarray, semantic_frames: int, ratio: int) -> dict[str, torch.Tensor]:
        """Token windows of `semantic_frames` semantic frames (and `ratio` x as many acoustic frames)."""
        sem = np.stack([self.arrays["semantic"][r, s: s + semantic_frames] for r, s in zip(rows, start_s)])
        ac = np.stack([self.arrays["acoustic"][r, :, s * ratio: (s + semantic_frames) * ratio]
                       for r, s in zip(rows, start_s)])
        out = {"semantic": torch.from_numpy(sem.astype(np.int64)), "acoustic": torch.from_numpy(ac.astype(np.int64)),
               "mulan": torch.from_numpy(self.arrays["mulan"][rows].astype(np.int64))}
        if "mulan_text" in self.arrays:
            out["mulan_text"] = torch.from_numpy(self.arrays["mulan_text"][rows].astype(np.int64))
        if "melody" in self.arrays:
            out["melody"] = torch.from_numpy(np.stack([self.arrays["melody"][r, s: s + semantic_frames]
                                                       for r, s in zip(rows, start_s)]).astype(np.int64))
        if "attributes" in self.arrays:
            out["attributes"] = torch.from_numpy(self.arrays["attributes"][rows].astype(np.int64))
        if "onsets" in self.arrays:
            out["onsets"] = torch.from_numpy(np.stack([self.arrays["onsets"][r, s * ratio: (s + semantic_frames) * ratio]
                                                       for r, s in zip(rows, start_s)]).astype(np.int64))
        return out


@torch.no_grad()
def text_tokens(mulan, rows: list[dict], rephrasings: int) -> np.ndarray:
    """MuLan tokens of each row's caption and of `rephrasings - 1` re-phrasings from its metadata
    -> [N, R, Q_m] int16. Re-phrasing r of clip i is drawn from default_rng([i, r]), so it is reproducible."""
    from data.captions import describe, has_metadata
    texts = []
    for i, row in enumerate(rows):
        has_meta = has_metadata(row)
        texts += [row.get("caption", "")] + [describe(row, np.random.default_rng([i, r])) if has_meta
                                             else row.get("caption", "") for r in range(1, rephrasings)]
    tokens = [mulan.tokens(mulan.embed_text(texts[i:i + 256])) for i in range(0, len(texts), 256)]
    return torch.cat(tokens).numpy().astype(np.int16).reshape(len(rows), rephrasings, -1)


def describe(acoustic, semantic, mulan) -> dict:
    return {"acoustic": {"levels": acoustic.num_quantizers, "codebook": acoustic.codebook_size,
                         "frame_rate": acoustic.frame_rate, "sample_rate": acoustic.sample_rate},
            "semantic": {"codebook": semantic.codebook_size, "frame_rate": semantic.frame_rate,
                         "fingerprint": semantic.fingerprint},
            "mulan": {"levels": mulan.num_tokens, "codebook": mulan.codebook_size}}


@torch.no_grad()
def write_cache(out: Path, arrays: dict[str, np.ndarray], index: dict | None = None) -> None:
    """Write a whole cache (these arrays, the index, and the files of `out` not replaced) into a temporary folder
    beside `out`, then swap it into place: a crash leaves the old cache or the new one, never a mix."""
    import os
    import shutil

    from common.checkpoint import remove_stale
    remove_stale(out.parent, f".{out.name}.")   # what a killed write left behind
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if out.is_dir():
        shutil.copytree(out, tmp, ignore=shutil.ignore_patterns(*[f"{k}.npy" for k in arrays], "index.json"))
    tmp.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        np.save(tmp / f"{name}.npy", array)
    (tmp / "index.json").write_text(json.dumps(index, indent=1) if index is not None else (out / "index.json").read_text())
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


if __name__ == "__main__":   # the command runs the tokenizers, which live above this package
    from audio_tokenizers.tokenize import main
    run_cli(main)
