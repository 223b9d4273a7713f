"""Melody ids: the dominant pitch class of each semantic frame (MusicGen's melody conditioning).

    ids = melody_ids(wav, sample_rate=24000, frame_rate=25.0)     # [B, 1, N] -> [B, T_s] in 0..12

A chromagram of the recording (12 pitch classes, from an STFT restricted to the melody band,
MusicGen removes drums and bass by source separation; here the band leaves out most of the bass
and the cymbals) is reduced to its argmax bin per frame: a one-hot "information bottleneck" that
keeps the tune and drops the timbre, so a text prompt still decides the instrument. Frames
without enough energy in the band get SILENT (12); NONE (13) is the id of "no melody given"
(condition dropout in training, prompts without --melody at inference).
"""
from __future__ import annotations

import functools

import numpy as np
import torch

SILENT, NONE, VOCAB = 12, 13, 14
N_FFT, LOW_HZ, HIGH_HZ = 4096, 150.0, 4000.0


@functools.lru_cache(maxsize=4)
def _filters(sample_rate: int) -> torch.Tensor:
    import librosa
    chroma = librosa.filters.chroma(sr=sample_rate, n_fft=N_FFT, n_chroma=12)       # [12, F]
    freqs = np.fft.rfftfreq(N_FFT, 1 / sample_rate)
    chroma[:, (freqs < LOW_HZ) | (freqs > HIGH_HZ)] = 0
    return torch.from_numpy(chroma).float()


def chromagram(wav: torch.Tensor, sample_rate: int, frame_rate: float) -> torch.Tensor:
    """[B, 1, N] or [B, N] -> [B, 12, T] band-limited chroma energy, one frame per 1 / frame_rate seconds."""
    x = wav.reshape(wav.shape[0], -1).float()
    hop = int(round(sample_rate / frame_rate))
    frames = max(1, -(-x.shape[-1] // hop))
    x = torch.nn.functional.pad(x, (0, frames * hop - x.shape[-1]))
    spec = torch.stft(x, N_FFT, hop, window=torch.hann_window(N_FFT), center=True, return_complex=True).abs() ** 2
    return _filters(sample_rate) @ spec[..., :frames]


def melody_ids(wav: torch.Tensor, sample_rate: int, frame_rate: float, floor_db: float = -40.0) -> torch.Tensor:
    """[B, 1, N] -> [B, T] the argmax pitch class per frame, SILENT where the band is 40 dB below the clip's peak."""
    c = chromagram(wav, sample_rate, frame_rate)
    energy = c.sum(1)
    quiet = energy < energy.amax(-1, keepdim=True).clamp(min=1e-12) * 10 ** (floor_db / 10)
    return torch.where(quiet, SILENT, c.argmax(1)).long()


def chroma_similarity(a: torch.Tensor, b: torch.Tensor, sample_rate: int, frame_rate: float = 25.0) -> torch.Tensor:
    """Mean frame-wise cosine similarity of the normalised chromagrams of two recordings [B, 1, N] -> [B]
    (the measure MusicGen reports for its melody model), over the frames where `a` (the reference) sounds."""
    ca, cb = chromagram(a, sample_rate, frame_rate), chromagram(b, sample_rate, frame_rate)
    n = min(ca.shape[-1], cb.shape[-1])
    energy = ca[..., :n].sum(1)
    sounding = (energy >= energy.amax(-1, keepdim=True).clamp(min=1e-12) * 1e-4).float()
    ca, cb = (torch.nn.functional.normalize(c[..., :n], dim=1) for c in (ca, cb))
    return ((ca * cb).sum(1) * sounding).sum(-1) / sounding.sum(-1).clamp(min=1)
