"""Audio reconstruction metrics.

`mel_distance` is the multi-resolution log-mel L1 distance the codec issue asks for: for
FFT sizes 512, 1024 and 2048 (hop = FFT / 4, 80 mel bands, magnitudes), the mean absolute
difference of log10 mel magnitudes, averaged over the three resolutions. Identical audio
scores 0; a 6 dB level change scores about 0.3 (log10(2)).
"""
from __future__ import annotations

import torch

from audio_tokenizers.spectral import log_mel

RESOLUTIONS = (512, 1024, 2048)


def mel_distance(x: torch.Tensor, y: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """x, y: [B, N] (or [B, 1, N]) -> [B] multi-resolution log-mel L1 distance."""
    x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    n = min(x.shape[-1], y.shape[-1])
    x, y = x[..., :n], y[..., :n]
    per_res = [(log_mel(x, sample_rate, f, f // 4) - log_mel(y, sample_rate, f, f // 4)).abs().mean(dim=(1, 2))
               for f in RESOLUTIONS]
    return torch.stack(per_res).mean(0)


def si_snr(estimate: torch.Tensor, reference: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale-invariant signal-to-noise ratio in dB, [B, N] -> [B]."""
    estimate, reference = estimate.reshape(estimate.shape[0], -1), reference.reshape(reference.shape[0], -1)
    estimate = estimate - estimate.mean(-1, keepdim=True)
    reference = reference - reference.mean(-1, keepdim=True)
    target = (estimate * reference).sum(-1, keepdim=True) / (reference.pow(2).sum(-1, keepdim=True) + eps) * reference
    noise = estimate - target
    return 10 * torch.log10(target.pow(2).sum(-1) / (noise.pow(2).sum(-1) + eps) + eps)


# ---------------------------------------------------------------- generation metrics
def frechet_distance(a, b, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussian fits of two embedding sets a [n, D], b [m, D] (FAD).

    ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2); a small ridge keeps the square root
    finite when there are fewer samples than dimensions."""
    import numpy as np
    from scipy import linalg
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Fréchet distance needs at least 2 embeddings in each set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    ridge = eps * np.eye(len(s_a))
    covmean = linalg.sqrtm((s_a + ridge) @ (s_b + ridge))
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


def cycle_consistency(text_emb: torch.Tensor, audio_emb: torch.Tensor) -> dict[str, float]:
    """MuLan cycle consistency: mean cosine of each prompt's text embedding with its output's audio
    embedding [n, D] (unit vectors), beside the same for mismatched pairs (each prompt with the
    next prompt's output)."""
    matched = (text_emb * audio_emb).sum(-1).mean()
    shuffled = (text_emb * audio_emb.roll(1, 0)).sum(-1).mean() if len(text_emb) > 1 else torch.tensor(float("nan"))
    return {"mcc": float(matched), "mcc_shuffled": float(shuffled)}


def kl_divergence(p_ref, p_out, eps: float = 1e-6) -> float:
    """Mean over pairs of KL(p_ref || p_out) between classifier label distributions [n, C]."""
    import numpy as np
    p, q = np.asarray(p_ref) + eps, np.asarray(p_out) + eps
    p, q = p / p.sum(1, keepdims=True), q / q.sum(1, keepdims=True)
    return float((p * np.log(p / q)).sum(1).mean())


def paired_interval(diff, draws: int = 2000, seed: int = 0) -> dict:
    """Mean of per-clip paired differences (same clip and seed, two settings) and its 95% bootstrap interval."""
    import numpy as np
    diff = np.asarray(diff, dtype=float)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (draws, len(diff)))].mean(1)
    return {"mean": round(float(diff.mean()), 4), "ci95": [round(float(np.quantile(means, 0.025)), 4),
                                                            round(float(np.quantile(means, 0.975)), 4)],
            "clips": len(diff)}
