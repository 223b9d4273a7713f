"""Run the three tokenizers over manifests into a token cache (data/tokenize.py reads and writes caches;
this module is the part that needs the tokenizers, so the data package never imports upward).

    python -m data.tokenize --manifest corpus/train.jsonl --manifest corpus/valid.jsonl --out cache/corpus \
        [--acoustic PATH] [--semantic PATH] [--mulan PATH] [--seconds 10] [--rephrasings 8] [--text-only]
        [--melody-only] [--attributes-only] [--onsets-only]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from audio_tokenizers.acoustic import load_acoustic
from audio_tokenizers.melody import SILENT, melody_ids
from audio_tokenizers.mulan import load_conditioner
from audio_tokenizers.semantic import load_semantic
from common.errors import AudioError, UserError
from data.audio import crop_or_pad, load_audio
from data.manifest import SkipCounter, iter_audio, read_manifest
from data.onsets import NOT_GIVEN, onset_levels
from data.tokenize import (ARRAYS, BATCH, REPHRASINGS, TokenCache, checkpoint_hash, checkpoint_hashes, describe,
                           mulan_audio_hashes, text_tokens, write_cache)


def add_text_tokens(manifests: list[Path], out: Path, mulan_path: str | None, rephrasings: int) -> None:
    """Write mulan_text.npy for an existing cache; every clip of its index must be in the manifests."""
    cache = TokenCache(out)
    made_by = cache.index["tokenizer_hashes"]["mulan"]
    if made_by not in mulan_audio_hashes(mulan_path or "pretrained/mulan"):
        raise UserError(f"{out}'s audio tokens were made by another MuLan ({made_by}); pass that one as --mulan")
    rows = rows_of_cache(manifests, out, cache)
    index = {**cache.index, "text_tokens_by": checkpoint_hash(mulan_path or "pretrained/mulan")}
    write_cache(out, {"mulan_text": text_tokens(load_conditioner(mulan_path), rows, rephrasings)}, index)
    print(f"wrote text tokens of {len(rows)} clips x {rephrasings} captions to {out / 'mulan_text.npy'}")


def attributes_array(rows: list[dict]) -> np.ndarray:
    """Each row's tempo (bpm) and key index from its metadata -> [N, 2] int16 (0 / -1 where it has none)."""
    from data.attributes import raw_from_metadata
    return raw_from_metadata(rows).round().numpy().astype(np.int16)


def rows_of_cache(manifests: list[Path], out: Path, cache: TokenCache) -> list[dict]:
    """The manifest row of every clip in the cache's index, in its order (all must be there)."""
    by_audio = {}
    for m in manifests:
        by_audio.update({r["audio"]: r for r in read_manifest(m)})
    missing = [c["audio"] for c in cache.index["clips"] if c["audio"] not in by_audio]
    if missing:
        raise UserError(f"{len(missing)} clips of {out} are in none of the manifests (e.g. {missing[0]}); pass all of them")
    return [by_audio[c["audio"]] for c in cache.index["clips"]]


def add_attributes(manifests: list[Path], out: Path) -> None:
    """Write attributes.npy for an existing cache from its clips' metadata."""
    rows = rows_of_cache(manifests, out, TokenCache(out))
    write_cache(out, {"attributes": attributes_array(rows)})
    print(f"wrote the tempo and key of {len(rows)} clips to {out / 'attributes.npy'}")


def melody_array(wav: torch.Tensor, sample_rate: int, frame_rate: float, frames: int) -> np.ndarray:
    """Melody ids of clips [B, 1, N], cut or padded (SILENT) to the semantic arrays' `frames`."""
    ids = melody_ids(wav, sample_rate, frame_rate)[:, :frames]
    return np.pad(ids.numpy(), ((0, 0), (0, frames - ids.shape[1])), constant_values=SILENT).astype(np.int16)


