"""Residual vector quantization (SoundStream / EnCodec style), trainable.

Each level quantizes the residual left by the previous ones:

    r_0 = x;  q_l = codebook_l[argmin ||r_l - c||];  r_{l+1} = r_l - q_l;  x_hat = sum_l q_l

Training follows SoundStream: codebooks are initialised by k-means on the first batch,
updated by exponential moving averages of the vectors assigned to them (not by gradients),
codes that fall out of use are restarted on random current vectors, the encoder gets a
straight-through gradient and a commitment loss, and quantizer dropout trains every prefix
of levels so that fewer levels still decode.

Shapes: vectors `[B, D, T]`, codes `[B, Q, T]` (Q levels, ids in [0, K)).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def kmeans(x: torch.Tensor, k: int, iters: int = 10, seed: int = 0) -> torch.Tensor:
    """Plain k-means on rows of x [N, D] -> centroids [k, D] (rows repeat if N < k)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(x), (k,), generator=g) if len(x) < k else torch.randperm(len(x), generator=g)[:k]
    centroids = x[idx.to(x.device)].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centroids).argmin(1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1).to(x.dtype)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
    return centroids


class VectorQuantizer(nn.Module):
    """One codebook of `size` vectors of `dim`, EMA-updated."""

    def __init__(self, dim: int, size: int, decay: float = 0.99, dead_threshold: float = 0.5):
        super().__init__()
        self.size, self.decay, self.dead_threshold = size, decay, dead_threshold
        self.register_buffer("codebook", torch.zeros(size, dim))
        self.register_buffer("ema_count", torch.ones(size))
        self.register_buffer("ema_sum", torch.zeros(size, dim))
        self.register_buffer("initialized", torch.tensor(False))

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, D] -> nearest code ids [N]."""
        dist = x.pow(2).sum(1, keepdim=True) - 2 * x @ self.codebook.t() + self.codebook.pow(2).sum(1)
        return dist.argmin(1)

    def forward(self, x: torch.Tensor, update: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> (quantized [N, D] (no gradient), ids [N]); updates codebooks in training."""
        if self.training and update:
            self._update(x.detach())
        ids = self.assign(x.detach())
        return self.codebook[ids], ids

    @torch.no_grad()
    def _update(self, x: torch.Tensor) -> None:
        if not bool(self.initialized):
            self.codebook.copy_(kmeans(x.float(), self.size))
            self.ema_sum.copy_(self.codebook)
            self.ema_count.fill_(1.0)
            self.initialized.fill_(True)
        ids = self.assign(x)
        counts = torch.bincount(ids, minlength=self.size).to(x.dtype)
        sums = torch.zeros_like(self.ema_sum).index_add_(0, ids, x)
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.ema_count.sum()
        smoothed = (self.ema_count + 1e-5) / (n + self.size * 1e-5) * n  # Laplace smoothing
        self.codebook.copy_(self.ema_sum / smoothed.unsqueeze(1))
        dead = self.ema_count < self.dead_threshold
        if dead.any():  # restart unused codes on random vectors of this batch
            pick = torch.randint(len(x), (int(dead.sum()),), device=x.device)
            self.codebook[dead] = x[pick]
            self.ema_sum[dead] = x[pick]
            self.ema_count[dead] = 1.0


class ResidualVQ(nn.Module):
    def __init__(self, dim: int, num_quantizers: int, codebook_size: int, decay: float = 0.99,
                 quantizer_dropout: float = 0.0):
        super().__init__()
        self.num_quantizers, self.codebook_size = num_quantizers, codebook_size
        self.quantizer_dropout = quantizer_dropout
        self.levels = nn.ModuleList(VectorQuantizer(dim, codebook_size, decay) for _ in range(num_quantizers))

    def forward(self, x: torch.Tensor, n_q: int | None = None) -> dict[str, torch.Tensor]:
        """x [B, D, T] -> {"quantized" [B, D, T] (straight-through), "codes" [B, n_q, T],
        "commit" (scalar loss), "perplexity" [n_q]}. In training, with probability
        `quantizer_dropout`, a random number of levels 1..Q is used for the whole batch."""
        B, D, T = x.shape
        if n_q is None:
            n_q = self.num_quantizers
            if self.training and torch.rand(()) < self.quantizer_dropout:
                n_q = int(torch.randint(1, self.num_quantizers + 1, ()))
        flat = x.permute(0, 2, 1).reshape(-1, D)
        synced = self.training and dist.is_available() and dist.is_initialized()
        if synced:   # DDP: every rank makes the codebook updates of the whole batch, as one process would
            self._update_global(x.detach(), n_q)
        residual, total = flat, torch.zeros_like(flat)
        codes, commit, perplexity = [], x.new_zeros(()), []
        for level in self.levels[:n_q]:
            q, ids = level(residual, update=not synced)
            commit = commit + F.mse_loss(residual, q.detach())
            total = total + q
            residual = residual - q.detach()
            codes.append(ids)
            p = torch.bincount(ids, minlength=self.codebook_size).float() / len(ids)
            perplexity.append(torch.exp(-(p * torch.log(p + 1e-10)).sum()))
        quantized = flat + (total - flat).detach()  # straight-through estimator
        return {"quantized": quantized.reshape(B, T, D).permute(0, 2, 1),
                "codes": torch.stack(codes, 1).reshape(B, T, n_q).permute(0, 2, 1),
                "commit": commit / n_q, "perplexity": torch.stack(perplexity)}

    @torch.no_grad()
    def _update_global(self, x: torch.Tensor, n_q: int) -> None:
        """Gather x [B_r, D, T] of every rank in the global batch order (rank r holds rows r, r + world, ...)
        and run the levels' EMA updates on it."""
        world = dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        x = torch.stack(parts, 1).reshape(-1, *x.shape[1:])          # [B_r, world, D, T] -> [B, D, T]
        residual = x.permute(0, 2, 1).reshape(-1, x.shape[1])
        for level in self.levels[:n_q]:
            level._update(residual)
            residual = residual - level.codebook[level.assign(residual)]

    @torch.no_grad()
    def encode(self, x: torch.Tensor, n_q: int | None = None) -> torch.Tensor:
        """x [B, D, T] -> codes [B, n_q, T] (no codebook updates)."""
        was = self.training
        self.eval()
        codes = self.forward(x, n_q or self.num_quantizers)["codes"]
        self.train(was)
        return codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, Q', T] (Q' <= Q levels, first levels first) -> vectors [B, D, T]."""
        out = 0
        for q in range(codes.shape[1]):
            out = out + self.levels[q].codebook[codes[:, q]]  # [B, T, D]
        return out.permute(0, 2, 1)

    @torch.no_grad()
    def fit(self, x: torch.Tensor, iters: int = 20) -> None:
        """Fit all levels by k-means on residuals of x [N, D] (no gradients; e.g. MuLan tokens)."""
        residual = x.float()
        for level in self.levels:
            level.codebook.copy_(kmeans(residual, self.codebook_size, iters))
            level.ema_sum.copy_(level.codebook)
            level.initialized.fill_(True)
            residual = residual - level.codebook[level.assign(residual)]
