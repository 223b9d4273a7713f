"""What a stage's condition carries, in nats per token, on held-out clips.

    python -m evaluation.conditioning --stage semantic=pretrained/semantic --stage coarse=pretrained/coarse \
        --cache cache/corpus [--clips 200] [--out eval/conditioning.json]

For each stage that reads a condition, the held-out loss of windows that start at the clip's
beginning, under five conditions: the clip's own MuLan audio tokens, another clip's, the null
condition, the text tokens of its own caption and of a re-phrasing of it (the cache's
mulan_text), over the stage's whole training window and over the first second alone (where
nothing but the condition tells the stage what to play). "null - X" is what condition X is worth;
a negative value means the stage does better without it (it memorised the training clips'
conditions instead of learning what they mean).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError, run_cli

CONDITIONS = ("audio", "other", "null", "text", "text_new")


@torch.no_grad()
def signal(stage, cache, rows: np.ndarray, seconds: float, batch: int = 16) -> dict:
    """Mean loss per condition on windows of `seconds` from the start of each clip in `rows`."""
    from stages.train import with_condition
    cfg = stage.cfg
    frames = max(1, int(round(seconds * cfg.semantic_rate)))
    ratio = int(round(cfg.acoustic_rate / cfg.semantic_rate))
    names = [c for c in CONDITIONS if not c.startswith("text") or "mulan_text" in cache.arrays]
    sums = {c: [0.0, 0] for c in names}
    for i in range(0, len(rows), batch):
        part = rows[i:i + batch]
        if len(part) < 2:   # "another clip" needs two rows
            continue
        b = cache.window(part, np.zeros(len(part), dtype=int), frames, ratio)
        for name in names:
            out = stage.loss(*with_condition(b, name, cfg))
            sums[name][0] += sum(float(v[0]) for v in out["per_level"].values())
            sums[name][1] += sum(v[2] for v in out["per_level"].values())
    loss = {c: round(s / n, 4) for c, (s, n) in sums.items() if n}
    res = {f"loss/{c}": v for c, v in loss.items()}
    res.update({f"null-{c}": round(loss["null"] - loss[c], 4) for c in loss if c != "null"})
    return res


def main() -> None:
    from data.tokenize import TokenCache
    from stages.base import load_stage
    ap = argparse.ArgumentParser(prog="python -m evaluation.conditioning", description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", action="append", required=True, metavar="NAME=PATH",
                    help="a stage checkpoint that reads a condition (semantic, coarse or acoustic role)")
    ap.add_argument("--cache", required=True, help="the token cache it was trained on (held-out splits are scored)")
    ap.add_argument("--clips", type=int, default=200)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    cache = TokenCache(args.cache)
    rows = np.concatenate([cache.rows("valid"), cache.rows("test")])[: args.clips]
    if len(rows) < 2:
        raise UserError(f"{args.cache} has {len(rows)} held-out clips; the measure needs at least 2")
    stages = {}
    for item in args.stage:
        name, _, path = item.partition("=")
        if not path:
            raise UserError(f"--stage {item!r}: use NAME=PATH")
        stages[name] = load_stage(path, ("semantic", "coarse", "acoustic"))
    results = {"clips": len(rows)}
    for name, stage in stages.items():
        from stages.train import check_cache
        check_cache(stage.cfg, cache)
        stage.model.eval()
        results[name] = {"window": signal(stage, cache, rows, stage.cfg.window_seconds),
                         "first_second": signal(stage, cache, rows, 1.0)}
        print(name, json.dumps(results[name]), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    run_cli(main)
