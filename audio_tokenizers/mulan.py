"""MuLan: a joint text-music embedding, and its quantized conditioning tokens.

    mulan = load_conditioner("pretrained/mulan")       # or a local CLAP folder
    a = mulan.embed_audio(wav)                          # [B, 1, N] -> [B, D], unit norm
    t = mulan.embed_text(["calm solo piano"])           # list[str] -> [B, D], unit norm
    m = mulan.tokens(t)                                 # [B, D] -> [B, Q_m] conditioning tokens

Audio tower: log-mel frames -> two strided convs (12.5 Hz) -> transformer -> mean pool ->
projection. Text tower: any transformers encoder (a small BERT on a sentencepiece vocabulary
trained on the corpus captions by default; a pretrained one by local path) -> mean pool ->
projection. Trained with symmetric InfoNCE and a learned temperature (mulan_train.py). The
RVQ that turns embeddings into tokens is fitted by k-means on audio embeddings of the
training split; text embeddings go through the same quantizer at inference.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from audio_tokenizers.acoustic import prepare
from audio_tokenizers.rvq import ResidualVQ
from audio_tokenizers.spectral import log_mel
from common.checkpoint import hf_model_type, load_checkpoint, load_weights
from common.config import config_from_dict, register_config
from common.errors import CheckpointError, UserError
from common.training import RunConfig, check_fields
from data.manifest import SkipCounter, iter_audio, read_manifest

DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[1] / "pretrained" / "mulan"


@register_config("mulan")
@dataclass
class MuLanConfig(RunConfig):
    sample_rate: int = 24000
    embed_dim: int = 128
    # audio tower
    n_mels: int = 96
    audio_dim: int = 256
    audio_layers: int = 4
    audio_heads: int = 4
    crop_seconds: float = 5.0          # training crops; longer audio is embedded window by window
    # text tower
    vocab_size: int = 1000             # sentencepiece, trained on the corpus captions
    text_dim: int = 256
    text_layers: int = 4
    text_heads: int = 4
    max_text_tokens: int = 64
    text_pretrained_path: str = ""     # a local transformers encoder + tokenizer replaces the above
    # conditioning tokens
    rvq_levels: int = 12
    rvq_codebook_size: int = 1024
    dropout: float = 0.1               # in both towers (0 for runs that must match across DDP ranks exactly)
    lock_audio: str = ""               # a MuLan whose audio tower and RVQ are kept: only the text tower trains
                                       # (mulan_lit.py), so the audio tokens stay that MuLan's
    locked_audio_hash: str = ""        # filled at training time: the hashes (comma-separated) of the MuLans whose
                                       # audio tokens this one makes
    dev_prompts: str = ""              # lock_audio runs: a jsonl of prompts with instrument_label; each evaluation
                                       # scores them and keeps the best step in out/best (choose the step by it)
    filler_words: float = 0.0          # lock_audio runs: the share of captions given 1-3 words no caption uses
                                       # (data/filler_words.txt), so the tower learns to read past unknown words
    # training (and the run fields: common.training.RunConfig, with this part's defaults)
    train_manifest: str = "corpus/train.jsonl"
    valid_manifest: str = "corpus/valid.jsonl"
    eval_clips: int = 200
    rvq_crops_per_clip: int = 4
    out: str = "runs/mulan"
    steps: int = 3000
    batch_size: int = 64
    lr: float = 5e-4
    warmup: int = 200
    ckpt_every: int = 250

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fields(self, positive=("sample_rate", "embed_dim", "n_mels", "audio_dim", "audio_layers", "audio_heads",
                                     "crop_seconds", "vocab_size", "text_dim", "text_layers", "text_heads",
                                     "max_text_tokens", "rvq_levels", "rvq_codebook_size", "eval_clips"),
                     at_least_zero=("rvq_crops_per_clip",), unit=("dropout",))


class AudioTower(nn.Module):
    def __init__(self, cfg: MuLanConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.audio_dim
        self.front = nn.Sequential(nn.Conv1d(cfg.n_mels, d, 3, stride=2, padding=1), nn.GELU(),
                                   nn.Conv1d(d, d, 3, stride=2, padding=1), nn.GELU())
        self.pos = nn.Parameter(torch.randn(1024, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, cfg.audio_heads, 4 * d, dropout=cfg.dropout, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.audio_layers, enable_nested_tensor=False)
        self.proj = nn.Linear(d, cfg.embed_dim)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """[B, N] (at most ~80 s) -> [B, embed_dim], unit norm."""
        mel = log_mel(wav, self.cfg.sample_rate, 1024, 480, self.cfg.n_mels)   # log10, 50 Hz
        mel = (mel - mel.mean((1, 2), keepdim=True)) / (mel.std((1, 2), keepdim=True) + 1e-3)
        h = self.front(mel).transpose(1, 2)
        h = self.encoder(h + self.pos[: h.shape[1]])
        return F.normalize(self.proj(h.mean(1)), dim=-1)


class TextTower(nn.Module):
    """A transformers encoder + tokenizer; by default a small BERT over our sentencepiece vocab."""

    def __init__(self, cfg: MuLanConfig, spm_proto: bytes | None):
        super().__init__()
        self.cfg = cfg
        if cfg.text_pretrained_path:
            from transformers import AutoModel, AutoTokenizer
            try:
                self.hf_tokenizer = AutoTokenizer.from_pretrained(cfg.text_pretrained_path, local_files_only=True)
                self.encoder = AutoModel.from_pretrained(cfg.text_pretrained_path, local_files_only=True)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"cannot load a text encoder from {cfg.text_pretrained_path} ({e})") from None
            width = self.encoder.config.hidden_size
        else:
            import sentencepiece as spm
            from transformers import BertConfig, BertModel
            if spm_proto is None:
                raise CheckpointError("the MuLan checkpoint lacks its sentencepiece model")
            self.spm = spm.SentencePieceProcessor(model_proto=spm_proto)
            self.encoder = BertModel(BertConfig(vocab_size=self.spm.get_piece_size(), hidden_size=cfg.text_dim,
                                                num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                                                intermediate_size=4 * cfg.text_dim,
                                                max_position_embeddings=cfg.max_text_tokens + 2, pad_token_id=0,
                                                hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout),
                                     add_pooling_layer=False)
            width = cfg.text_dim
        self.proj = nn.Linear(width, cfg.embed_dim)

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (ids [B, L], attention mask [B, L]); texts longer than max_text_tokens are cut, with a warning."""
        n = self.cfg.max_text_tokens
        if self.cfg.text_pretrained_path:
            enc = self.hf_tokenizer(texts, padding=True, truncation=True, max_length=n, return_tensors="pt")
            return enc["input_ids"], enc["attention_mask"]
        pieces = [self.spm.encode(t) for t in texts]
        for t, p in zip(texts, pieces):
            if len(p) > n:
                print(f"warning: text truncated to {n} tokens: {t[:40]!r}...", file=sys.stderr)
        pieces = [p[:n] for p in pieces]
        width = max(1, max(len(p) for p in pieces))
        ids = torch.zeros(len(texts), width, dtype=torch.long)
        for i, p in enumerate(pieces):
            ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        return ids, (ids != 0).long()

    def forward(self, texts: list[str]) -> torch.Tensor:
        ids, mask = self.tokenize(texts)
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return F.normalize(self.proj(pooled), dim=-1)


