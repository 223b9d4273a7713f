"""The one training loop every trainer uses: stages, the acoustic codec, the semantic tokenizer, MuLan.

A trainer is a `Task`: its model, the loss of one micro-batch, an evaluation and an export. The
loop owns the rest: device (cuda/cpu, `device=`), torchrun DDP (gloo on CPU, NCCL on GPU), bf16
autocast on CUDA, gradient accumulation, clipping, EMA of the weights, warmup + cosine, the eval /
log / checkpoint cadence, SIGINT/SIGTERM, `--stop-after`, exact resume, tqdm, and the out dir:
a lock (a second run into it exits naming the first), leftovers of killed saves removed, and a
resume that refuses a changed config (only the run-length fields may change).

Every batch is a function of (seed, step, micro-batch) alone (the task draws it from
`step_generator`), so a resumed run continues exactly and every DDP rank agrees on the global
batch; rank r trains on rows r, r + world, ... of it.
"""
from __future__ import annotations

import copy
import json
import math
import os
import signal
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from tqdm import tqdm

from common.checkpoint import load_checkpoint, pid_alive, recover, rng_state, save_checkpoint, set_rng_state
from common.config import config_to_dict, format_config
from common.errors import ConfigError, UserError

# Fields a resumed run may change: the run length, the cadences, where it runs, where things are (a moved
# token cache; what made its tokens is checked by `fingerprints`). Any other change is refused.
RUN_LENGTH_FIELDS = ("steps", "log_every", "eval_every", "ckpt_every", "threads", "device", "out", "cache")


@dataclass
class RunConfig:
    """The run fields every trainable part's config has (its YAML stays flat)."""
    out: str = "runs/run"
    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup: int = 100
    grad_clip: float = 1.0
    ema: float = 0.0                  # EMA decay of the weights (the export uses them); 0 disables
    log_every: int = 50
    eval_every: int = 500
    ckpt_every: int = 500
    seed: int = 0
    threads: int = 2
    device: str = "auto"              # auto (cuda if there is one) | cpu | cuda | cuda:N

    def __post_init__(self) -> None:
        check_fields(self, positive=("steps", "batch_size", "grad_accum", "log_every", "eval_every", "ckpt_every",
                                     "threads", "lr", "grad_clip"),
                     at_least_zero=("weight_decay", "warmup", "seed"), below_one=("ema",))
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device={self.device!r}: use auto, cpu, cuda or cuda:N")


def check_fields(cfg: Any, positive: tuple = (), at_least_zero: tuple = (), below_one: tuple = (),
                 unit: tuple = ()) -> None:
    """One-line errors for values no run can use: non-finite numbers anywhere, and the given range checks."""
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{f.name}={v} must be a finite number")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be greater than 0")
    for name in at_least_zero:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be 0 or more")
    for name in below_one:
        if not 0 <= getattr(cfg, name) < 1:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be in [0, 1)")
    for name in unit:
        if not 0 <= getattr(cfg, name) <= 1:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be in [0, 1]")


class Task(Protocol):
    kind: str                      # the checkpoint kind of OUT/last
    model: torch.nn.Module         # what the optimizer trains and OUT/last stores
    # optional: train_module, a module around `model` whose forward computes the loss (what DDP wraps)

    def loss(self, model: torch.nn.Module, step: int, micro: int, rank: int, world: int
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """The mean loss of this rank's share of micro-batch `micro` of `step`, and numbers to log ("_seen": the
        audio seconds it trained on, for the throughput). `model` is the DDP wrapper (or self.model); the batch
        comes from step_generator(seed, step, micro)."""

    def evaluate(self, model: torch.nn.Module) -> dict:
        """Held-out numbers (rank 0 only)."""

    def finish(self, model: torch.nn.Module) -> Path:
        """After the last step (rank 0 only; `model` holds the EMA weights if any): the artifact, e.g. OUT/model."""


def step_generator(seed: int, step: int, micro: int = 0, offset: int = 0) -> torch.Generator:
    """The generator a task draws a batch from: a function of (seed, step, micro-batch) only."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 7 + micro * 7_919 + offset)


def warmup_cosine(step: int, lr: float, warmup: int, total: int, floor: float = 0.05) -> float:
    """Linear warmup to `lr`, then cosine decay to `floor * lr` at `total` steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def choose_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={name} but this machine has no CUDA device (torch {torch.__version__}); "
                        "use device=cpu or device=auto")
    return torch.device(f"cuda:{local_rank}" if name == "cuda" else name)


class StopFlag:
    """Set by SIGINT/SIGTERM so the loop can save a checkpoint and exit cleanly."""

    def __init__(self) -> None:
        self.now = False
        signal.signal(signal.SIGTERM, self._set)
        signal.signal(signal.SIGINT, self._set)

    def _set(self, *_: Any) -> None:
        self.now = True


