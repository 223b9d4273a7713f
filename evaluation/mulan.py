"""How well a MuLan-style conditioner ties captions to clips, on held-out corpus clips.

    python -m evaluation.mulan --corpus corpus --checkpoint pretrained/mulan --clips 200 --out eval/mulan.json

- text-to-audio retrieval with the clips' own captions: recall@1 and recall@10 (chance 1/n, 10/n);
- the same with captions rephrased by templates that exist only here (never seen in training:
  other sentence shapes and other words), to see how much of the retrieval is template matching;
- the same with "natural" captions (NATURAL_TEMPLATES): the instrument and the kind of music, a feeling
  and a pace word, as a listener would write them, without the exact tempo (and mostly without the key);
- zero-shot instrument recognition: each non-groove clip's label picked among every label of the
  corpus by the cosine with sentences naming it (ZERO_SHOT_TEMPLATES), never seen in training;
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

from evaluation import use_threads
from audio_tokenizers.mulan import recall
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
# Like captions a person writes from listening: the instrument and the kind of music in their own words, a
# feeling, a pace word instead of a number, seldom the key. Also never used in training.
NATURAL_TEMPLATES = [
    "{mood_cap} {style} on {players}",
    "I'd like to hear {players} doing {style_a}, {pace}",
    "{players_cap}, {pace} and {mood}",
    "{style_cap} - {players} - kind of {mood}",
    "Some {pace} {style} for {players}",
    "{players_cap} with a {mood} {style} tune in {key}",
]
PACES = [(72, "slowly"), (100, "at an easy pace"), (130, "upbeat"), (1000, "very fast")]
# Zero-shot instrument recognition: each label's name in sentences no training caption has.
ZERO_SHOT_TEMPLATES = ["a lone {name} plays", "the sound of {name_a}", "nothing but {name_a}", "{name_cap} by itself"]


def rephrase(row: dict, i: int, templates: list[str] = HELD_OUT_TEMPLATES) -> str:
    """Caption i-th held-out template filled from a corpus clip's metadata."""
    style, players = row["style"], row["players"]
    mood = MOODS.get(row.get("mode"), "calm")
    fields = {"style": style, "style_a": ("an " if style[:1].lower() in "aeiou" else "a ") + style,
              "style_cap": style[:1].upper() + style[1:], "players": players,
              "players_cap": players[:1].upper() + players[1:], "key": row["key"], "tempo": row["tempo"],
              "meter": row["meter"], "mood": mood, "mood_cap": mood.capitalize(),
              "pace": next(word for limit, word in PACES if row["tempo"] < limit)}
    return templates[i % len(templates)].format(**fields)


def label_name(label: str) -> str:
    """An instrument label of the corpus (a GM name or an ensemble key) -> the words for it."""
    from data.captions import ENSEMBLE_NAMES
    return ENSEMBLE_NAMES[label][0] if label in ENSEMBLE_NAMES else label


@torch.no_grad()
def zero_shot_instrument(model, rows: list[dict], audio: torch.Tensor, labels: list[str], grooves: bool = False) -> dict:
    """Accuracy of picking each clip's instrument label among `labels` (all the corpus has) by the cosine of its
    audio embedding with the label's texts (mean over ZERO_SHOT_TEMPLATES). Grooves are left out unless
    `grooves`: their label (the chord instrument) is one of four instruments playing."""
    keep = [i for i, r in enumerate(rows) if (grooves or r.get("source") != "groove") and r.get("instrument_label") in labels]
    if len(labels) < 2:
        return {}
    texts = []
    for label in labels:
        name = label_name(label)
        fields = {"name": name, "name_a": ("an " if name[:1].lower() in "aeiou" else "a ") + name,
                  "name_cap": name[:1].upper() + name[1:]}
        texts += [t.format(**fields) for t in ZERO_SHOT_TEMPLATES]
    t = model.embed_text(texts).reshape(len(labels), len(ZERO_SHOT_TEMPLATES), -1).mean(1)
    pred = (audio[keep] @ t.t()).argmax(1)
    truth = torch.tensor([labels.index(rows[i]["instrument_label"]) for i in keep])
    return {"accuracy": round(float((pred == truth).float().mean()), 4), "clips": len(keep), "labels": len(labels),
            "chance": round(1 / len(labels), 4)}


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
def evaluate_mulan(model, rows: list[dict], labels: list[str] | None = None) -> dict:
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
        nat = [rephrase(r, i, NATURAL_TEMPLATES) for i, r in enumerate(kept)]
        out["natural"] = recall(torch.cat([model.embed_text(nat[i:i + 64]) for i in range(0, len(nat), 64)]), a)
        out["natural_examples"] = nat[:3]
    out["tokens"] = first_level_agreement(model.tokens(t), model.tokens(a), model.codebook_size)
    labels = labels or sorted({r["instrument_label"] for r in kept if "instrument_label" in r})
    out["zero_shot_instrument"] = zero_shot_instrument(model, kept, a, labels)
    out["zero_shot_instrument_with_grooves"] = zero_shot_instrument(model, kept, a, labels, grooves=True)
    return out


def main() -> None:
    from audio_tokenizers.mulan import load_conditioner
    ap = argparse.ArgumentParser(prog="python -m evaluation.mulan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True, help="corpus folder with test.jsonl (and valid.jsonl)")
    ap.add_argument("--checkpoint", default=None, help="MuLan checkpoint or CLAP folder (default: the shipped one)")
    ap.add_argument("--clips", type=int, default=200)
    ap.add_argument("--out", default=None, help="write the result as JSON here too")
    args = ap.parse_args()
    use_threads()
    corpus = Path(args.corpus)
    labels = sorted({r["instrument_label"] for m in ("train", "valid", "test") if (corpus / f"{m}.jsonl").is_file()
                     for r in read_manifest(corpus / f"{m}.jsonl") if "instrument_label" in r})
    result = evaluate_mulan(load_conditioner(args.checkpoint), held_out_rows(corpus, args.clips), labels or None)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    run_cli(main)
