"""The token cache: every tokenizer run once over a manifest; stages train only from it.

    python -m data.tokenize --manifest corpus/train.jsonl --manifest corpus/valid.jsonl --out cache/corpus \
        [--acoustic PATH] [--semantic PATH] [--mulan PATH] [--seconds 10]

Writes memory-mappable arrays (one row per clip, cropped or padded to `--seconds`):
`acoustic.npy` [N, Q, T_a], `semantic.npy` [N, T_s], `mulan.npy` [N, Q_m] (int16) and
`index.json` (clips with their split, the shapes, vocabularies and frame rates, and a hash of
each tokenizer checkpoint). Appending to an existing cache is allowed only with the very
same tokenizers: a cache never mixes tokens from different ones.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.errors import UserError, run_cli
from data.audio import crop_or_pad
from data.manifest import SkipCounter, iter_audio, read_manifest

ARRAYS = ("acoustic", "semantic", "mulan")
BATCH = 8


def checkpoint_hash(path: str | Path) -> str:
    """sha256 over a checkpoint folder's files (or a single file), first 16 hex digits."""
    path, h = Path(path), hashlib.sha256()
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if f.is_file() and not f.name.startswith("."):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


class TokenCache:
    """Read side: memory-mapped arrays and the index."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not (self.root / "index.json").is_file():
            raise UserError(f"no token cache at {self.root}; make one with `python -m data.tokenize`")
        self.index = json.loads((self.root / "index.json").read_text())
        self.arrays = {k: np.load(self.root / f"{k}.npy", mmap_mode="r") for k in ARRAYS}
        splits = np.array([c["split"] for c in self.index["clips"]])
        self.split_rows = {s: np.flatnonzero(splits == s) for s in ("train", "valid", "test")}

    def rows(self, split: str) -> np.ndarray:
        return self.split_rows[split]

    def window(self, rows: np.ndarray, start_s: np.ndarray, semantic_frames: int, ratio: int) -> dict[str, torch.Tensor]:
        """Token windows of `semantic_frames` semantic frames (and `ratio` x as many acoustic frames)."""
        sem = np.stack([self.arrays["semantic"][r, s: s + semantic_frames] for r, s in zip(rows, start_s)])
        ac = np.stack([self.arrays["acoustic"][r, :, s * ratio: (s + semantic_frames) * ratio]
                       for r, s in zip(rows, start_s)])
        return {"semantic": torch.from_numpy(sem.astype(np.int64)), "acoustic": torch.from_numpy(ac.astype(np.int64)),
                "mulan": torch.from_numpy(self.arrays["mulan"][rows].astype(np.int64))}


def describe(acoustic, semantic, mulan) -> dict:
    return {"acoustic": {"levels": acoustic.num_quantizers, "codebook": acoustic.codebook_size,
                         "frame_rate": acoustic.frame_rate, "sample_rate": acoustic.sample_rate},
            "semantic": {"codebook": semantic.codebook_size, "frame_rate": semantic.frame_rate,
                         "fingerprint": semantic.fingerprint},
            "mulan": {"levels": mulan.num_tokens, "codebook": mulan.codebook_size}}


@torch.no_grad()
def tokenize(manifests: list[Path], out: Path, paths: dict[str, str | None], seconds: float) -> int:
    from audio_tokenizers.acoustic import load_acoustic
    from audio_tokenizers.mulan import load_conditioner
    from audio_tokenizers.semantic import load_semantic
    acoustic, semantic, mulan = load_acoustic(paths["acoustic"]), load_semantic(paths["semantic"]), \
        load_conditioner(paths["mulan"])
    hashes = {k: checkpoint_hash(p) for k, p in (("acoustic", paths["acoustic"] or "pretrained/acoustic"),
                                                 ("semantic", paths["semantic"] or "pretrained/semantic_tokenizer"),
                                                 ("mulan", paths["mulan"] or "pretrained/mulan"))}
    old = None
    if (out / "index.json").is_file():
        old = json.loads((out / "index.json").read_text())
        if old["tokenizer_hashes"] != hashes:
            raise UserError(f"{out} was made by other tokenizers ({old['tokenizer_hashes']} vs {hashes}); "
                            "use a new --out folder")
    n = int(seconds * acoustic.sample_rate)
    skips, clips, arrays = SkipCounter(), [], {k: [] for k in ARRAYS}

    def encode(batch: list[np.ndarray]) -> None:   # batches of clips: fewer, larger matrix products
        x = torch.from_numpy(np.stack(batch))[:, None]
        arrays["acoustic"].extend(acoustic.encode(x).numpy().astype(np.int16))
        arrays["semantic"].extend(semantic.encode(x).numpy().astype(np.int16))
        arrays["mulan"].extend(mulan.tokens(mulan.embed_audio(x)).numpy().astype(np.int16))
        batch.clear()

    for manifest in manifests:
        rows, batch = read_manifest(manifest), []
        default_split = manifest.stem if manifest.stem in ("train", "valid", "test") else "train"
        for row, wav in tqdm(iter_audio(rows, acoustic.sample_rate, skips), total=len(rows), desc=manifest.name,
                             mininterval=5.0):
            batch.append(crop_or_pad(wav, n))
            clips.append({"audio": row["audio"], "caption": row.get("caption", ""),
                          "split": row.get("split", default_split)})
            if len(batch) == BATCH:
                encode(batch)
        if batch:
            encode(batch)
    if not clips:
        raise UserError(f"no readable audio in {', '.join(map(str, manifests))}; {skips.summary()}")
    out.mkdir(parents=True, exist_ok=True)
    for k in ARRAYS:
        new = np.stack(arrays[k])
        if old is not None:
            new = np.concatenate([np.load(out / f"{k}.npy"), new])
        tmp = out / f".{k}.tmp.npy"
        np.save(tmp, new)
        tmp.replace(out / f"{k}.npy")
    index = {"format_version": 1, "seconds": seconds, "tokenizer_hashes": hashes,
             "tokenizer_paths": {k: str(v) for k, v in paths.items()}, **describe(acoustic, semantic, mulan),
             "clips": (old["clips"] if old else []) + clips}
    (out / ".index.json.tmp").write_text(json.dumps(index, indent=1))
    (out / ".index.json.tmp").replace(out / "index.json")
    print(f"cached {len(clips)} clips to {out} ({len(index['clips'])} in all); {skips.summary()}")
    return len(clips)


def main() -> None:
    ap = argparse.ArgumentParser(description="Tokenize manifests once into a cache the stages train from.")
    ap.add_argument("--manifest", type=Path, action="append", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--acoustic"), ap.add_argument("--semantic"), ap.add_argument("--mulan")
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    tokenize(args.manifest, args.out, {"acoustic": args.acoustic, "semantic": args.semantic, "mulan": args.mulan},
             args.seconds)


if __name__ == "__main__":
    run_cli(main)
