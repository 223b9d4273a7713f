"""Torch datasets over manifests."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from common.errors import AudioError, UserError
from data.audio import crop_or_pad, load_audio
from data.manifest import SkipCounter


class ClipDataset(torch.utils.data.Dataset):
    """Fixed-length training crops `[1, N]` from a manifest; a broken file is skipped (the
    next row is used instead) and counted in `self.skips`."""

    def __init__(self, rows: list[dict[str, Any]], sample_rate: int, num_samples: int,
                 random_crop: bool = True, seed: int = 0):
        if not rows:
            raise UserError("the manifest has no rows; check its path and contents")
        self.rows, self.sample_rate, self.num_samples = rows, sample_rate, num_samples
        self.random_crop, self.seed, self.epoch = random_crop, seed, 0
        self.skips = SkipCounter()
        self.bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> torch.Tensor:
        for k in range(len(self.rows)):
            j = (i + k) % len(self.rows)
            if j in self.bad:
                continue
            try:
                wav = load_audio(self.rows[j]["audio"], self.sample_rate)
            except AudioError as e:
                self.bad.add(j)
                self.skips.add(e)
                continue
            rng = np.random.default_rng([self.seed, self.epoch, i]) if self.random_crop else None
            return torch.from_numpy(crop_or_pad(wav, self.num_samples, rng).copy())[None]
        raise UserError(f"no readable audio in the manifest; {self.skips.summary()}")
