"""The one training loop of the three stages (`python -m stages.semantic|coarse|fine`).

Each step's batch (rows, window starts, condition-dropout mask) comes from a generator seeded
by (seed, step), so `--resume` continues exactly and every DDP rank agrees on the global
batch; rank r trains on rows r, r + world, ... of it. Under `torchrun --nproc_per_node=N`
it runs DistributedDataParallel (gloo on CPU, NCCL on GPU) with bf16 autocast on CUDA.
"""
from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from common.config import config_to_dict, format_config, load_config, parse_args_with_overrides
from common.errors import UserError, run_cli
from common.training import StopFlag, log_jsonl, resume_run, save_run, warmup_cosine
from data.tokenize import TokenCache
from stages.base import StageConfig, build_stage, save_stage


def check_cache(cfg: StageConfig, cache: TokenCache) -> None:
    """Refuse a cache whose vocabularies, levels or frame rates differ from the stage's."""
    ix, wrong = cache.index, []
    expect = [("mulan codebook", cfg.mulan_codebook, ix["mulan"]["codebook"]),
              ("semantic codebook", cfg.semantic_codebook, ix["semantic"]["codebook"]),
              ("semantic frame rate", cfg.semantic_rate, ix["semantic"]["frame_rate"]),
              ("acoustic codebook", cfg.acoustic_codebook, ix["acoustic"]["codebook"]),
              ("acoustic frame rate", cfg.acoustic_rate, ix["acoustic"]["frame_rate"])]
    wrong = [f"{name} {a} (config) vs {b} (cache)" for name, a, b in expect if abs(float(a) - float(b)) > 1e-6]
    made_by = ix["semantic"].get("fingerprint", "")   # caches from before fingerprints have none
    if cfg.semantic_tokens and made_by and cfg.semantic_tokens != made_by:
        wrong.append(f"semantic tokenizer {cfg.semantic_tokens} (config) vs {made_by} (cache)")
    if cfg.mulan_levels > ix["mulan"]["levels"]:
        wrong.append(f"mulan_levels = {cfg.mulan_levels} but the cache has {ix['mulan']['levels']} levels")
    if cfg.cond_source not in ("audio", "text", "mix"):
        wrong.append(f"cond_source={cfg.cond_source!r} is not audio, text or mix")
    elif cfg.cond_source != "audio" and "mulan_text" not in cache.arrays:
        wrong.append(f"cond_source={cfg.cond_source} needs text tokens (python -m data.tokenize --text-only ...)")
    if cfg.coarse_levels + cfg.fine_levels > ix["acoustic"]["levels"]:
        wrong.append(f"coarse_levels + fine_levels = {cfg.coarse_levels + cfg.fine_levels} but the codec has "
                     f"{ix['acoustic']['levels']} levels")
    if wrong:
        raise UserError(f"the cache {cache.root} does not fit this {cfg.kind} config: {'; '.join(wrong)}")


def batch_at(cache: TokenCache, rows: np.ndarray, cfg: StageConfig, step: int, batch: int, rank: int = 0,
             world: int = 1, seed_offset: int = 0, train: bool = True) -> tuple[dict, torch.Tensor]:
    """The global batch of `step` (a function of seed and step only), this rank's share of it. With
    train=False the condition is left as it is (the clip's audio tokens) for the evaluation to choose."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 7 + seed_offset)
    pick = rows[torch.randint(len(rows), (batch,), generator=g).numpy()]
    total = cache.arrays["semantic"].shape[1]
    frames = min(total, int(round(cfg.window_seconds * cfg.semantic_rate)))
    starts = torch.randint(0, total - frames + 1, (batch,), generator=g).numpy()
    drop = torch.rand(batch, generator=g) < cfg.cond_dropout
    ratio = int(round(cfg.acoustic_rate / cfg.semantic_rate))
    mine = slice(rank, None, world)
    draws = condition_draws(cfg, g, batch)
    b = cache.window(pick[mine], starts[mine], frames, ratio)
    b["mulan"] = training_condition(b, cfg, *(d[mine] for d in draws)) if train else b["mulan"][:, : cfg.mulan_levels]
    return b, drop[mine]


def condition_draws(cfg: StageConfig, g: torch.Generator, batch: int) -> tuple[torch.Tensor, ...]:
    """Per row of the global batch: text or audio condition, which caption, how many levels kept, whether cut."""
    use_text = torch.rand(batch, generator=g) < {"audio": 0.0, "text": 1.0, "mix": cfg.cond_text_prob}.get(cfg.cond_source, 0.0)
    which = torch.randint(0, 1 << 30, (batch,), generator=g)
    keep = torch.randint(1, max(2, cfg.mulan_levels), (batch,), generator=g)
    cut = torch.rand(batch, generator=g) < cfg.cond_level_dropout
    return use_text, which, keep, cut


def training_condition(b: dict, cfg: StageConfig, use_text, which, keep, cut) -> torch.Tensor:
    """The MuLan tokens [B, Q_m] a training row is conditioned on: its audio's, or (cond_source text/mix) those
    of one of its captions; rows that are `cut` keep only their first `keep` levels, the rest null (level
    dropout). The draws come from the step's generator, so DDP ranks and a resumed run agree."""
    m = b["mulan"][:, : cfg.mulan_levels]
    if "mulan_text" in b:
        text = b["mulan_text"][torch.arange(len(m)), which % b["mulan_text"].shape[1], : cfg.mulan_levels]
        m = torch.where(use_text[:, None], text, m)
    levels = torch.arange(cfg.mulan_levels)[None]
    return torch.where(cut[:, None] & (levels >= keep[:, None]), cfg.mulan_codebook, m)


