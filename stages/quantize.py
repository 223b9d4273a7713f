"""Weight-only int8 for batch-1 generation on CPU.

Generating one token reads every weight of the model once and does little arithmetic with it,
so on CPU it is bound by memory traffic: B1's 19 MB of fp32 weights per token. Storing the
block matrices as int8 with one scale per output row (torch's `_weight_int8pack_mm`, with
bf16 activations and scales) reads a quarter of the bytes; on this project's 2-core
machine a cold 256x1024 matvec takes ~28 us instead of ~92 us (evaluation/bench.py measures
the whole model). Longer chunks (the prompt, teacher-forced loss) keep the float weights,
where the int8 kernel is the slower one, unless `max_rows=None`.

    quantize_int8(stage.model)                   # in place; generation then uses int8
    python -m stages.quantize --checkpoint pretrained/coarse --cache cache

The command prints the held-out loss and accuracy of a stage with float and with int8
weights (all rows int8), the measure of what the quantization costs.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn as nn

from common.errors import UserError, run_cli


class Int8Linear(nn.Module):
    """An nn.Linear whose weight [N, K] is also kept as int8 rows times a per-row scale."""

    def __init__(self, linear: nn.Linear, max_rows: int | None = 8):
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(1).clamp_min(1e-12) / 127).to(torch.bfloat16)  # the scale the kernel will use
        self.register_buffer("qweight", (w / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.linear, self.max_rows = linear, max_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[:-1].numel()
        if self.max_rows is not None and rows > self.max_rows:
            return self.linear(x)
        y = torch._weight_int8pack_mm(x.reshape(rows, -1).to(torch.bfloat16), self.qweight, self.scale)
        y = y.to(x.dtype).view(*x.shape[:-1], -1)
        return y if self.linear.bias is None else y + self.linear.bias


def quantize_int8(model: nn.Module, max_rows: int | None = 8) -> nn.Module:
    """Swap the Linear layers inside the transformer blocks for Int8Linear, in place; for inference
    only (the float weights stay and are what training would update). Returns the model."""
    if not hasattr(torch, "_weight_int8pack_mm"):
        raise UserError(f"int8 generation needs torch's _weight_int8pack_mm, missing in torch {torch.__version__}; "
                        "run without --int8")
    for block in model.blocks:
        for parent in (block, block.mlp):
            for name, child in parent.named_children():
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear(child, max_rows))
    return model


def main() -> None:
    from data.tokenize import TokenCache
    from stages.base import load_stage
    from stages.train import evaluate

    ap = argparse.ArgumentParser(prog="python -m stages.quantize", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="a stage checkpoint folder")
    ap.add_argument("--cache", required=True, help="the token cache it was trained on (its valid split is scored)")
    ap.add_argument("--batches", type=int, default=None, help="held-out batches (default: the config's eval_batches)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    stage = load_stage(args.checkpoint)
    if args.batches:
        stage.cfg.eval_batches = args.batches
    cache = TokenCache(args.cache)
    results = {"float": evaluate(stage, cache, stage.cfg)}
    quantize_int8(stage.model, max_rows=None)
    results["int8"] = evaluate(stage, cache, stage.cfg)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    run_cli(main)
