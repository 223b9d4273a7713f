"""Do the MuLan conditioning tokens carry what a prompt names? A linear probe on a token cache.

    python -m evaluation.token_probe --cache cache/corpus --labels corpus/train.jsonl corpus/valid.jsonl \
        corpus/test.jsonl [--mulan pretrained/mulan] [--levels 1 2 4 12] [--prompts PROMPTS.jsonl] [--out probe.json]

Each clip's MuLan tokens (of its audio, and of its caption's text) are turned back into the quantized embedding
(the sum of their RVQ code vectors over the first k levels); a logistic regression fitted on the train split's
audio embeddings then names the instrument, tempo band and key of the held-out clips (valid + test), from their
audio tokens and from their caption tokens. If the tokens carry an attribute, a stage that fails to render it
is failing to read its condition, not lacking it. The majority class is the baseline beside each score.
With --prompts, the same probes read the text tokens of prompts (e.g. the new-words ones): if they miss the
instrument there, the prompt is lost in MuLan's text tower, before any stage.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np

from common.errors import UserError, run_cli


def embed(tokens: np.ndarray, books: np.ndarray, k: int) -> np.ndarray:
    """MuLan tokens [N, Q] -> the quantized embedding of their first k levels [N, E]."""
    return sum(books[q][tokens[:, q]] for q in range(k))


def probe(audio_tokens: np.ndarray, text_tokens: np.ndarray | None, books: np.ndarray, labels: list,
          train: np.ndarray, held: np.ndarray, levels: list[int], prompt_tokens: np.ndarray | None = None,
          prompt_labels: list | None = None) -> dict:
    """Accuracy on `held` of a probe fitted on `train` (row indices) per level count; labels None are skipped.
    With `prompt_tokens` [P, Q] (MuLan text tokens of prompts) and their labels, also the accuracy on the prompts
    that state the attribute ("prompts"): what a stage could read from a prompt in those words."""
    from sklearn.linear_model import LogisticRegression
    train = np.array([i for i in train if labels[i] is not None])
    held = np.array([i for i in held if labels[i] is not None])
    if len(train) < 2 or len(held) < 1 or len(set(labels[i] for i in train)) < 2:
        return {"skipped": "fewer than 2 labelled train clips, 2 classes or 1 held-out clip"}
    y_train, y_held = [labels[i] for i in train], np.array([labels[i] for i in held], dtype=object)
    majority = Counter(y_train).most_common(1)[0][0]
    out = {"held_out": len(held), "classes": len(set(y_train)), "majority": round(float(np.mean(y_held == majority)), 4)}
    for k in levels:
        clf = LogisticRegression(max_iter=2000, C=10.0).fit(embed(audio_tokens[train], books, k), y_train)
        row = {"audio": round(float(np.mean(clf.predict(embed(audio_tokens[held], books, k)) == y_held)), 4)}
        if text_tokens is not None:
            row["text"] = round(float(np.mean(clf.predict(embed(text_tokens[held], books, k)) == y_held)), 4)
        asked = [j for j, y in enumerate(prompt_labels or []) if y is not None]
        if asked:
            pred = clf.predict(embed(prompt_tokens[asked], books, k))
            row["prompts"] = round(float(np.mean(pred == np.array([prompt_labels[j] for j in asked], dtype=object))), 4)
            out["prompts"] = len(asked)
        out[f"levels_{k}"] = row
    return out


def prompt_rows(path: Path, mulan: str) -> tuple[list[dict], np.ndarray]:
    """The prompts of a .jsonl and the MuLan text tokens [P, Q] of their captions."""
    import torch

    from audio_tokenizers.mulan import load_conditioner
    from evaluation.generate_and_score import load_prompts
    prompts = load_prompts(path, 10**9)
    model = load_conditioner(mulan)
    with torch.no_grad():
        return prompts, model.tokens(model.embed_text([p["caption"] for p in prompts])).numpy().astype(np.int64)


def main() -> None:
    from data.tokenize import TokenCache
    from evaluation.conditioning import ATTRIBUTES, label_table
    from stages.train import mulan_books
    ap = argparse.ArgumentParser(prog="python -m evaluation.token_probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", required=True, help="a token cache (data.tokenize) with MuLan tokens")
    ap.add_argument("--labels", type=Path, nargs="+", required=True, help="manifests with the cache clips' metadata")
    ap.add_argument("--mulan", default="pretrained/mulan", help="the MuLan that made the cache's tokens")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 12], help="RVQ level counts to probe")
    ap.add_argument("--prompts", type=Path, default=None,
                    help="a .jsonl of prompts (caption + instrument_label/tempo/key): also probe --mulan's text tokens "
                         "of them, e.g. evaluation/prompts/new_phrasing.jsonl")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    for m in args.labels + ([args.prompts] if args.prompts else []):
        if not m.is_file():
            raise UserError(f"--labels/--prompts {m}: no such manifest; pass the corpus's train/valid/test .jsonl "
                            "files (and a prompts .jsonl)")
    cache = TokenCache(args.cache)
    books = mulan_books(args.mulan, cache, "--mulan ").numpy()
    if min(args.levels) < 1 or max(args.levels) > len(books):
        raise UserError(f"--levels must lie in 1..{len(books)} (the MuLan's RVQ levels)")
    rows = label_table(cache, args.labels)
    audio = cache.arrays["mulan"].astype(np.int64)
    text = cache.arrays["mulan_text"][:, 0].astype(np.int64) if "mulan_text" in cache.arrays else None
    train = cache.rows("train")
    held = np.concatenate([cache.rows("valid"), cache.rows("test")])
    prompts, prompt_tokens = prompt_rows(args.prompts, args.mulan) if args.prompts else ([], None)
    results = {name: probe(audio, text, books, [None if r is None else get(r) for r in rows], train, held, args.levels,
                           prompt_tokens, [get(p) for p in prompts])
               for name, get in ATTRIBUTES.items()}
    print(json.dumps(results, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    run_cli(main)