def check_texts(texts: list[str]) -> list[str]:
    if not texts:
        raise UserError("no text given; pass at least one description")
    for t in texts:
        if not isinstance(t, str) or not t.strip():
            raise UserError("a text prompt is empty or only whitespace; describe the music, e.g. 'calm solo piano'")
    return [" ".join(t.split()) for t in texts]


class MuLan(nn.Module):
    """Both towers, the temperature and the conditioning-token quantizer."""

    kind = "mulan"

    def __init__(self, cfg: MuLanConfig, spm_proto: bytes | None = None):
        super().__init__()
        self.cfg = cfg
        self.audio = AudioTower(cfg)
        self.text = TextTower(cfg, spm_proto)
        self.logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1 / 0.07)
        self.rvq = ResidualVQ(cfg.embed_dim, cfg.rvq_levels, cfg.rvq_codebook_size)
        self.register_buffer("spm_proto", torch.frombuffer(bytearray(spm_proto or b"\0"), dtype=torch.uint8).clone())
        self.sample_rate, self.num_tokens, self.codebook_size = cfg.sample_rate, cfg.rvq_levels, cfg.rvq_codebook_size

    def embed_text(self, texts: list[str]) -> torch.Tensor:
        return self.text(check_texts(texts))

    def embed_audio(self, wav: torch.Tensor, sample_rate: int | None = None) -> torch.Tensor:
        """[B, 1, N] -> [B, D]: the mean of window embeddings (windows of crop_seconds), renormalised."""
        x = prepare(wav, sample_rate, self.sample_rate)
        win = int(self.cfg.crop_seconds * self.sample_rate)
        if x.shape[-1] < win:
            x = F.pad(x, (0, win - x.shape[-1]))
        starts = range(0, x.shape[-1] - win + 1, win)
        embs = torch.stack([self.audio(x[:, s:s + win]) for s in starts])
        return F.normalize(embs.mean(0), dim=-1)

    @torch.no_grad()
    def tokens(self, embedding: torch.Tensor) -> torch.Tensor:
        """[B, D] -> [B, Q_m] conditioning tokens."""
        return self.rvq.encode(embedding[:, :, None])[:, :, 0]