def add_from_audio(out: Path, name: str, frames: int, fill: int, dtype, per_clip) -> None:
    """Write `name`.npy [N, frames] for an existing cache, one row per clip from its audio (the paths its index
    records) by per_clip(wav [1, 1, n], sample_rate) -> [1, frames]; a clip whose file is gone or unreadable keeps
    `fill` throughout, and is counted."""
    ix = TokenCache(out).index
    sr, n = ix["acoustic"]["sample_rate"], int(ix["seconds"] * ix["acoustic"]["sample_rate"])
    rows, skips = np.full((len(ix["clips"]), frames), fill, dtype=dtype), SkipCounter()
    for i, clip in enumerate(tqdm(ix["clips"], desc=name, mininterval=5.0)):
        try:
            wav = crop_or_pad(load_audio(clip["audio"], sr), n)
        except AudioError as e:
            skips.add(e)
            continue
        rows[i] = per_clip(torch.from_numpy(wav)[None, None], sr)[0]
    write_cache(out, {name: rows})
    print(f"wrote {name} for {len(rows)} clips to {out / f'{name}.npy'}; {skips.summary()}")


def add_melody(out: Path) -> None:
    """melody.npy from the clips' audio (SILENT where a clip cannot be read)."""
    cache = TokenCache(out)
    frames, rate = cache.arrays["semantic"].shape[1], cache.index["semantic"]["frame_rate"]
    add_from_audio(out, "melody", frames, SILENT, np.int16, lambda w, sr: melody_array(w, sr, rate, frames))


def onsets_array(wav: torch.Tensor, sample_rate: int, frame_rate: float, frames: int) -> np.ndarray:
    """Onset levels of clips [B, 1, N] (data/onsets.py) at the acoustic arrays' `frames` -> [B, frames] int8."""
    return onset_levels(wav[:, 0], sample_rate, frame_rate, frames).numpy().astype(np.int8)


def add_onsets(out: Path) -> None:
    """onsets.npy from the clips' audio (NOT_GIVEN where a clip cannot be read: a training row without onsets)."""
    cache = TokenCache(out)
    frames, rate = cache.arrays["acoustic"].shape[-1], cache.index["acoustic"]["frame_rate"]
    add_from_audio(out, "onsets", frames, NOT_GIVEN, np.int8, lambda w, sr: onsets_array(w, sr, rate, frames))


