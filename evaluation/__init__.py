"""Metrics, benchmarks and evaluation commands."""
import os


def use_threads(default: int = 2) -> None:
    """Torch threads for an evaluation command: OMP_NUM_THREADS when set, else `default` (the 2 cores). Two
    commands side by side must each be given 1: two 2-thread torch processes on 2 cores spin against each
    other and ran ~20x slower here."""
    import torch
    try:
        n = int(os.environ.get("OMP_NUM_THREADS", default))
    except ValueError:
        n = default
    torch.set_num_threads(max(1, n))
