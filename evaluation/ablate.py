"""Ablations: several pipeline variants on the same prompts and seeds, one table.

    python -m evaluation.ablate --variants base.yaml no_cfg.yaml --prompts corpus/test.jsonl --limit 50 \
        --out eval/ablate [--duration 5]

A variant is a YAML file; every key is optional (missing parts are the shipped defaults):

    name: no-guidance
    stages: {coarse: runs/coarse_big/last}          # NAME: checkpoint, as --stage NAME=PATH
    options: {seed: 0, guidance: 3.0, coarse: {guidance: 1.0, temperature: 0.9, top_k: 50}}
    # masked stages also take steps (per level), guidance_end and anneal_temperature

Each variant's clips, scores and spectrogram grid go to --out/<name>/; the combined table
to --out/ablation.md and --out/ablation.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import yaml

from evaluation import use_threads
from common.errors import UserError, run_cli
from evaluation.generate_and_score import (add_common_args, instrument_classifier_for, load_prompts, markdown_table,
                                           run_variant)

VARIANT_KEYS = {"name", "stages", "options"}


def load_variant(path: Path) -> tuple[str, dict, object]:
    from pipeline import PARTS, GenerationOptions
    from pipeline_cli import part_paths
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read variant {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(spec, dict) or set(spec) - VARIANT_KEYS:
        raise UserError(f"variant {path}: unknown keys {sorted(set(spec) - VARIANT_KEYS) if isinstance(spec, dict) else spec}; "
                        f"use {sorted(VARIANT_KEYS)}")
    paths = part_paths()
    for name, p in (spec.get("stages") or {}).items():
        if name not in PARTS:
            raise UserError(f"variant {path}: unknown stage {name!r}; use one of {', '.join(PARTS)}")
        paths[name] = str(p)
    opts = GenerationOptions()
    for key, value in (spec.get("options") or {}).items():
        if not hasattr(opts, key):
            raise UserError(f"variant {path}: unknown option {key!r}; use seed, guidance, semantic, coarse, fine")
        if isinstance(getattr(opts, key), dict):
            from dataclasses import fields

            from stages.sampling import Sampling
            knobs = [f.name for f in fields(Sampling)]   # a stage's guidance overrides the global one
            bad = sorted(set(value or {}) - set(knobs)) if isinstance(value, dict) else [value]
            if bad:
                raise UserError(f"variant {path}: {key} knobs {bad} are unknown; use {', '.join(knobs)}")
            getattr(opts, key).update(value)
        else:
            setattr(opts, key, type(getattr(opts, key))(value))
    return str(spec.get("name") or path.stem), paths, opts


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m evaluation.ablate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", type=Path, nargs="+", required=True)
    add_common_args(ap)
    args = ap.parse_args()
    use_threads()
    variants = [load_variant(p) for p in args.variants]   # all checked before anything runs
    names = [v[0] for v in variants]
    if len(set(names)) != len(names):
        raise UserError(f"variant names must differ: {names}")
    rows = load_prompts(args.prompts, args.limit)
    classifier = instrument_classifier_for(args, rows, 24000)
    results = {}
    for name, paths, opts in variants:
        print(f"== {name}", flush=True)
        results[name] = run_variant(name, paths, opts, rows, args, classifier, args.out / name)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ablation.json").write_text(json.dumps(results, indent=1) + "\n")
    table = markdown_table(results)
    (args.out / "ablation.md").write_text(table)
    print(table)


if __name__ == "__main__":
    run_cli(main)