def tokenize(manifests: list[Path], out: Path, paths: dict[str, str | None], seconds: float,
             rephrasings: int = REPHRASINGS) -> int:
    acoustic, semantic, mulan = load_acoustic(paths["acoustic"]), load_semantic(paths["semantic"]), \
        load_conditioner(paths["mulan"])
    where = {"acoustic": paths["acoustic"] or "pretrained/acoustic",
             "semantic": paths["semantic"] or "pretrained/semantic_tokenizer", "mulan": paths["mulan"] or "pretrained/mulan"}
    hashes = {k: checkpoint_hash(p) for k, p in where.items()}
    old = None
    if (out / "index.json").is_file():   # appending: the same tokenizers, and a cache that is whole
        existing = TokenCache(out)
        old = existing.index
        made_by = old["tokenizer_hashes"]
        # a MuLan whose text tower was retrained on the locked audio tower makes the same audio tokens
        if any(made_by[k] not in checkpoint_hashes(where[k]) for k in ("acoustic", "semantic")) or \
                made_by["mulan"] not in mulan_audio_hashes(where["mulan"]):
            raise UserError(f"{out} was made by other tokenizers ({made_by} vs {hashes}); "
                            "use a new --out folder")
        text_by = old.get("text_tokens_by", made_by["mulan"])   # caches from before it was recorded: the index's MuLan
        if text_by not in checkpoint_hashes(where["mulan"]):   # one cache, one text tower: one caption vocabulary
            raise UserError(f"{out}'s caption tokens were made by the text tower of MuLan {text_by}, --mulan's is "
                            f"{hashes['mulan']}; first re-make them all with this MuLan (--text-only --mulan ... "
                            "--manifest <the cache's manifests>), then append")
        hashes = made_by
        for name, flag in (("mulan_text", "--text-only"), ("melody", "--melody-only"),
                           ("attributes", "--attributes-only"), ("onsets", "--onsets-only")):
            if name not in existing.arrays:
                raise UserError(f"{out} has no {name}.npy yet; add it first with {flag}, then append")
        if existing.arrays["mulan_text"].shape[1] != rephrasings:
            raise UserError(f"{out} holds {existing.arrays['mulan_text'].shape[1]} captions per clip; append with "
                            f"--rephrasings {existing.arrays['mulan_text'].shape[1]}")
    n = int(seconds * acoustic.sample_rate)
    skips, clips, metas, arrays = SkipCounter(), [], [], {k: [] for k in (*ARRAYS, "melody", "onsets")}

    def encode(batch: list[np.ndarray]) -> None:   # batches of clips: fewer, larger matrix products
        x = torch.from_numpy(np.stack(batch))[:, None]
        arrays["acoustic"].extend(acoustic.encode(x).numpy().astype(np.int16))
        arrays["semantic"].extend(semantic.encode(x).numpy().astype(np.int16))
        arrays["mulan"].extend(mulan.tokens(mulan.embed_audio(x)).numpy().astype(np.int16))
        arrays["melody"].extend(melody_array(x, acoustic.sample_rate, semantic.frame_rate, arrays["semantic"][-1].shape[-1]))
        arrays["onsets"].extend(onsets_array(x, acoustic.sample_rate, acoustic.frame_rate, arrays["acoustic"][-1].shape[-1]))
        batch.clear()

    for manifest in manifests:
        rows, batch = read_manifest(manifest), []
        default_split = manifest.stem if manifest.stem in ("train", "valid", "test") else "train"
        for row, wav in tqdm(iter_audio(rows, acoustic.sample_rate, skips), total=len(rows), desc=manifest.name,
                             mininterval=5.0):
            batch.append(crop_or_pad(wav, n))
            clips.append({"audio": row["audio"], "caption": row.get("caption", ""),
                          "split": row.get("split", default_split)})
            metas.append(row)
            if len(batch) == BATCH:
                encode(batch)
        if batch:
            encode(batch)
    if not clips:
        raise UserError(f"no readable audio in {', '.join(map(str, manifests))}; {skips.summary()}")
    arrays["mulan_text"] = text_tokens(mulan, metas, rephrasings)
    arrays["attributes"] = list(attributes_array(metas))
    stacked = {}
    for k in (*ARRAYS, "mulan_text", "melody", "attributes", "onsets"):
        stacked[k] = np.stack(arrays[k])
        if old is not None:
            stacked[k] = np.concatenate([np.load(out / f"{k}.npy"), stacked[k]])
    text_by = checkpoint_hash(paths["mulan"] or "pretrained/mulan")   # whose text tower made mulan_text
    index = {"format_version": 1, "seconds": seconds, "tokenizer_hashes": hashes, "text_tokens_by": text_by,
             "tokenizer_paths": {k: str(v) for k, v in paths.items()}, **describe(acoustic, semantic, mulan),
             "clips": (old["clips"] if old else []) + clips}
    write_cache(out, stacked, index)
    print(f"cached {len(clips)} clips to {out} ({len(index['clips'])} in all); {skips.summary()}")
    return len(clips)


def main() -> None:
    ap = argparse.ArgumentParser(description="Tokenize manifests once into a cache the stages train from.")
    ap.add_argument("--manifest", type=Path, action="append", default=[])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--acoustic"), ap.add_argument("--semantic"), ap.add_argument("--mulan")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rephrasings", type=int, default=REPHRASINGS, help="captions per clip in mulan_text.npy")
    ap.add_argument("--text-only", action="store_true", help="only add text tokens to the existing cache --out")
    ap.add_argument("--melody-only", action="store_true", help="only add melody ids to the existing cache --out")
    ap.add_argument("--attributes-only", action="store_true",
                    help="only add each clip's tempo and key (from the --manifest metadata) to the existing cache --out")
    ap.add_argument("--onsets-only", action="store_true",
                    help="only add each clip's onset levels (data/onsets.py, from its audio) to the existing cache --out")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.rephrasings < 1:
        raise UserError("--rephrasings must be at least 1 (the clip's own caption)")
    if args.text_only:
        if not args.manifest:
            raise UserError("--text-only needs the --manifest files of the cache's clips (their metadata)")
        add_text_tokens(args.manifest, args.out, args.mulan, args.rephrasings)
        return
    if args.melody_only:
        add_melody(args.out)
        return
    if args.onsets_only:
        add_onsets(args.out)
        return
    if args.attributes_only:
        if not args.manifest:
            raise UserError("--attributes-only needs the --manifest files of the cache's clips (their metadata)")
        add_attributes(args.manifest, args.out)
        return
    if not args.manifest:
        raise UserError("give at least one --manifest (a JSONL of clips) to tokenize")
    tokenize(args.manifest, args.out, {"acoustic": args.acoustic, "semantic": args.semantic, "mulan": args.mulan},
             args.seconds, args.rephrasings)
