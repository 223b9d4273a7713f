"""Benchmarks. Run on an otherwise idle machine; quote medians.

    python -m evaluation.bench stages [--repeats 5]
    python -m evaluation.bench pipeline [--stage NAME=PATH ...] [--durations 10 60] [--int8]
    python -m evaluation.bench pipeline --variant flat: --variant delay:coarse=A,fine=B --durations 10
    python -m evaluation.bench train --configs configs/coarse.yaml configs/delay.yaml [--threads 1]

`stages` uses config B1: dim 256, depth 6, 4 heads, semantic vocabulary 512, codebook 1024,
3 coarse levels, 12 MuLan tokens, a 5 s clip (125 semantic + 250 x 3 coarse tokens). It prints
training tokens/s (forward + backward + AdamW, batch 4, coarse layout), and coarse generation
tokens/s at batch 1 without guidance, with the KV cache and without it (recomputing the whole
sequence each step), plus whether both produce the same tokens; then the KV-cache generation
again with int8 block weights (stages/quantize.py).

`train` times training steps (forward + backward + AdamW) of stage configs side by side, on
random tokens of each config's window and batch size, alternating the configs so that a
machine that slows down slows them all; it prints the median step time and the audio-seconds
of training windows per second, the measure to compare layouts by (tokens/s is not: a frame
costs 3 positions in the flattened coarse layout and 1 in the delay pattern).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from stages.base import StageConfig, build_stage
from stages.quantize import quantize_int8
from stages.sampling import Sampling

B1 = dict(kind="coarse", dim=256, depth=6, heads=4, semantic_codebook=512, acoustic_codebook=1024,
          mulan_levels=12, mulan_codebook=1024, coarse_levels=3, fine_levels=5, window_seconds=5.0)


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def bench_stages(repeats: int, gen_tokens: int) -> dict:
    torch.manual_seed(0)
    cfg = StageConfig(**B1)
    stage = build_stage(cfg)
    model = stage.model
    g = torch.Generator().manual_seed(0)
    batch = {"mulan": torch.randint(0, 1024, (4, 12), generator=g),
             "semantic": torch.randint(0, 512, (4, 125), generator=g),
             "acoustic": torch.randint(0, 1024, (4, 3, 250), generator=g)}
    tokens, levels, predict = stage.training_sequence(batch, torch.zeros(4, dtype=torch.bool))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step():
        loss = model(tokens, levels, predict)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    model.train()
    train_times = timed(train_step, repeats)
    model.eval()
    frames = gen_tokens // 3
    results = []

    def gen(use_cache: bool = True) -> None:
        results.append(stage.generate(batch["mulan"][:1], batch["semantic"][:1], frames, Sampling(top_k=50),
                                      generator=torch.Generator().manual_seed(1), use_cache=use_cache))
    runs = {True: timed(gen, repeats)}
    cached = results[-1]
    runs[False] = timed(lambda: gen(use_cache=False), max(1, repeats // 2))
    kv_equal = bool(torch.equal(cached, results[-1]))
    quantize_int8(model)
    int8_times = timed(gen, repeats)
    med = lambda xs: statistics.median(xs)  # noqa: E731
    return {"config": "B1", "parameters_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "sequence_tokens": tokens.shape[1], "threads": torch.get_num_threads(),
            "train_tokens_per_s": round(4 * tokens.shape[1] / med(train_times), 1),
            "generated_tokens": frames * 3,
            "gen_kv_tokens_per_s": round(frames * 3 / med(runs[True]), 1),
            "gen_no_cache_tokens_per_s": round(frames * 3 / med(runs[False]), 1),
            "kv_speedup": round(med(runs[False]) / med(runs[True]), 2),
            "kv_equals_no_cache": kv_equal,
            "gen_kv_int8_tokens_per_s": round(frames * 3 / med(int8_times), 1)}


def random_batch(cfg: StageConfig, g: torch.Generator) -> dict:
    """Random cached-token windows in the shapes a config trains on."""
    frames = int(round(cfg.window_seconds * cfg.semantic_rate))
    ratio = int(round(cfg.acoustic_rate / cfg.semantic_rate))
    return {"mulan": torch.randint(0, cfg.mulan_codebook, (cfg.batch_size, cfg.mulan_levels), generator=g),
            "semantic": torch.randint(0, cfg.semantic_codebook, (cfg.batch_size, frames), generator=g),
            "acoustic": torch.randint(0, cfg.acoustic_codebook,
                                      (cfg.batch_size, cfg.coarse_levels + cfg.fine_levels, frames * ratio), generator=g)}


def bench_train(configs: list[str], repeats: int, overrides: list[str] = ()) -> dict:
    """Median training-step time and audio-seconds per second of each config, measured alternately."""
    from common.config import load_config
    steps = {}
    for path in configs:
        torch.manual_seed(0)
        cfg = load_config(StageConfig, path, overrides)
        stage = build_stage(cfg)
        opt = torch.optim.AdamW(stage.model.parameters(), lr=1e-4)
        batch = random_batch(cfg, torch.Generator().manual_seed(0))

        def step(stage=stage, opt=opt, batch=batch):
            loss = stage.loss(batch, torch.zeros(len(batch["mulan"]), dtype=torch.bool))["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        steps[path] = (cfg, stage, step, [])
        step()   # warm-up
    for _ in range(repeats):
        for cfg, stage, step, times in steps.values():
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
    res = {"threads": torch.get_num_threads(), "repeats": repeats}
    for path, (cfg, stage, _, times) in steps.items():
        med = statistics.median(times)
        res[path] = {"kind": cfg.kind, "role": cfg.role, "parameters_M": round(sum(p.numel() for p in stage.model.parameters()) / 1e6, 2),
                     "batch": cfg.batch_size, "window_s": cfg.window_seconds, "step_s": round(med, 3),
                     "audio_seconds_per_s": round(cfg.batch_size * cfg.window_seconds / med, 2)}
    first = res[configs[0]]["audio_seconds_per_s"]
    for path in configs[1:]:
        res[path]["speed_vs_first"] = round(res[path]["audio_seconds_per_s"] / first, 2)
    return res


def bench_pipeline(variants: dict[str, dict[str, str]], durations: list[float], out_dir: str, repeats: int = 3,
                   int8: bool = False, text: str = "a calm solo piano piece in C major") -> dict:
    """Median wall time from loaded models to a written WAV over `repeats` runs (after one short
    warm-up run), per duration, and peak RSS of the process; `int8`: stages generate with int8 weights.
    Several chains (`variants`: name -> part paths) are timed side by side: each repeat runs every
    chain once, in turn, so a noisy machine slows them alike; ratios are to the first chain. `text`: the prompt
    (one that states a bpm times what only such prompts run, e.g. a semantic stage exported with beat_pick)."""
    import resource
    from pathlib import Path

    from data.audio import write_wav
    from pipeline import GenerationOptions, Pipeline, load_parts
    pipes = {name: Pipeline(load_parts(paths), int8=int8) for name, paths in variants.items()}
    for pipe in pipes.values():
        pipe.generate(["warm-up"], 2.0)
    res = {"repeats": repeats, "int8": int8}
    for seconds in durations:
        times = {name: [] for name in pipes}
        for i in range(repeats):
            for name, pipe in pipes.items():
                t = time.perf_counter()
                wav = pipe.generate([text], seconds, options=GenerationOptions(seed=i))
                write_wav(Path(out_dir) / f"bench_{name}_{seconds:g}s.wav", wav[0, 0].numpy(), pipe.sample_rate)
                times[name].append(time.perf_counter() - t)
        for name, pipe in pipes.items():
            row = res.setdefault(name, {})
            row[f"wall_s@{seconds:g}s"] = round(statistics.median(times[name]), 2)
            row[f"all_wall_s@{seconds:g}s"] = [round(x, 2) for x in times[name]]
            row[f"stages@{seconds:g}s"] = {k: round(v, 2) for k, v in pipe.timings.items()}   # of the last run
        first = next(iter(pipes))
        for name in list(pipes)[1:]:
            res[name][f"speedup_over_{first}@{seconds:g}s"] = round(
                res[first][f"wall_s@{seconds:g}s"] / res[name][f"wall_s@{seconds:g}s"], 2)
    if len(durations) > 1:
        for name in pipes:
            res[name]["ratio_longest_to_shortest"] = round(
                res[name][f"wall_s@{durations[-1]:g}s"] / res[name][f"wall_s@{durations[0]:g}s"], 2)
    res["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return res


def parse_variant(item: str, base: list[str]) -> tuple[str, list[str]]:
    """'NAME:part=PATH,part=PATH' (parts not named come from --stage / configs/pipeline.yaml)."""
    from common.errors import UserError
    name, sep, spec = item.partition(":")
    if not sep or not name:
        raise UserError(f"--variant {item!r}: write NAME:PART=PATH,PART=PATH (or NAME: for the default chain)")
    return name, base + [x for x in spec.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description="Benchmarks (run on an idle machine).")
    ap.add_argument("what", choices=["stages", "pipeline", "train"])
    ap.add_argument("--configs", nargs="+", default=["configs/coarse.yaml", "configs/delay.yaml"],
                    help="train: stage configs to compare")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="train: overrides for every config")
    ap.add_argument("--repeats", type=int, default=5, help="stages: timed runs; pipeline: runs per duration (use 3)")
    ap.add_argument("--gen-tokens", type=int, default=750, help="coarse tokens to generate (750 = 5 s)")
    ap.add_argument("--stage", action="append", default=[], metavar="NAME=PATH", help="pipeline: swap a part")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:PART=PATH,...",
                    help="pipeline: time several chains side by side (repeat the option; 'NAME:' = default chain)")
    ap.add_argument("--durations", type=float, nargs="+", default=[10.0, 60.0])
    ap.add_argument("--text", default="a calm solo piano piece in C major", help="pipeline: the prompt")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--int8", action="store_true", help="pipeline: the stages generate with int8 weights")
    ap.add_argument("--out", default="/tmp")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what == "stages":
        print(json.dumps(bench_stages(args.repeats, args.gen_tokens), indent=2))
        return
    if args.what == "train":
        print(json.dumps(bench_train(args.configs, args.repeats, args.set), indent=2))
        return
    from common.errors import UserError, run_cli
    from pipeline_cli import part_paths

    def run() -> None:
        items = [parse_variant(v, args.stage) for v in args.variant] or [("chain", args.stage)]
        if len({name for name, _ in items}) < len(items):
            raise UserError("--variant: give each chain its own name")
        variants = {name: part_paths(stage_items) for name, stage_items in items}   # bad paths fail before timing
        print(json.dumps(bench_pipeline(variants, args.durations, args.out, args.repeats, args.int8, args.text), indent=2))
    run_cli(run)


if __name__ == "__main__":
    main()
