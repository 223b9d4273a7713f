"""Spectral front ends shared by the tokenizers and the metrics: STFT, mel filterbanks,
and fast Griffin-Lim phase reconstruction.

Shapes: audio `[B, N]`, complex STFT `[B, F, T]` with F = n_fft // 2 + 1 bins and
T = N // hop + 1 frames (centred frames).
"""
from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=16)
def _window(n_fft: int, device: str = "cpu") -> torch.Tensor:
    return torch.hann_window(n_fft, device=device)


def stft(x: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """[B, N] -> complex [B, F, T]. Reflect padding at the edges, zeros for very short input."""
    pad_mode = "reflect" if x.shape[-1] > n_fft // 2 else "constant"
    return torch.stft(x, n_fft, hop, window=_window(n_fft, str(x.device)), center=True, pad_mode=pad_mode,
                      return_complex=True)


def istft(spec: torch.Tensor, n_fft: int, hop: int, length: int) -> torch.Tensor:
    """complex [B, F, T] -> [B, length]."""
    return torch.istft(spec, n_fft, hop, window=_window(n_fft, str(spec.device)), center=True, length=length)


@lru_cache(maxsize=16)
def mel_filters(sample_rate: int, n_fft: int, n_mels: int) -> torch.Tensor:
    """Slaney-style mel filterbank [n_mels, n_fft // 2 + 1] (librosa's, as a tensor)."""
    import librosa
    return torch.from_numpy(librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels)).float()


def log_mel(x: torch.Tensor, sample_rate: int, n_fft: int = 1024, hop: int = 256, n_mels: int = 80,
            eps: float = 1e-5) -> torch.Tensor:
    """[B, N] -> log10 mel magnitudes [B, n_mels, T]."""
    mag = stft(x, n_fft, hop).abs()
    return torch.log10(mel_filters(sample_rate, n_fft, n_mels).to(x.device) @ mag + eps)


def griffin_lim(mag: torch.Tensor, n_fft: int, hop: int, length: int, iters: int = 32,
                momentum: float = 0.99, angles: torch.Tensor | None = None) -> torch.Tensor:
    """Fast Griffin-Lim (Perraudin et al. 2013): magnitudes [B, F, T] -> audio [B, length].

    The momentum term extrapolates each projection towards the consistent set, which reaches
    in ~32 iterations what plain Griffin-Lim needs hundreds for. `angles` (unit complex
    [B, F, T]) seeds the phase; default is a fixed random phase, so results are deterministic.
    """
    if angles is None:
        g = torch.Generator().manual_seed(0)
        angles = torch.exp(2j * torch.pi * torch.rand(mag.shape, generator=g)).to(mag.device)
    prev = torch.zeros_like(angles)
    for _ in range(iters):
        rebuilt = stft(istft(mag * angles, n_fft, hop, length), n_fft, hop)
        accelerated = rebuilt - (momentum / (1 + momentum)) * prev
        prev = rebuilt
        angles = accelerated / (accelerated.abs() + 1e-8)
    return istft(mag * angles, n_fft, hop, length)
