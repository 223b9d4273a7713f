"""Clip embeddings for the Fréchet audio distance, one function per backend.

- `features`: a fixed, non-learned descriptor (MFCC, chroma and spectral statistics, 76 dims);
- `mulan`: the MuLan audio tower (the shipped one, or the pipeline's conditioner);
- `clap:PATH`: transformers' ClapModel from a local folder (e.g. a copy of laion/clap-htsat-unfused).
"""
from __future__ import annotations

import numpy as np
import torch


def fixed_features(wav: np.ndarray, sr: int) -> np.ndarray:
    import librosa
    y = wav.astype(np.float32)
    stats = [librosa.feature.mfcc(y=y, sr=sr, n_mfcc=20), librosa.feature.chroma_stft(y=y, sr=sr),
             librosa.feature.spectral_centroid(y=y, sr=sr) / 1000, librosa.feature.spectral_bandwidth(y=y, sr=sr) / 1000,
             librosa.feature.spectral_rolloff(y=y, sr=sr) / 1000, librosa.feature.spectral_flatness(y=y),
             librosa.feature.zero_crossing_rate(y), librosa.feature.rms(y=y)]
    return np.concatenate([np.concatenate([s.mean(1), s.std(1)]) for s in stats])


def embedder(backend: str, conditioner=None):
    """-> f(list of waveforms [N] at sr, sr) -> [n, D] numpy."""
    if backend == "features":
        return lambda waves, sr: np.stack([fixed_features(w, sr) for w in waves])
    if backend == "mulan" or backend.startswith("clap:"):
        if backend.startswith("clap:"):
            from audio_tokenizers.mulan import ClapConditioner
            conditioner = ClapConditioner(backend[len("clap:"):])
        elif conditioner is None:
            from audio_tokenizers.mulan import load_conditioner
            conditioner = load_conditioner(None)

        @torch.no_grad()
        def embed(waves, sr):
            return np.concatenate([conditioner.embed_audio(torch.from_numpy(np.ascontiguousarray(w))[None, None], sr)
                                   .numpy() for w in waves])
        return embed
    raise ValueError(f"unknown embedding backend {backend!r}; use features, mulan or clap:PATH")
