"""Pieces every training command shares: the LR schedule, stopping on SIGINT/SIGTERM,
JSONL metric logs, and saving/resuming a run's `last` checkpoint with its training state."""
from __future__ import annotations

import json
import math
import signal
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from common.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state


def warmup_cosine(step: int, lr: float, warmup: int, total: int, floor: float = 0.05) -> float:
    """Linear warmup to `lr`, then cosine decay to `floor * lr` at `total` steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def optimizer_step(model: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor, lr: float,
                   clip: float) -> None:
    """Set the learning rate, backpropagate `loss`, clip the gradient norm, step."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()


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


def save_run(out: Path, kind: str, config: dict, model: torch.nn.Module, opt: torch.optim.Optimizer,
             step: int, extra: dict | None = None) -> None:
    """out/last: weights + config + everything --resume needs."""
    save_checkpoint(out / "last", kind, config, model.state_dict(), meta={"step": step},
                    train_state={"step": step, "optimizer": opt.state_dict(), "rng": rng_state(),
                                 **(extra or {})})


def resume_run(out: Path, kind: str, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Restore weights, optimizer and RNG from out/last; returns the training state (step, ...)."""
    ck = load_checkpoint(out / "last", kind=kind, with_train_state=True)
    model.load_state_dict(ck.state_dict)
    opt.load_state_dict(ck.train_state["optimizer"])
    set_rng_state(ck.train_state["rng"])
    print(f"resumed from {out / 'last'} at step {ck.train_state['step']}", flush=True)
    return ck.train_state
