"""Semantic tokens: k-means cluster ids of one layer of a self-supervised audio model.

    tok = load_semantic("pretrained/semantic_tokenizer")
    ids = tok.encode(wav)            # [B, 1, N] -> [B, T_s], T_s = ceil(N / 960) at 24 kHz (25 Hz)

Feature backends (swappable for ablations, all behind the same k-means):
- `w2vbert`: transformers' `Wav2Vec2BertModel` (the w2v-BERT 2.0 conformer) at a small size,
  fed with log-mel frames stacked to 25 Hz, trained here by masked prediction of frozen
  targets, BEST-RQ's or k-means' (semantic_train.py);
- `pretrained`: any Wav2Vec2Bert or HuBERT folder saved by `save_pretrained` (e.g. a local
  copy of facebook/w2v-bert-2.0), with its own feature extractor, pooled to 25 Hz;
- `logmel`: the stacked log-mel frames themselves, the no-SSL baseline.

Commands: `python -m audio_tokenizers.semantic train|kmeans|encode ...`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from audio_tokenizers.acoustic import prepare
from audio_tokenizers.spectral import mel_filters, stft
from common.checkpoint import load_checkpoint, load_weights, save_checkpoint
from common.config import config_from_dict, config_to_dict, register_config
from common.errors import CheckpointError, ConfigError
from common.training import RunConfig, check_fields

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "pretrained" / "semantic_tokenizer"


@register_config("semantic_tokenizer")
@dataclass
class SemanticTokenizerConfig(RunConfig):
    backend: str = "w2vbert"           # "w2vbert", "pretrained" or "logmel"
    pretrained_path: str = ""          # Hugging Face folder, for backend=pretrained
    layer: int = 4                     # hidden_states index whose activations are clustered
    codebook_size: int = 1024          # k of k-means
    sample_rate: int = 24000
    n_mels: int = 80
    mel_hop: int = 240                 # 100 Hz mel frames ...
    stack: int = 4                     # ... stacked by 4: 25 Hz tokens of 320 dims
    # the conformer (backend=w2vbert)
    hidden_size: int = 256
    layers: int = 6
    heads: int = 4
    ffn_size: int = 1024
    conv_kernel: int = 15
    dropout: float = 0.1               # the conformer's convolution-module dropout (its only dropout)
    # masked-prediction self-supervision: targets of each input frame come from a frozen quantizer,
    # "bestrq" (random projection + random codebook), "kmeans" (k-means on the input frames,
    # HuBERT's first iteration) or "tokenizer" (the ids of the semantic tokenizer at target_tokenizer,
    # HuBERT's second iteration); rq_codebook_size is the number of targets in every case
    ssl_targets: str = "bestrq"
    target_tokenizer: str = ""         # for ssl_targets=tokenizer
    init_from_target: bool = False     # start from target_tokenizer's conformer (same size) instead of random
    rq_codebook_size: int = 1024
    rq_dim: int = 16
    mask_prob: float = 0.1             # probability that a masked span starts at a frame
    mask_span: int = 5                 # frames (200 ms); ~40% of frames end up masked
    # denoising masked prediction (WavLM): this fraction of training clips gets white noise at
    # 10-40 dB SNR and a gain change of up to 6 dB, while the targets stay those of the clean clip
    augment_prob: float = 0.0
    # training (and the run fields: common.training.RunConfig, with this part's defaults)
    train_manifest: str = "corpus/train.jsonl"
    valid_manifest: str = "corpus/valid.jsonl"
    crop_seconds: float = 4.0
    eval_clips: int = 32
    kmeans_clips: int = 1500
    kmeans_frames: int = 150000
    kmeans_standardize: bool = False   # z-score each feature dim (training-frame statistics) before k-means
    out: str = "runs/semantic_tokenizer"
    steps: int = 3000
    lr: float = 5e-4
    warmup: int = 300
    ckpt_every: int = 250

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(self, positive=("codebook_size", "sample_rate", "n_mels", "mel_hop", "stack", "hidden_size",
                                     "layers", "heads", "ffn_size", "conv_kernel", "rq_codebook_size", "rq_dim",
                                     "mask_span", "crop_seconds", "eval_clips", "kmeans_clips", "kmeans_frames"),
                     at_least_zero=("layer",), unit=("mask_prob", "augment_prob", "dropout"))
        if self.backend not in ("w2vbert", "pretrained", "logmel"):
            raise ConfigError(f"backend={self.backend!r}: use w2vbert, pretrained or logmel")

    @property
    def hop(self) -> int:
        return self.mel_hop * self.stack


def log_mel_frames(wav: torch.Tensor, cfg: SemanticTokenizerConfig) -> torch.Tensor:
    """[B, N] -> per-clip normalised log-mel frames stacked to [B, ceil(N / hop), n_mels * stack]."""
    frames = max(1, -(-wav.shape[-1] // cfg.hop))
    wav = F.pad(wav, (0, frames * cfg.hop - wav.shape[-1]))
    mag = stft(wav, 4 * cfg.mel_hop, cfg.mel_hop).abs()[..., :-1]            # [B, F, 4T]
    mel = torch.log(mel_filters(cfg.sample_rate, 4 * cfg.mel_hop, cfg.n_mels).to(wav.device) @ mag + 1e-5)
    mel = (mel - mel.mean(-1, keepdim=True)) / (mel.std(-1, keepdim=True, unbiased=False) + 1e-3)
    B, M, T4 = mel.shape
    return mel.transpose(1, 2).reshape(B, frames, cfg.stack * M)


def build_conformer(cfg: SemanticTokenizerConfig):
    from transformers import Wav2Vec2BertConfig, Wav2Vec2BertModel
    hf = Wav2Vec2BertConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.layers,
                            num_attention_heads=cfg.heads, intermediate_size=cfg.ffn_size,
                            feature_projection_input_dim=cfg.n_mels * cfg.stack, add_adapter=False,
                            conv_depthwise_kernel_size=cfg.conv_kernel, layerdrop=0.0,
                            conformer_conv_dropout=cfg.dropout,
                            mask_time_prob=0.05)  # > 0 so that the learned mask embedding exists
    return Wav2Vec2BertModel(hf)


class PretrainedFeatures(nn.Module):
    """A published Wav2Vec2Bert/HuBERT folder: its feature extractor, its layer, pooled to 25 Hz."""

    def __init__(self, path: str, cfg: SemanticTokenizerConfig):
        super().__init__()
        from transformers import AutoFeatureExtractor, AutoModel
        try:
            self.extractor = AutoFeatureExtractor.from_pretrained(path, local_files_only=True)
            self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot load a pretrained feature model from {path} "
                                  f"({str(e).splitlines()[0]})") from None
        self.rate = self.extractor.sampling_rate
        self.cfg = cfg

    @torch.no_grad()
    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        from data.audio import resample
        frames = max(1, -(-wav.shape[-1] // self.cfg.hop))
        x = resample(wav.cpu().numpy(), self.cfg.sample_rate, self.rate)
        x = np.pad(x, ((0, 0), (0, max(0, self.rate // 5 - x.shape[-1]))))  # extractors need >= 0.2 s
        inputs = self.extractor(list(x), sampling_rate=self.rate, return_tensors="pt", padding=True)
        hidden = self.model(**inputs, output_hidden_states=True).hidden_states[self.cfg.layer]
        pooled = F.adaptive_avg_pool1d(hidden.transpose(1, 2), frames).transpose(1, 2)
        return pooled


class SemanticTokenizer:
    """Features of one backend, assigned to the nearest of k centroids."""

    kind = "semantic_tokenizer"

    def __init__(self, cfg: SemanticTokenizerConfig, centroids: torch.Tensor, model: nn.Module | None = None,
                 mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
        """`mean`, `std` [D]: the standardization k-means was fitted in (kmeans_standardize), else None."""
        self.cfg, self.centroids = cfg, centroids.float()
        self.mean, self.std = (None, None) if mean is None else (mean.float(), std.float())
        self.model = model.eval() if model is not None else None
        self.sample_rate, self.hop = cfg.sample_rate, cfg.hop
        self.frame_rate = cfg.sample_rate / cfg.hop
        self.codebook_size = len(centroids)
        # names the token vocabulary: two fits never share centroids, so stages trained on one
        # tokenizer's ids can refuse another's (fp16, as stored, so a fresh fit and its reload agree).
        # Not data.tokenize.checkpoint_hash: that hashes the folder's files, so editing a CARD.md changes it.
        self.fingerprint = hashlib.sha256(self.centroids.half().numpy().tobytes()).hexdigest()[:16]
        if cfg.backend == "pretrained" and self.model is None:
            self.model = PretrainedFeatures(cfg.pretrained_path, cfg)

    @torch.no_grad()
    def features(self, wav: torch.Tensor, sample_rate: int | None = None) -> torch.Tensor:
        """[B, 1, N] -> [B, T_s, D], the vectors that k-means clusters."""
        x = prepare(wav, sample_rate, self.sample_rate)
        if self.cfg.backend == "pretrained":
            return self.model(x)
        return self.features_of_frames(log_mel_frames(x, self.cfg))

    @torch.no_grad()
    def features_of_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Log-mel frames [B, T_s, n_mels * stack] -> [B, T_s, D] (backends w2vbert and logmel)."""
        if self.cfg.backend == "logmel":
            return frames
        # the layers above the clustered one cannot change it: skip them (a third of the cost at layer 4 of 6)
        layers = self.model.encoder.layers
        self.model.encoder.layers = layers[: self.cfg.layer]
        try:
            hidden = self.model(frames, output_hidden_states=True).hidden_states
        finally:
            self.model.encoder.layers = layers
        return hidden[self.cfg.layer]

    @torch.no_grad()
    def assign(self, feats: torch.Tensor) -> torch.Tensor:
        """[B, T, D] features -> ids [B, T] of the nearest centroids."""
        if self.mean is not None:
            feats = (feats - self.mean) / self.std
        B, T, D = feats.shape
        return torch.cdist(feats.reshape(B * T, D), self.centroids).argmin(1).reshape(B, T)

    @torch.no_grad()
    def encode(self, wav: torch.Tensor, sample_rate: int | None = None) -> torch.Tensor:
        """[B, 1, N] -> ids [B, ceil(N / hop)] in [0, codebook_size)."""
        return self.assign(self.features(wav, sample_rate))

    def save(self, path: str | Path) -> None:
        state = {"centroids": self.centroids}
        if self.mean is not None:
            state.update(feature_mean=self.mean, feature_std=self.std)
        if self.cfg.backend == "w2vbert":
            state.update({f"model.{k}": v for k, v in self.model.state_dict().items()})
        save_checkpoint(path, self.kind, config_to_dict(self.cfg), state)


def load_semantic(path: str | Path | None = None) -> SemanticTokenizer:
    path = Path(path) if path else DEFAULT_CHECKPOINT
    if not path.exists() and path == DEFAULT_CHECKPOINT:
        raise CheckpointError(f"no shipped semantic tokenizer at {path}; train one with "
                              "`python -m audio_tokenizers.semantic train` or pass --checkpoint")
    ck = load_checkpoint(path, kind="semantic_tokenizer")
    cfg = config_from_dict(SemanticTokenizerConfig, ck.config, str(path))
    model = None
    if cfg.backend == "w2vbert":
        model = build_conformer(cfg)
        load_weights(model, {k[6:]: v for k, v in ck.state_dict.items() if k.startswith("model.")}, path)
    return SemanticTokenizer(cfg, ck.state_dict["centroids"], model,
                             ck.state_dict.get("feature_mean"), ck.state_dict.get("feature_std"))


# ---------------------------------------------------------------- command line

if __name__ == "__main__":   # the command line lives with the trainer, which imports this file
    from audio_tokenizers.semantic_train import main
    from common.errors import run_cli
    run_cli(main)
