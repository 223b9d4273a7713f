"""The acoustic tokenizer: audio <-> RVQ codes, the sound of everything downstream.

    tok = load_acoustic("pretrained/acoustic")     # or a Hugging Face EnCodec folder
    codes = tok.encode(wav)                        # [B, 1, N] -> [B, Q, T]
    wav = tok.decode(codes, length=N)              # [B, Q', T] -> [B, 1, N]; Q' <= Q levels
    coarse, fine = tok.split(codes, 3)             # [B, 3, T], [B, Q-3, T]

Two backends share this interface, chosen by the checkpoint's kind:
- `acoustic_spectral` (default): an autoencoder over STFT log-magnitude frames at 50 Hz with
  RVQ at the bottleneck; the waveform comes back by fast Griffin-Lim. It trains on 2 CPU
  cores in hours because everything runs at frame rate.
- `acoustic_encodec`: transformers' `EncodecModel`, from published weights (a Hugging Face
  folder) or trained here by the same command with `backend=encodec` (a GPU job).

Commands: `python -m audio_tokenizers.acoustic train|roundtrip|evaluate ...`.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from audio_tokenizers.rvq import ResidualVQ
from audio_tokenizers.spectral import griffin_lim, mel_filters, stft
from common.checkpoint import hf_model_type, load_checkpoint, load_weights, read_header
from audio_tokenizers.codec_common import AcousticConfig, check_codes, fit_length, pad_to_frames, prepare
from common.config import config_from_dict
from common.errors import CheckpointError

LOG_FLOOR = math.log(1e-5)
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "pretrained" / "acoustic"


class ConvNeXtBlock(nn.Module):
    """Depthwise conv over time, LayerNorm, pointwise MLP, residual (as in Vocos)."""

    def __init__(self, dim: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 3 * dim), nn.GELU(), nn.Linear(3 * dim, dim))
        self.scale = nn.Parameter(torch.full((dim,), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, D, T]
        h = self.mlp(self.norm(self.conv(x).transpose(1, 2)))
        return x + (self.scale * h).transpose(1, 2)


class SpectralCodec(nn.Module):
    """log|STFT| [B, F, T] -> latent [B, L, T] -> RVQ -> latent -> log|STFT| [B, F, T]."""

    def __init__(self, cfg: AcousticConfig):
        super().__init__()
        self.cfg = cfg
        bins = cfg.n_fft // 2 + 1
        self.encoder = nn.Sequential(nn.Conv1d(bins, cfg.dim, 3, padding=1),
                                     *[ConvNeXtBlock(cfg.dim, cfg.kernel) for _ in range(cfg.encoder_blocks)],
                                     nn.Conv1d(cfg.dim, cfg.latent_dim, 1))
        self.rvq = ResidualVQ(cfg.latent_dim, cfg.num_quantizers, cfg.codebook_size, cfg.ema_decay,
                              cfg.quantizer_dropout)
        self.decoder = nn.Sequential(nn.Conv1d(cfg.latent_dim, cfg.dim, cfg.kernel, padding=cfg.kernel // 2),
                                     *[ConvNeXtBlock(cfg.dim, cfg.kernel) for _ in range(cfg.decoder_blocks)])
        self.head = nn.Conv1d(cfg.dim, bins, 1)

    def log_magnitude(self, wav: torch.Tensor) -> torch.Tensor:
        """[B, N] (N a multiple of hop) -> [B, F, N // hop]: one frame centred on each hop."""
        spec = stft(wav, self.cfg.n_fft, self.cfg.hop)[..., :-1]
        return torch.log(spec.abs().clamp(min=1e-5))

    def forward(self, logmag: torch.Tensor, n_q: int | None = None) -> dict[str, torch.Tensor]:
        z = self.encoder((logmag - LOG_FLOOR / 2) / 5)  # centre the -11.5..5 range
        q = self.rvq(z, n_q)
        out = self.head(self.decoder(q["quantized"]))
        return {**q, "logmag": out.clamp(min=LOG_FLOOR, max=8.0) if not self.training else out}

    def decode_logmag(self, codes: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(self.rvq.decode(codes))).clamp(min=LOG_FLOOR, max=8.0)

    def waveform(self, logmag: torch.Tensor) -> torch.Tensor:
        """[B, F, T] -> [B, T * hop] by Griffin-Lim (the last frame is repeated to close the STFT)."""
        mag = torch.exp(torch.cat([logmag, logmag[..., -1:]], -1))
        return griffin_lim(mag, self.cfg.n_fft, self.cfg.hop, logmag.shape[-1] * self.cfg.hop,
                           self.cfg.griffin_lim_iters)

    def loss(self, logmag_hat: torch.Tensor, logmag: torch.Tensor) -> dict[str, torch.Tensor]:
        """L1 on log-magnitudes plus L1 on log-mel (perceptual weighting of low frequencies)."""
        mel = mel_filters(self.cfg.sample_rate, self.cfg.n_fft, 128).to(logmag.device)
        log_mel = lambda lm: torch.log(mel @ torch.exp(lm) + 1e-5)  # noqa: E731
        return {"l1_linear": (logmag_hat - logmag).abs().mean(),
                "l1_mel": (log_mel(logmag_hat) - log_mel(logmag)).abs().mean()}


# ---------------------------------------------------------------- the tokenizer interface

class SpectralTokenizer:
    kind = "acoustic_spectral"

    def __init__(self, model: SpectralCodec):
        self.model = model.eval()
        self.cfg = model.cfg
        self.sample_rate, self.hop = self.cfg.sample_rate, self.cfg.hop
        self.frame_rate = self.cfg.sample_rate / self.cfg.hop
        self.num_quantizers, self.codebook_size = self.cfg.num_quantizers, self.cfg.codebook_size

    @torch.no_grad()
    def encode(self, wav: torch.Tensor, sample_rate: int | None = None) -> torch.Tensor:
        """[B, 1, N] -> codes [B, Q, ceil(N / hop)] (at least one frame)."""
        x = pad_to_frames(prepare(wav, sample_rate, self.sample_rate), self.hop)
        return self.model.rvq.encode(self.model.encoder((self.model.log_magnitude(x) - LOG_FLOOR / 2) / 5))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """codes [B, Q', T] -> [B, 1, length or T * hop]."""
        check_codes(codes, self)
        wav = self.model.waveform(self.model.decode_logmag(codes))
        return fit_length(wav, length)[:, None]

    def split(self, codes: torch.Tensor, n_coarse: int) -> tuple[torch.Tensor, torch.Tensor]:
        return codes[:, :n_coarse], codes[:, n_coarse:]

    def join(self, coarse: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
        return torch.cat([coarse, fine], 1)


def build_codec(cfg: AcousticConfig) -> nn.Module:
    if cfg.backend == "spectral":
        return SpectralCodec(cfg)
    if cfg.backend == "encodec":
        from audio_tokenizers.encodec import TrainableEncodec
        return TrainableEncodec(cfg)
    raise ValueError(f"unknown backend '{cfg.backend}'; use 'spectral' or 'encodec'")


def tokenizer_for(model: nn.Module):
    if isinstance(model, SpectralCodec):
        return SpectralTokenizer(model)
    from audio_tokenizers.encodec import EncodecTokenizer
    return EncodecTokenizer.from_trained(model)


def load_acoustic(path: str | Path | None = None):
    """A tokenizer from a project checkpoint (kind acoustic_spectral / acoustic_encodec) or a
    Hugging Face EnCodec folder (e.g. a local copy of facebook/encodec_24khz)."""
    path = Path(path) if path else DEFAULT_CHECKPOINT
    if hf_model_type(path) is not None:
        from audio_tokenizers.encodec import EncodecTokenizer
        return EncodecTokenizer.from_pretrained(path)
    if not path.exists() and path == DEFAULT_CHECKPOINT:
        raise CheckpointError(f"no shipped acoustic codec at {path}; train one with "
                              "`python -m audio_tokenizers.acoustic train` or pass --checkpoint")
    header = read_header(path)
    ck = load_checkpoint(path, kind=("acoustic_spectral", "acoustic_encodec"))
    cfg = config_from_dict(AcousticConfig, header["config"], str(path))
    model = build_codec(cfg)
    load_weights(model, ck.state_dict, path)
    return tokenizer_for(model)



# ---------------------------------------------------------------- command line

if __name__ == "__main__":   # the command line lives with the trainer, which imports this file
    from audio_tokenizers.acoustic_train import main
    from common.errors import run_cli
    run_cli(main)