def with_condition(b: dict, name: str, cfg: StageConfig) -> tuple[dict, torch.Tensor | None]:
    """A held-out batch under one condition: the clip's audio tokens, another clip's (the next row's), the
    null condition, or the text tokens of its own caption (text) or of a re-phrasing of it (text_new)."""
    m, drop = b["mulan"][:, : cfg.mulan_levels], None
    if name == "other":
        m = m.roll(1, 0)
    elif name == "null":
        drop = torch.ones(len(m), dtype=torch.bool)
    elif name in ("text", "text_new"):
        m = b["mulan_text"][:, 0 if name == "text" else min(1, b["mulan_text"].shape[1] - 1), : cfg.mulan_levels]
    return {**b, "mulan": m}, drop


def condition_names(stage, cache: TokenCache) -> list[str]:
    """The conditions a stage is scored under: the one it trains on first."""
    if stage.role == "fine":
        return ["audio"]
    text = ["text", "text_new"] if "mulan_text" in cache.arrays else []
    first = "text" if stage.cfg.cond_source != "audio" and text else "audio"
    return [first] + [n for n in ["audio", "other", "null", *text] if n != first]


@torch.no_grad()
def evaluate(stage, cache: TokenCache, cfg: StageConfig, device: torch.device, conditions: list[str] | None = None) -> dict:
    """Held-out loss and accuracy per level on fixed valid windows under the condition the stage trains on
    (its audio tokens, or for cond_source text/mix its caption's), and for a stage that reads a condition the
    loss under each other one ("cond/NAME": another clip's, null, text): null minus own is what it carries."""
    rows = cache.rows("valid") if len(cache.rows("valid")) else cache.rows("train")
    conditions = conditions or condition_names(stage, cache)
    model, totals = stage.model, {name: {} for name in conditions}
    model.eval()
    for i in range(cfg.eval_batches):
        b, _ = batch_at(cache, rows, cfg, i, cfg.batch_size, seed_offset=99991, train=False)
        for name in conditions:
            out = stage.loss(*with_condition(b, name, cfg))
            for level, (ce, correct, n) in out["per_level"].items():
                t = totals[name].setdefault(level, [0.0, 0, 0])
                t[0], t[1], t[2] = t[0] + float(ce), t[1] + int(correct), t[2] + n
    model.train()
    names, main = stage.level_names(), totals[conditions[0]]
    res = {f"loss/{names[l]}": round(v[0] / v[2], 4) for l, v in sorted(main.items())}
    res.update({f"acc/{names[l]}": round(v[1] / v[2], 4) for l, v in sorted(main.items())})
    n = sum(v[2] for v in main.values())
    res["loss"] = round(sum(v[0] for v in main.values()) / n, 4)
    res["acc"] = round(sum(v[1] for v in main.values()) / n, 4)
    if len(conditions) > 1:
        res.update({f"cond/{name}": round(sum(v[0] for v in t.values()) / n, 4) for name, t in totals.items()})
    return res


