"""What best-of-K has to choose from: K candidates per prompt, made in one batch as `pipeline.py --rerank K`
makes them, each scored for the tempo, key and instrument its prompt asks for (evaluation.adherence), with its
MuLan cosine to the prompt and its pulse at the bpm the prompt states; then how often each way of picking one
lands on a right candidate: the first (one sample), the pipeline's rule (`pipeline.rerank_score`), MuLan alone,
and any candidate at all (an oracle that knows the answer: the ceiling of reranking).

    python -m evaluation.candidates --prompts corpus/test.jsonl --limit 50 --k 4 --out eval/cand \
        [--duration 10] [--seed 0] [--rerank-tempo 1.0] [--stage NAME=PATH ...]

Writes candidates.jsonl (one row per prompt: each candidate's measures) and summary.md / summary.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from common.errors import UserError, run_cli
from evaluation import use_threads
from evaluation.generate_and_score import instrument_classifier_for, load_prompts

MEASURES = ("tempo_ok", "key_ok", "instrument_ok")


def summarise(per_prompt: list[list[dict]]) -> dict:
    """Per measure, over the prompts whose candidates have it: the share that is right when picking the first
    candidate, the pipeline's pick ("rerank"), MuLan's alone, on average over candidates, and any (the oracle)."""
    out = {}
    for m in MEASURES:
        rows = [c for c in per_prompt if m in c[0]]
        if not rows:
            continue
        right = [np.array([float(x[m]) for x in c]) for c in rows]
        pick = {"first": [r[0] for r in right],
                "rerank": [r[int(np.argmax([x["score"] for x in c]))] for r, c in zip(right, rows)],
                "mulan": [r[int(np.argmax([x["mulan"] for x in c]))] for r, c in zip(right, rows)],
                "mean": [r.mean() for r in right], "any": [r.max() for r in right]}
        out[m] = {"prompts": len(rows), **{k: round(float(np.mean(v)), 3) for k, v in pick.items()}}
    pulses = [(x["pulse"], float(x["tempo_ok"])) for c in per_prompt for x in c if "pulse" in x and "tempo_ok" in x]
    if pulses:
        p, ok = np.array(pulses).T
        out["pulse"] = {"candidates": len(p), "median_if_tempo_ok": round(float(np.median(p[ok == 1])), 3) if ok.any() else None,
                        "median_if_not": round(float(np.median(p[ok == 0])), 3) if (ok == 0).any() else None,
                        "share_below_0.05": round(float((p < 0.05).mean()), 3)}
    return out


def table(summary: dict, k: int) -> str:
    lines = [f"| measure (prompts) | first of {k} | pipeline's pick | MuLan's pick | mean over {k} | any of {k} |",
             "|---|---|---|---|---|---|"]
    for m in MEASURES:
        if m in summary:
            s = summary[m]
            lines.append(f"| {m} ({s['prompts']}) | {s['first']} | {s['rerank']} | {s['mulan']} | {s['mean']} | {s['any']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from evaluation.adherence import adherence
    from pipeline import GenerationOptions, Pipeline, load_parts, rerank_score
    from pipeline_cli import part_paths
    ap = argparse.ArgumentParser(prog="python -m evaluation.candidates", description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rerank-tempo", type=float, default=1.0)
    ap.add_argument("--stage", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--train-manifest", type=Path, default=None,
                    help="corpus clips to train the instrument classifier on (default: train.jsonl beside --prompts)")
    ap.add_argument("--train-clips", type=int, default=600)
    args = ap.parse_args()
    if args.k < 2 or args.rerank_tempo < 0:
        raise UserError(f"--k must be at least 2 and --rerank-tempo at least 0, got {args.k} and {args.rerank_tempo}")
    use_threads()
    paths = part_paths(args.stage)
    rows = load_prompts(args.prompts, args.limit)
    classifier = instrument_classifier_for(args, rows, 24000)
    pipe = Pipeline(load_parts(paths))
    args.out.mkdir(parents=True, exist_ok=True)
    per_prompt = []
    for i, row in enumerate(rows):
        text = row["caption"]
        wav = pipe.generate([text] * args.k, args.duration, options=GenerationOptions(seed=args.seed))
        terms = pipe.rerank_terms([text], wav, args.k)
        mulan, pulse, score = terms["mulan"][0], terms["pulse"][0], rerank_score(terms, args.rerank_tempo)[0]
        clips = [{"mulan": round(float(mulan[j]), 4), "score": round(float(score[j]), 4),
                  **({} if pulse[j].isnan() else {"pulse": round(float(pulse[j]), 4)})} for j in range(args.k)]
        adherence([row] * args.k, [w[0].numpy() for w in wav], pipe.sample_rate, classifier, clips)
        per_prompt.append(clips)
        print(f"[{i + 1}/{len(rows)}] {text[:60]}: " + ", ".join(f"{m} {sum(bool(c.get(m)) for c in clips)}/{args.k}"
                                                             for m in MEASURES if m in clips[0]), flush=True)
    (args.out / "candidates.jsonl").write_text("".join(json.dumps({"caption": r["caption"], "candidates": c}) + "\n"
                                                       for r, c in zip(rows, per_prompt)))
    summary = summarise(per_prompt)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.out / "summary.md").write_text(table(summary, args.k))
    print(table(summary, args.k))
    if "pulse" in summary:
        print("pulse at the stated bpm:", summary["pulse"])


if __name__ == "__main__":
    run_cli(main)
