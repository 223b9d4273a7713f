"""EnCodec backend of the acoustic tokenizer (transformers' `EncodecModel`).

- Published weights: `EncodecTokenizer.from_pretrained("path/to/encodec_24khz")` loads a local
  Hugging Face folder (nothing is downloaded); `bandwidth` picks how many RVQ levels to use.
- Training here (`backend=encodec`, a GPU job): `TrainableEncodec` keeps transformers'
  encoder and decoder but fixes the two traps that make it untrainable as it is:
  its quantizer is inference-only (replaced by our EMA `ResidualVQ` with straight-through
  gradients and commitment loss), and its init does not reach the weight-normed
  convolutions (re-initialised here, else the encoder's signal fades ~100x).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from audio_tokenizers.codec_common import AcousticConfig, check_codes, fit_length, pad_to_frames, prepare
from audio_tokenizers.rvq import ResidualVQ
from audio_tokenizers.spectral import log_mel
from common.errors import CheckpointError


class EncodecTokenizer:
    """Published EnCodec weights behind the acoustic tokenizer interface."""

    kind = "acoustic_encodec"

    def __init__(self, model, bandwidth: float | None = None):
        self.model = model.eval()
        cfg = model.config
        self.sample_rate, self.frame_rate = cfg.sampling_rate, cfg.frame_rate
        self.codebook_size = cfg.codebook_size
        self.bandwidth = bandwidth or sorted(cfg.target_bandwidths)[min(2, len(cfg.target_bandwidths) - 1)]
        self.num_quantizers = int(model.quantizer.get_num_quantizers_for_bandwidth(self.bandwidth))
        self.hop = int(round(self.sample_rate / self.frame_rate))

    @classmethod
    def from_pretrained(cls, path: str | Path, bandwidth: float | None = None) -> "EncodecTokenizer":
        from transformers import EncodecModel
        try:
            model = EncodecModel.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot load EnCodec from {path} ({str(e).splitlines()[0]})") from None
        if model.config.audio_channels != 1:
            raise CheckpointError(f"{path} is a {model.config.audio_channels}-channel EnCodec; use a mono one")
        return cls(model, bandwidth)

    @classmethod
    def from_trained(cls, model: "TrainableEncodec") -> "TrainedEncodecTokenizer":
        return TrainedEncodecTokenizer(model)

    @torch.no_grad()
    def encode(self, wav: torch.Tensor, sample_rate: int | None = None) -> torch.Tensor:
        x = pad_to_frames(prepare(wav, sample_rate, self.sample_rate), self.hop)
        out = self.model.encode(x[:, None], bandwidth=self.bandwidth)
        if out.audio_codes.shape[0] != 1:
            raise CheckpointError("chunked EnCodec models (e.g. 48 kHz) are not supported; use encodec_24khz/32khz")
        return out.audio_codes[0]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, length: int | None = None) -> torch.Tensor:
        check_codes(codes, self)
        wav = self.model.decode(codes[None], [None]).audio_values
        return fit_length(wav, length)

    def split(self, codes, n_coarse):
        return codes[:, :n_coarse], codes[:, n_coarse:]

    def join(self, coarse, fine):
        return torch.cat([coarse, fine], 1)


def init_weight_norm_convs(module: nn.Module) -> int:
    """Kaiming-initialise every weight-normed conv so that its effective weight has unit
    fan-in gain (g = ||v||); returns how many were fixed."""
    fixed = 0
    for m in module.modules():
        param = getattr(getattr(m, "parametrizations", None), "weight", None)
        if param is None:
            continue
        g, v = param.original0, param.original1
        with torch.no_grad():
            nn.init.kaiming_normal_(v, nonlinearity="linear")
            keep = next((d for d in range(v.dim()) if g.shape[d] == v.shape[d] > 1), 0)
            g.copy_(v.pow(2).sum([d for d in range(v.dim()) if d != keep], keepdim=True).sqrt())
        fixed += 1
    return fixed


class TrainableEncodec(nn.Module):
    """EnCodec's SEANet encoder/decoder from transformers around a trainable ResidualVQ."""

    def __init__(self, cfg: AcousticConfig):
        super().__init__()
        from transformers import EncodecConfig, EncodecModel
        self.cfg = cfg
        hop = 1
        for r in cfg.encodec_ratios:
            hop *= r
        self.hop = hop
        hf = EncodecConfig(sampling_rate=cfg.sample_rate, num_filters=cfg.encodec_filters,
                           upsampling_ratios=list(cfg.encodec_ratios), hidden_size=cfg.encodec_hidden,
                           codebook_size=cfg.codebook_size, audio_channels=1, normalize=False)
        full = EncodecModel(hf)
        self.encoder, self.decoder = full.encoder, full.decoder
        self.fixed_convs = init_weight_norm_convs(self)
        self.rvq = ResidualVQ(cfg.encodec_hidden, cfg.num_quantizers, cfg.codebook_size, cfg.ema_decay,
                              cfg.quantizer_dropout)

    def training_loss(self, wav: torch.Tensor) -> dict[str, torch.Tensor]:
        """wav [B, N] -> waveform L1 + multi-resolution log-mel L1 + commitment."""
        n = wav.shape[-1] // self.hop * self.hop
        wav = wav[:, :n]
        q = self.rvq(self.encoder(wav[:, None]))
        rec = self.decoder(q["quantized"])[:, 0, :n]
        mel = sum((log_mel(rec, self.cfg.sample_rate, f, f // 4) - log_mel(wav, self.cfg.sample_rate, f, f // 4))
                  .abs().mean() for f in (512, 1024, 2048)) / 3
        return {"l1_wave": 0.1 * (rec - wav).abs().mean(), "l1_mel": mel,
                "commit": self.cfg.commit_weight * q["commit"], "_perplexity": q["perplexity"].detach()}


class TrainedEncodecTokenizer(EncodecTokenizer):
    """A `TrainableEncodec` (trained here) behind the tokenizer interface."""

    def __init__(self, model: TrainableEncodec):
        self.model = model.eval()
        self.cfg = model.cfg
        self.sample_rate, self.hop = self.cfg.sample_rate, model.hop
        self.frame_rate = self.sample_rate / self.hop
        self.num_quantizers, self.codebook_size = self.cfg.num_quantizers, self.cfg.codebook_size

    @torch.no_grad()
    def encode(self, wav: torch.Tensor, sample_rate: int | None = None) -> torch.Tensor:
        x = pad_to_frames(prepare(wav, sample_rate, self.sample_rate), self.hop)
        return self.model.rvq.encode(self.model.encoder(x[:, None]))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, length: int | None = None) -> torch.Tensor:
        check_codes(codes, self)
        return fit_length(self.model.decoder(self.model.rvq.decode(codes)), length)