def captioned_rows(manifest: str | Path) -> list[dict]:
    """The rows of a training manifest that have a caption (MuLan learns from (clip, caption) pairs)."""
    rows = [r for r in read_manifest(manifest) if r.get("caption", "").strip()]
    if not rows:
        raise UserError(f"{manifest} has no captioned clips; MuLan needs (clip, caption) pairs")
    return rows


@torch.no_grad()
def retrieval(model: MuLan, rows: list[dict], texts: list[str] | None = None) -> dict[str, float]:
    """Text-to-audio retrieval among the given clips: recall@1, recall@10 (chance = 1/n, 10/n)."""
    was = model.training
    model.eval()
    audio, kept = [], []
    for row, wav in iter_audio(rows, model.sample_rate, SkipCounter()):
        audio.append(model.embed_audio(torch.from_numpy(wav)[None, None]))
        kept.append(row)
    a = torch.cat(audio)
    t = torch.cat([model.embed_text((texts or [r["caption"] for r in kept])[i:i + 64])
                   for i in range(0, len(kept), 64)])
    model.train(was)
    return {"n": len(kept), **recall(t, a)}


def recall(t: torch.Tensor, a: torch.Tensor) -> dict[str, float]:
    """Text and audio embeddings [n, D], matched by row -> recall@1 and @10 of text-to-audio retrieval."""
    rank = (t @ a.t()).argsort(1, descending=True)
    hit = rank == torch.arange(len(a))[:, None]
    return {"recall@1": float(hit[:, :1].any(1).float().mean()), "recall@10": float(hit[:, :10].any(1).float().mean())}


class ClapConditioner(nn.Module):
    """transformers' ClapModel from a local folder as a drop-in conditioner (RVQ fitted like MuLan's)."""

    kind = "clap"

    def __init__(self, path: str, rvq_levels: int = 12, rvq_codebook_size: int = 1024):
        super().__init__()
        from transformers import ClapModel, ClapProcessor
        try:
            self.model = ClapModel.from_pretrained(path, local_files_only=True).eval()
            self.processor = ClapProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot load CLAP from {path} ({str(e).splitlines()[0]})") from None
        self.sample_rate = self.processor.feature_extractor.sampling_rate
        dim = self.model.config.projection_dim
        self.rvq = ResidualVQ(dim, rvq_levels, rvq_codebook_size)
        self.num_tokens, self.codebook_size = rvq_levels, rvq_codebook_size

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> torch.Tensor:
        enc = self.processor.tokenizer(check_texts(texts), padding=True, truncation=True, return_tensors="pt")
        return F.normalize(_as_tensor(self.model.get_text_features(**enc)), dim=-1)

    @torch.no_grad()
    def embed_audio(self, wav: torch.Tensor, sample_rate: int | None = None) -> torch.Tensor:
        x = prepare(wav, sample_rate or 24000, self.sample_rate)
        fused = self.model.config.audio_config.enable_fusion  # the extractor must match the model
        feats = self.processor.feature_extractor(list(x.numpy()), sampling_rate=self.sample_rate, return_tensors="pt",
                                                 truncation="fusion" if fused else "rand_trunc")
        extra = {"is_longer": feats["is_longer"]} if fused else {}
        return F.normalize(_as_tensor(self.model.get_audio_features(input_features=feats["input_features"], **extra)),
                           dim=-1)

    tokens = MuLan.tokens


def _as_tensor(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def load_conditioner(path: str | Path | None = None):
    """A MuLan checkpoint (kind mulan) or a local CLAP folder (its tokens need a fitted RVQ)."""
    path = Path(path) if path else DEFAULT_CHECKPOINT
    if hf_model_type(path) == "clap":
        return ClapConditioner(str(path))
    if not path.exists() and path == DEFAULT_CHECKPOINT:
        raise CheckpointError(f"no shipped MuLan at {path}; train one with `python -m audio_tokenizers.mulan train`")
    ck = load_checkpoint(path, kind="mulan")
    cfg = config_from_dict(MuLanConfig, ck.config, str(path))
    proto = bytes(ck.state_dict["spm_proto"].numpy().tobytes())
    model = MuLan(cfg, None if cfg.text_pretrained_path else proto)
    load_weights(model, ck.state_dict, path)
    return model.eval()


if __name__ == "__main__":
    from audio_tokenizers.mulan_train import main
    from common.errors import run_cli
    run_cli(main)
