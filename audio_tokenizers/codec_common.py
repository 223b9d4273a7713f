"""What both codec backends share (the spectral codec in acoustic.py, EnCodec in encodec.py): the config,
input checks and length handling. Kept apart so that neither backend's file imports the other's."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from common.config import register_config
from common.errors import AudioError, ConfigError
from common.training import RunConfig, check_fields
from data.audio import resample


@register_config("acoustic")
@dataclass
class AcousticConfig(RunConfig):
    backend: str = "spectral"          # "spectral" or "encodec"
    sample_rate: int = 24000
    num_quantizers: int = 8
    codebook_size: int = 1024
    quantizer_dropout: float = 0.5     # probability of training a random prefix of levels
    ema_decay: float = 0.99
    commit_weight: float = 1.0
    # spectral codec
    n_fft: int = 1536                  # 64 ms window: chosen by the Griffin-Lim ceiling (card)
    hop: int = 480                     # 50 Hz frames at 24 kHz
    dim: int = 256
    latent_dim: int = 64
    encoder_blocks: int = 4
    decoder_blocks: int = 6
    kernel: int = 7
    griffin_lim_iters: int = 32
    # encodec architecture (backend=encodec)
    encodec_filters: int = 32
    encodec_ratios: list[int] = field(default_factory=lambda: [8, 5, 4, 2])
    encodec_hidden: int = 128
    # training
    train_manifest: str = "corpus/train.jsonl"
    valid_manifest: str = "corpus/valid.jsonl"
    crop_seconds: float = 2.0
    eval_clips: int = 16
    eval_seconds: float = 4.0
    # the run fields (common.training.RunConfig), with this part's defaults
    out: str = "runs/acoustic"
    steps: int = 20000
    lr: float = 1e-3
    warmup: int = 500
    eval_every: int = 1000

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(self, positive=("sample_rate", "num_quantizers", "codebook_size", "n_fft", "hop", "dim",
                                     "latent_dim", "crop_seconds", "eval_clips", "eval_seconds"),
                     at_least_zero=("encoder_blocks", "decoder_blocks", "griffin_lim_iters", "commit_weight"),
                     unit=("quantizer_dropout", "ema_decay"))
        if self.backend not in ("spectral", "encodec"):
            raise ConfigError(f"backend={self.backend!r}: use spectral or encodec")


# ---------------------------------------------------------------- the spectral codec

def prepare(wav: torch.Tensor, sample_rate: int | None, target_rate: int) -> torch.Tensor:
    """Check and normalise input audio: [B, C, N] or [B, N] -> mono [B, N] at target_rate."""
    if wav.dim() == 2:
        wav = wav[:, None]
    if wav.dim() != 3:
        raise AudioError(f"audio must be [B, 1, N], got shape {tuple(wav.shape)}")
    if not torch.isfinite(wav).all():
        raise AudioError("audio contains NaN or infinite samples; clean or drop the file")
    wav = wav.float().mean(1)  # downmix
    if sample_rate and sample_rate != target_rate:
        wav = torch.from_numpy(resample(wav.cpu().numpy(), sample_rate, target_rate)).to(wav.device)
    return wav


def pad_to_frames(x: torch.Tensor, hop: int) -> torch.Tensor:
    """[B, N] -> [B, T * hop] with T = max(1, ceil(N / hop)): zeros appended."""
    frames = max(1, -(-x.shape[-1] // hop))
    return F.pad(x, (0, frames * hop - x.shape[-1]))


def check_codes(codes: torch.Tensor, tok) -> None:
    if codes.dim() != 3 or not 1 <= codes.shape[1] <= tok.num_quantizers:
        raise ValueError(f"codes must be [B, Q', T] with 1 <= Q' <= {tok.num_quantizers}, got {tuple(codes.shape)}")
    if codes.numel() and (codes.min() < 0 or codes.max() >= tok.codebook_size):
        raise ValueError(f"code ids must lie in [0, {tok.codebook_size}), got {int(codes.min())}..{int(codes.max())}")


def fit_length(wav: torch.Tensor, length: int | None) -> torch.Tensor:
    if length is None:
        return wav
    return wav[..., :length] if wav.shape[-1] >= length else F.pad(wav, (0, length - wav.shape[-1]))