def train(cfg: StageConfig, resume: bool = False, stop_after: int | None = None) -> Path:
    """Train (or resume) a stage; `stop_after` ends this run at that step, as a kill would, so a
    later --resume continues the same schedule (useful for time-boxed sessions)."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.set_num_threads(max(1, cfg.threads // world))
    if rank == 0:
        print(format_config(cfg), flush=True)
    cache = TokenCache(cfg.cache)
    check_cache(cfg, cache)
    cfg.semantic_tokens = cfg.semantic_tokens or cache.index["semantic"].get("fingerprint", "")
    if cfg.batch_size % world:
        raise UserError(f"batch_size={cfg.batch_size} must be divisible by the {world} processes")
    torch.manual_seed(cfg.seed)
    stage = build_stage(cfg)
    model = stage.model.to(device)
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    ema = copy.deepcopy(model).eval() if cfg.ema > 0 else None
    out, step = Path(cfg.out), 0
    if resume:
        state = resume_run(out, cfg.kind, model, opt)
        step = state["step"]
        if ema is not None and "ema" in state:
            ema.load_state_dict(state["ema"])
    rows = cache.rows("train")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    stop, t0, seen = StopFlag(), time.time(), 0
    bar = tqdm(total=cfg.steps, initial=step, desc=cfg.kind, mininterval=2.0, disable=rank != 0)

    def save() -> None:
        if rank == 0:
            save_run(out, cfg.kind, config_to_dict(cfg), model, opt, step,
                     {"ema": ema.state_dict()} if ema is not None else None)

    while step < cfg.steps and not stop.now and (stop_after is None or step < stop_after):
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, cfg.lr, cfg.warmup, cfg.steps)
        total = 0.0
        for micro in range(cfg.grad_accum):
            b, drop = batch_at(cache, rows, cfg, step * cfg.grad_accum + micro, cfg.batch_size, rank, world)
            with autocast:
                loss = stage.loss(b, drop, wrapped)["loss"] / cfg.grad_accum
            loss.backward()
            total += loss.item()
            seen += b["acoustic"].shape[0] * b["acoustic"].shape[-1] / cfg.acoustic_rate * world  # audio seconds
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(p, 1 - cfg.ema)
        step += 1
        if world > 1:
            t = torch.tensor([total], device=device)
            dist.all_reduce(t)
            total = float(t) / world
        bar.update(1)
        if rank == 0 and (step % cfg.log_every == 0 or step == 1):
            rate = seen / (time.time() - t0)
            bar.set_postfix(loss=f"{total:.3f}", audio_s=f"{rate:.1f}")
            log_jsonl(out, {"step": step, "loss": total, "lr": warmup_cosine(step, cfg.lr, cfg.warmup, cfg.steps),
                            "audio_seconds_per_s": round(rate, 2)})
        if rank == 0 and (step % cfg.eval_every == 0 or step == cfg.steps):
            log_jsonl(out, {"step": step, "valid": evaluate(stage, cache, cfg, device)}, echo=True)
        if step % cfg.ckpt_every == 0:
            save()
    save()
    bar.close()
    if rank == 0 and step == cfg.steps:
        save_stage(stage, out / "model", meta={"steps": step, "tokenizer_hashes": cache.index["tokenizer_hashes"]},
                   state_dict=(ema or model).state_dict())
        print(f"saved {out / 'model'}", flush=True)
    if world > 1:
        dist.barrier()   # leave together: a rank tearing down gloo while rank 0 still saves can abort (seen once in CI)
        dist.destroy_process_group()
    return out / "model"


def main(kind: str) -> None:
    def run() -> None:
        ap = argparse.ArgumentParser(prog=f"python -m stages.{kind}", description=f"Train the {kind} stage.")
        ap.add_argument("--config", default=f"configs/{kind}.yaml")
        ap.add_argument("--resume", action="store_true")
        ap.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                        help="save and stop at this step (continue later with --resume)")
        ap.add_argument("overrides", nargs="*", help="key=value")
        args = parse_args_with_overrides(ap)
        cfg = load_config(StageConfig, args.config, args.overrides)
        if cfg.kind != kind:
            raise UserError(f"{args.config} is a '{cfg.kind}' config; use python -m stages.{cfg.kind}")
        train(cfg, resume=args.resume, stop_after=args.stop_after)
    run_cli(run)