def log_jsonl(out: Path, record: dict, echo: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if echo:
        tqdm.write(json.dumps(record))


class OutDirLock:
    """OUT/.lock holds the PID of the run writing OUT; a second run refuses, a dead PID's lock is taken over."""

    def __init__(self, out: Path):
        self.path = out / ".lock"
        out.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and pid_alive(pid):
                    raise UserError(f"{out} is being written by the run with PID {pid}; wait for it, stop it, "
                                    "or choose another out=") from None
                self.path.unlink(missing_ok=True)   # stale: its run is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


def check_resume(saved: dict, new: dict, out: Path, defaults: dict | None = None) -> None:
    """Refuse to continue a run whose config changed in anything but the run-length fields. A field
    the saved config lacks (added to the code since the run began) counts as its default, so a run
    can continue after the code grows an option as long as the option keeps its default."""
    saved = {**{k: v for k, v in (defaults or {}).items() if k not in saved}, **saved}
    changed = [f"{k} ({saved.get(k)!r} -> {new.get(k)!r})" for k in sorted(set(saved) | set(new))
               if k not in RUN_LENGTH_FIELDS and saved.get(k) != new.get(k)]
    if changed:
        raise UserError(f"--resume: {out / 'last'} was trained with another config: {', '.join(changed)}; "
                        "resume with the same values (only steps and the cadences may change) or start a new out=")


def optimizer_for(model: torch.nn.Module, cfg: RunConfig, betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms, biases, or 1-d parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=betas)


def run(task: Task, cfg: RunConfig, resume: bool = False, stop_after: int | None = None,
        betas: tuple[float, float] = (0.9, 0.95), extra_state: dict | None = None,
        fingerprints: dict | None = None) -> Path:
    """Train `task` to cfg.steps (or `stop_after`, as a kill would, to --resume later). Returns OUT/last, or the
    task's artifact once the last step is done. `extra_state`: tensors the task keeps beside the weights (e.g.
    targets fitted before step 0), saved in the train state and copied back in place on resume.
    `fingerprints`: what the data was made by (e.g. a token cache's tokenizer hashes); a resume refuses others."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = choose_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)))
    if cfg.batch_size % world:
        raise UserError(f"batch_size={cfg.batch_size} must be divisible by the {world} processes")
    out = Path(cfg.out)
    lock = OutDirLock(out) if rank == 0 else None
    try:
        if world > 1:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        torch.set_num_threads(max(1, cfg.threads // world))
        if rank == 0:
            print(format_config(cfg), flush=True)
        return _loop(task, cfg, resume, stop_after, betas, extra_state or {}, fingerprints or {}, world, rank,
                     device, out)
    finally:
        if world > 1 and dist.is_initialized():
            dist.barrier()   # leave together: a rank tearing down gloo while rank 0 still saves can abort
            dist.destroy_process_group()
        if lock is not None:
            lock.release()


def _loop(task, cfg, resume, stop_after, betas, extra_state, fingerprints, world, rank, device, out) -> Path:
    model = task.model.to(device)
    trainable = getattr(task, "train_module", model).to(device)   # a module whose forward is the loss, if not model
    wrapped = torch.nn.parallel.DistributedDataParallel(trainable) if world > 1 else trainable
    opt = optimizer_for(model, cfg, betas)
    ema = copy.deepcopy(model).eval() if cfg.ema > 0 else None
    step = 0
    if rank == 0:
        recover(out / "last")    # leftovers of a killed save: back in place or removed
    if world > 1:
        dist.barrier()
    if resume:
        ck = load_checkpoint(out / "last", kind=task.kind, with_train_state=True)
        if ck.train_state is None:
            raise UserError(f"{out / 'last'} has no training state to resume from; start a new out=")
        check_resume(ck.config, config_to_dict(cfg), out, config_to_dict(type(cfg)()))
        saved = ck.train_state.get("fingerprints", {})
        if saved and saved != fingerprints:
            raise UserError(f"--resume: {out / 'last'} was trained on data made by {saved}, not by {fingerprints}; "
                            "resume on the same data (cache) or start a new out=")
        model.load_state_dict(ck.state_dict)
        opt.load_state_dict(ck.train_state["optimizer"])
        set_rng_state(ck.train_state["rng"])
        step = ck.train_state["step"]
        if ema is not None:
            ema.load_state_dict(ck.train_state["ema"])
        for key, value in (extra_state or {}).items():
            value.copy_(ck.train_state["extra"][key])
        if rank == 0:
            print(f"resumed from {out / 'last'} at step {step}", flush=True)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    stop, t0, seen = StopFlag(), time.time(), 0
    bar = tqdm(total=cfg.steps, initial=step, desc=task.kind, mininterval=2.0, disable=rank != 0)

    def save() -> None:
        if rank == 0:
            state = {"step": step, "optimizer": opt.state_dict(), "rng": rng_state(),
                     **({"ema": ema.state_dict()} if ema is not None else {}),
                     "fingerprints": fingerprints, **({"extra": dict(extra_state)} if extra_state else {})}
            save_checkpoint(out / "last", task.kind, config_to_dict(cfg), model.state_dict(), meta={"step": step},
                            train_state=state)

    while step < cfg.steps and not stop.now and (stop_after is None or step < stop_after):
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, cfg.lr, cfg.warmup, cfg.steps)
        total, logs = 0.0, {}
        for micro in range(cfg.grad_accum):
            with autocast:
                loss, logs = task.loss(wrapped, step, micro, rank, world)
            (loss / cfg.grad_accum).backward()
            total += float(loss.detach()) / cfg.grad_accum
        seen += logs.pop("_seen", 0) * world
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
            rate = seen / max(time.time() - t0, 1e-9)
            bar.set_postfix(loss=f"{total:.3f}")
            log_jsonl(out, {"step": step, "loss": total, "lr": warmup_cosine(step, cfg.lr, cfg.warmup, cfg.steps),
                            **({"audio_seconds_per_s": round(rate, 2)} if seen else {}), **logs})
        if rank == 0 and (step % cfg.eval_every == 0 or step == cfg.steps):
            log_jsonl(out, {"step": step, "valid": task.evaluate(ema or model)}, echo=True)
        if step % cfg.ckpt_every == 0:
            save()
    save()
    bar.close()
    if step < cfg.steps:
        if rank == 0:
            print(f"stopped at step {step}; continue with --resume", flush=True)
        return out / "last"
    return task.finish(ema or model) if rank == 0 else out / "last"
