"""What a stage's condition carries, in nats per token, on held-out clips.

    python -m evaluation.conditioning --stage semantic=pretrained/semantic --stage coarse=pretrained/coarse \
        --cache cache/corpus [--clips 200] [--out eval/conditioning.json]

For each stage that reads a condition, the held-out loss of windows that start at the clip's
beginning, under five conditions: the clip's own MuLan audio tokens, another clip's, the null
condition, the text tokens of its own caption and of a re-phrasing of it (the cache's
mulan_text), over the stage's whole training window and over the first second alone (where
nothing but the condition tells the stage what to play). "null - X" is what condition X is worth;
a negative value means the stage does better without it (it memorised the training clips'
conditions instead of learning what they mean). `--trained-clips` scores the same on clips it
trained on: where the own condition is worth much more there than on held-out clips, it memorised.

    python -m evaluation.conditioning --stage semantic=PATH --cache cache/corpus \
        --generate-from evaluation/prompts/new_phrasing.jsonl --labels corpus/train.jsonl

also generates semantic ids (10 s, guidance 3) from each prompt and asks bag-of-tokens probes
fitted on the cache's real train-split ids (labels from --labels) what they hear: instrument,
tempo (four bands) and key, scored on the prompts that state them, beside the same probes on the
real ids of held-out clips (the probe's own ceiling).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from evaluation import use_threads
from common.errors import UserError, run_cli

CONDITIONS = ("audio", "other", "null", "text", "text_new")
ATTRIBUTE_CONDITIONS = ("text+stated", "text+true", "audio+true", "none+true")   # attribute_input stages


@torch.no_grad()
def signal(stage, cache, rows: np.ndarray, seconds: float, batch: int = 16) -> dict:
    """Mean loss per condition on windows of `seconds` from the start of each clip in `rows`."""
    from stages.train import with_condition
    cfg = stage.cfg
    frames = max(1, int(round(seconds * cfg.semantic_rate)))
    ratio = int(round(cfg.acoustic_rate / cfg.semantic_rate))
    names = [c for c in CONDITIONS if not c.startswith("text") or "mulan_text" in cache.arrays]
    if cfg.attribute_input and "attributes" in cache.arrays:
        names += [c for c in ATTRIBUTE_CONDITIONS if not c.startswith("text") or "mulan_text" in cache.arrays]
    sums = {c: [0.0, 0] for c in names}
    for i in range(0, len(rows), batch):
        part = rows[i:i + batch]
        if len(part) < 2:   # "another clip" needs two rows
            continue
        b = cache.window(part, np.zeros(len(part), dtype=int), frames, ratio)
        b.pop("melody", None)   # a text prompt: a melody_input stage is scored as it runs without --melody
        captions = [cache.index["clips"][r]["caption"] for r in part]
        for name in names:
            base = name.split("+")[0]   # "none+true": the null MuLan tokens, set by with_attributes
            out = stage.loss(*with_attributes(*with_condition(b, "audio" if base == "none" else base, cfg), name,
                                              captions, cfg))
            sums[name][0] += sum(float(v[0]) for v in out["per_level"].values())
            sums[name][1] += sum(v[2] for v in out["per_level"].values())
    loss = {c: round(s / n, 4) for c, (s, n) in sums.items() if n}
    res = {f"loss/{c}": v for c, v in loss.items()}
    res.update({f"null-{c}": round(loss["null"] - loss[c], 4) for c in loss if c != "null"})
    return res


def with_attributes(b: dict, drop, name: str, captions: list[str], cfg):
    """A batch under a condition of an attribute_input stage: "X" alone (null attribute ids, as a prompt that
    states neither: what its MuLan tokens carry), "X+stated" (the tempo and key its caption states in words, as a prompt gives them), "X+true" (its
    metadata's); "none+true" is the null MuLan condition with the true attributes (what they carry alone; training never
    pairs the two, since a dropped condition drops the attributes too)."""
    from data import attributes
    raw = b.get("attributes")
    b = {k: v for k, v in b.items() if k not in ("attributes", "attrs")}
    if "+" not in name:
        return b, drop
    b["attrs"] = attributes.from_texts(captions) if name.endswith("+stated") else attributes.ids(raw)
    if name.startswith("none"):
        b["mulan"] = torch.full_like(b["mulan"], cfg.mulan_codebook)
    return b, drop


def tempo_band(bpm: float) -> int:
    return int(np.searchsorted([72, 100, 130], bpm, side="right"))


# what the probes ask of a manifest row or prompt (None: the row does not say)
ATTRIBUTES = {"instrument": lambda r: r.get("instrument_label"),
              "tempo_band": lambda r: tempo_band(r["tempo"]) if r.get("tempo") is not None else None,
              "key": lambda r: r.get("key")}


def label_table(cache, manifests: list[Path]) -> list[dict | None]:
    """The manifest row of each cache clip (matched by audio path), None where none has it."""
    from data.manifest import read_manifest
    by_audio = {r["audio"]: r for m in manifests for r in read_manifest(m)}
    return [by_audio.get(c["audio"]) for c in cache.index["clips"]]


@torch.no_grad()
def generated_probe(stage, mulan, cache, labels: list[dict | None], prompts: list[dict], seconds: float = 10.0,
                    sampling=None, seed: int = 0, samples: int = 1) -> dict:
    """Probe accuracy on semantic ids generated from `prompts`, and on held-out real ids, per attribute. With
    `samples` > 1 each prompt is generated that many times (seeds seed, seed + 1, ...; the first is the one-sample
    run) and "generated" is the mean over them, each sample's accuracy listed beside it: one sample of 40 prompts
    moves by a prompt or two between seeds."""
    from evaluation.semantic import bags
    from stages.sampling import Sampling
    k = stage.cfg.semantic_codebook
    ids = cache.arrays["semantic"]
    from data.attributes import from_texts
    captions = [p["caption"] for p in prompts]
    text = mulan.tokens(mulan.embed_text(captions))[:, : stage.cfg.mulan_levels]
    n = int(round(seconds * stage.cfg.semantic_rate))
    sampling = sampling or Sampling(guidance=3.0)
    stated = from_texts(captions)   # what the prompts state (read by attribute_input stages)
    gens = [stage.generate(text, n, sampling, generator=torch.Generator().manual_seed(seed + s), attributes=stated)
            for s in range(samples)]
    out = {"prompts": len(prompts), "guidance": sampling.guidance, "temperature": sampling.temperature,
           "samples": samples}
    for name, get in ATTRIBUTES.items():
        train = [i for i in cache.rows("train") if labels[i] is not None and get(labels[i]) is not None]
        held = [i for i in np.concatenate([cache.rows("valid"), cache.rows("test")]) if labels[i] is not None
                and get(labels[i]) is not None]
        asked = [j for j, p in enumerate(prompts) if get(p) is not None]
        if not train or not asked:
            continue
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.5))
        clf.fit(bags(torch.from_numpy(ids[train].astype(np.int64)), k), [get(labels[i]) for i in train])
        truth = np.array([get(prompts[j]) for j in asked], dtype=object)
        preds = [clf.predict(bags(gen[asked], k)) for gen in gens]
        each = [round(float(np.mean(pred == truth)), 4) for pred in preds]
        out[name] = {"generated": round(float(np.mean(each)), 4), "prompts": len(asked),
                     "distinct_predicted": int(len(set(preds[0])))}
        if samples > 1:
            out[name]["per_sample"] = each
        if held:
            real = clf.predict(bags(torch.from_numpy(ids[held].astype(np.int64)), k))
            out[name]["real_held_out"] = round(float(np.mean(real == np.array([get(labels[i]) for i in held], dtype=object))), 4)
    return out


def main() -> None:
    from data.tokenize import TokenCache
    from stages.base import load_stage
    ap = argparse.ArgumentParser(prog="python -m evaluation.conditioning", description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", action="append", required=True, metavar="NAME=PATH",
                    help="a stage checkpoint that reads a condition (semantic, coarse or acoustic role)")
    ap.add_argument("--cache", required=True, help="the token cache it was trained on (held-out splits are scored)")
    ap.add_argument("--clips", type=int, default=200)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--trained-clips", action="store_true",
                    help="also score up to --clips clips the stage trained on (the first of the cache's train split, "
                         "within its train_clips): own minus held-out is what it memorised")
    ap.add_argument("--generate-from", type=Path, default=None, metavar="PROMPTS.jsonl",
                    help="also probe semantic ids generated from these prompts (rows: caption, instrument_label, ...)")
    ap.add_argument("--labels", type=Path, nargs="+", default=[], help="manifests with the cache clips' metadata")
    ap.add_argument("--mulan", default="pretrained/mulan")
    ap.add_argument("--guidance", type=float, nargs="+", default=[3.0],
                    help="classifier-free guidance scales for --generate-from (one probe row each)")
    ap.add_argument("--temperature", type=float, nargs="+", default=[1.0],
                    help="sampling temperatures for --generate-from (crossed with --guidance)")
    ap.add_argument("--samples", type=int, default=1,
                    help="--generate-from: generations per prompt (seeds 0..N-1); the probe reports their mean")
    args = ap.parse_args()
    if args.samples < 1:
        raise UserError(f"--samples {args.samples}: generate at least 1 sample per prompt")
    if min(args.guidance) < 0 or min(args.temperature) < 0:
        raise UserError("--guidance and --temperature must be >= 0 (1.0 turns guidance off)")
    if args.generate_from and (not args.generate_from.is_file() or not args.labels):
        raise UserError("--generate-from needs an existing prompts JSONL and --labels (e.g. corpus/train.jsonl)")
    use_threads()
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
        if args.trained_clips:
            from stages.train import train_rows
            seen = train_rows(cache, stage.cfg)[: args.clips]
            results[name]["trained_on"] = {"clips": len(seen),
                                           "window": signal(stage, cache, seen, stage.cfg.window_seconds),
                                           "first_second": signal(stage, cache, seen, 1.0)}
        print(name, json.dumps(results[name]), flush=True)
        if args.generate_from and stage.role == "semantic":
            from audio_tokenizers.mulan import load_conditioner
            from evaluation.generate_and_score import load_prompts
            from stages.sampling import Sampling
            mulan, labels = load_conditioner(args.mulan), label_table(cache, args.labels)
            prompts = load_prompts(args.generate_from, 10**6)
            rows_out = []
            for g in args.guidance:
                for t in args.temperature:
                    rows_out.append(generated_probe(stage, mulan, cache, labels, prompts,
                                                    sampling=Sampling(guidance=g, temperature=t), samples=args.samples))
                    print(name, "generated", json.dumps(rows_out[-1]), flush=True)
            results[name]["generated"] = rows_out[0] if len(rows_out) == 1 else rows_out
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    run_cli(main)
