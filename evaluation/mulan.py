"""How well a MuLan-style conditioner ties captions to clips, on held-out corpus clips.

    python -m evaluation.mulan --corpus corpus --checkpoint pretrained/mulan --clips 200 --out eval/mulan.json

- text-to-audio retrieval with the clips' own captions: recall@1 and recall@10 (chance 1/n, 10/n);
- the same with captions rephrased by templates that exist only here (never seen in training:
  other sentence shapes and other words), to see how much of the retrieval is template matching;
- first-level agreement of the conditioning tokens: how often the RVQ's first token of a
  clip's caption embedding equals that of its audio embedding, beside chance (the agreement
  of the two marginal token distributions if they were independent).

Clips come from the test split, topped up from the validation split when it has fewer than
--clips (both are held out from training).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from audio_tokenizers.mulan_train import recall
from common.errors import UserError, run_cli
from data.manifest import SkipCounter, iter_audio, read_manifest

# Written for this evaluation only; data/captions.py must never use them.
HELD_OUT_TEMPLATES = [
    "{players_cap} performs {style_a} in {key}, {tempo} beats per minute",
    "Genre: {style}. Instrumentation: {players}. Tonality: {key}.",
    "An arrangement for {players} of {style_a}, {meter} meter",
    "Listen to {players} in {style_a} with a {mood} character",
    "{style_cap}, {key}, roughly {tempo} bpm, performed by {players}",
    "Music for {players}: {style}, {mood}",
]
MOODS = {"major": "joyful", "minor": "sad"}


def rephrase(row: dict, i: int) -> str:
    """Caption i-th held-out template filled from a corpus clip's metadata."""
    style, players = row["style"], row["players"]
    fields = {"style": style, "style_a": ("an " if style[:1].lower() in "aeiou" else "a ") + style,
              "style_cap": style[:1].upper() + style[1:], "players": players,
              "players_cap": players[:1].upper() + players[1:], "key": row["key"], "tempo": row["tempo"],
              "meter": row["meter"], "mood": MOODS.get(row.get("mode"), "calm")}
    return HELD_OUT_TEMPLATES[i % len(HELD_OUT_TEMPLATES)].format(**fields)


def first_level_agreement(tok_text: torch.Tensor, tok_audio: torch.Tensor, k: int) -> dict[str, float]:
    """tok_* [n, Q] -> the rate at which level-0 tokens agree, and that rate under independence."""
    a, b = tok_text[:, 0].numpy(), tok_audio[:, 0].numpy()
    pa, pb = np.bincount(a, minlength=k) / len(a), np.bincount(b, minlength=k) / len(b)
    return {"agreement": float(np.mean(a == b)), "chance": float(pa @ pb), "uniform_chance": 1.0 / k}


def held_out_rows(corpus: Path, n: int) -> list[dict]:
    rows = read_manifest(corpus / "test.jsonl")
    if len(rows) < n and (corpus / "valid.jsonl").exists():
        rows += read_manifest(corpus / "valid.jsonl")[: n - len(rows)]
    rows = [r for r in rows if r.get("caption", "").strip()][:n]
    if len(rows) < 10:
        raise UserError(f"{corpus} has {len(rows)} captioned held-out clips; retrieval needs at least 10")
    return rows


@torch.no_grad()
def evaluate_mulan(model, rows: list[dict]) -> dict:
    audio, kept = [], []
    for row, wav in iter_audio(rows, model.sample_rate, SkipCounter()):
        audio.append(model.embed_audio(torch.from_numpy(wav)[None, None]))
        kept.append(row)
    a = torch.cat(audio)
    texts = [r["caption"] for r in kept]
    t = torch.cat([model.embed_text(texts[i:i + 64]) for i in range(0, len(texts), 64)])
    out = {"clips": len(kept), "chance@1": 1 / len(kept), "chance@10": min(1.0, 10 / len(kept)),
           "captions": recall(t, a)}
    if all("style" in r for r in kept):
        re = [rephrase(r, i) for i, r in enumerate(kept)]
        t_re = torch.cat([model.embed_text(re[i:i + 64]) for i in range(0, len(re), 64)])
        out["rephrased"] = recall(t_re, a)
        out["rephrased_examples"] = re[:3]
    out["tokens"] = first_level_agreement(model.tokens(t), model.tokens(a), model.codebook_size)
    return out


def main() -> None:
    from audio_tokenizers.mulan import load_conditioner
    ap = argparse.ArgumentParser(prog="python -m evaluation.mulan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True, help="corpus folder with test.jsonl (and valid.jsonl)")
    ap.add_argument("--checkpoint", default=None, help="MuLan checkpoint or CLAP folder (default: the shipped one)")
    ap.add_argument("--clips", type=int, default=200)
    ap.add_argument("--out", default=None, help="write the result as JSON here too")
    args = ap.parse_args()
    torch.set_num_threads(2)
    result = evaluate_mulan(load_conditioner(args.checkpoint), held_out_rows(Path(args.corpus), args.clips))
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    run_cli(main)
