"""Self-supervised training of the semantic model (BEST-RQ), then k-means on one layer.

BEST-RQ (Chiu et al. 2022): a frozen random projection and a frozen random codebook give
every input frame a target id (nearest codeword by cosine); spans of input frames are
replaced by a learned mask embedding and the model predicts the targets of the masked
frames. No labels, no negatives, no second network; targets never drift.
The same loop trains on k-means ids of the input frames (HuBERT's first iteration) or on the
ids of an earlier semantic tokenizer (HuBERT's second: targets from a model's own layer).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from audio_tokenizers.semantic import (SemanticTokenizer, SemanticTokenizerConfig, build_conformer,
                                       load_semantic, log_mel_frames)
from common.checkpoint import load_checkpoint
from common.config import config_from_dict, format_config
from common.errors import UserError
from common.training import run, step_generator
from data.audio import crop_or_pad
from data.dataset import ClipDataset
from data.manifest import SkipCounter, iter_audio, read_manifest


class BestRQ(nn.Module):
    """Conformer + prediction head + the frozen target quantizer (BEST-RQ's or k-means')."""

    def __init__(self, cfg: SemanticTokenizerConfig):
        super().__init__()
        if cfg.ssl_targets not in ("bestrq", "kmeans", "tokenizer"):
            raise UserError(f"ssl_targets must be bestrq, kmeans or tokenizer, got {cfg.ssl_targets!r}")
        self.cfg = cfg
        self.model = build_conformer(cfg)
        # a plain attribute, not a submodule: the teacher is frozen and not saved with the student
        self.teacher = target_tokenizer(cfg) if cfg.ssl_targets == "tokenizer" else None
        if cfg.init_from_target:
            if self.teacher is None or self.teacher.model is None:
                raise UserError("init_from_target=true needs ssl_targets=tokenizer and a w2vbert target_tokenizer")
            try:
                self.model.load_state_dict(self.teacher.model.state_dict())
            except RuntimeError:
                raise UserError(f"init_from_target: {cfg.target_tokenizer}'s conformer has another size; "
                                "copy its hidden_size/layers/heads/ffn_size or set init_from_target=false") from None
        self.head = nn.Linear(cfg.hidden_size, cfg.rq_codebook_size)
        g = torch.Generator().manual_seed(1234)
        dim = cfg.n_mels * cfg.stack
        self.register_buffer("projection", torch.randn(dim, cfg.rq_dim, generator=g) / dim ** 0.5)
        if cfg.ssl_targets == "bestrq":
            codebook = F.normalize(torch.randn(cfg.rq_codebook_size, cfg.rq_dim, generator=g), dim=1)
        else:   # filled by fit_targets before training, then frozen
            codebook = torch.zeros(cfg.rq_codebook_size, dim)
        self.register_buffer("codebook", codebook)

    def fit_targets(self, wav: torch.Tensor) -> None:
        """k-means targets: cluster the input frames of training clips wav [B, N] once."""
        from sklearn.cluster import MiniBatchKMeans
        x = torch.cat([log_mel_frames(wav[i:i + 16], self.cfg) for i in range(0, len(wav), 16)]).flatten(0, 1)
        km = MiniBatchKMeans(self.cfg.rq_codebook_size, batch_size=4096, n_init=1, max_iter=30,
                             random_state=self.cfg.seed).fit(x.numpy())
        self.codebook.copy_(torch.from_numpy(km.cluster_centers_))

    def targets(self, feats: torch.Tensor) -> torch.Tensor:
        """[B, T, D] -> [B, T] target ids: nearest random codeword by cosine (BEST-RQ) or nearest centroid."""
        if self.teacher is not None:
            return self.teacher.assign(self.teacher.features_of_frames(feats))
        if self.cfg.ssl_targets == "kmeans":
            return (feats @ self.codebook.t() - 0.5 * (self.codebook ** 2).sum(1)).argmax(-1)
        return (F.normalize(feats @ self.projection, dim=-1) @ self.codebook.t()).argmax(-1)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor,
                clean: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """-> (summed cross-entropy on the masked frames, how many it got right, how many there are).
        Targets come from `clean` frames where given (denoising), else from `feats`."""
        hidden = self.model(feats, mask_time_indices=mask).last_hidden_state
        logits = self.head(hidden[mask])
        target = self.targets(feats if clean is None else clean)[mask]
        return (F.cross_entropy(logits, target, reduction="sum"), (logits.argmax(-1) == target).sum(),
                int(target.numel()))


def target_tokenizer(cfg: SemanticTokenizerConfig) -> SemanticTokenizer:
    """The semantic tokenizer whose ids are the targets; it must read the same log-mel frames."""
    if not cfg.target_tokenizer:
        raise UserError("ssl_targets=tokenizer needs target_tokenizer=PATH (a semantic tokenizer checkpoint)")
    teacher = load_semantic(cfg.target_tokenizer)
    if teacher.cfg.backend not in ("w2vbert", "logmel"):
        raise UserError(f"target_tokenizer {cfg.target_tokenizer} has backend {teacher.cfg.backend}; "
                        "targets need a w2vbert or logmel tokenizer (one that reads log-mel frames)")
    keys = ("sample_rate", "n_mels", "mel_hop", "stack")
    differ = [f"{k} {getattr(teacher.cfg, k)} vs {getattr(cfg, k)}" for k in keys
              if getattr(teacher.cfg, k) != getattr(cfg, k)]
    if differ:
        raise UserError(f"target_tokenizer {cfg.target_tokenizer} reads other frames ({', '.join(differ)}); "
                        "set these to the target's values")
    if teacher.codebook_size != cfg.rq_codebook_size:
        raise UserError(f"target_tokenizer has k={teacher.codebook_size}; set rq_codebook_size="
                        f"{teacher.codebook_size}")
    return teacher


def augment(wav: torch.Tensor, prob: float, generator: torch.Generator | None = None, rows: slice = slice(None),
            batch: int | None = None) -> torch.Tensor:
    """[B, N] -> [B, N]: a `prob` fraction of rows get a gain change of +-6 dB and white noise at 10-40 dB SNR.
    With `rows` and `batch`, wav holds those rows of a batch of `batch` rows and the draws are the whole
    batch's, so a DDP rank augments its rows as one process would."""
    batch = batch or len(wav)
    gain = (10 ** ((torch.rand(batch, 1, generator=generator) * 12 - 6) / 20))[rows]
    snr_db = (torch.rand(batch, 1, generator=generator) * 30 + 10)[rows]
    noise = torch.randn(batch, wav.shape[-1], generator=generator)[rows]
    chosen = (torch.rand(batch, 1, generator=generator) < prob)[rows]
    rms = wav.pow(2).mean(-1, keepdim=True).sqrt()
    return torch.where(chosen, gain * (wav + noise * rms * 10 ** (-snr_db / 20)), wav)


def span_mask(B: int, T: int, cfg: SemanticTokenizerConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, T] bool: spans of `mask_span` frames starting at each frame with `mask_prob`."""
    starts = torch.rand(B, T, generator=generator) < cfg.mask_prob
    starts[:, 0] |= ~starts.any(1)  # at least one span per row
    mask = torch.zeros(B, T, dtype=torch.bool)
    for k in range(cfg.mask_span):
        mask[:, k:] |= starts[:, : T - k]
    return mask


def clips_from(manifest: str, cfg: SemanticTokenizerConfig, n: int, seconds: float) -> torch.Tensor:
    skips, out = SkipCounter(), []
    for _, wav in iter_audio(read_manifest(manifest)[: 2 * n], cfg.sample_rate, skips):
        out.append(torch.from_numpy(crop_or_pad(wav, int(seconds * cfg.sample_rate)).copy()))
        if len(out) == n:
            break
    if not out:
        raise UserError(f"no readable clips in {manifest}; {skips.summary()}")
    return torch.stack(out)


@torch.no_grad()
def masked_accuracy(net: BestRQ, clips: torch.Tensor, cfg: SemanticTokenizerConfig) -> float:
    was = net.training
    net.eval()
    feats = log_mel_frames(clips, cfg)
    mask = span_mask(*feats.shape[:2], cfg, torch.Generator().manual_seed(0))
    _, correct, n = net(feats, mask)
    net.train(was)
    return float(correct) / max(n, 1)


class SemanticTask:
    """Masked prediction as a task of the one training loop (common/training.py)."""
    kind = "semantic_ssl"

    def __init__(self, cfg: SemanticTokenizerConfig, resume: bool):
        if cfg.backend != "w2vbert":
            raise UserError(f"train needs backend=w2vbert; for backend={cfg.backend} run the kmeans command")
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.model = BestRQ(cfg)
        self.data = ClipDataset(read_manifest(cfg.train_manifest), cfg.sample_rate,
                                int(cfg.crop_seconds * cfg.sample_rate), seed=cfg.seed)
        if cfg.ssl_targets == "kmeans" and not resume:   # (a resumed run has them in its weights)
            self.model.fit_targets(clips_from(cfg.train_manifest, cfg, min(len(self.data), 400), cfg.crop_seconds))
        self.held_out = clips_from(cfg.valid_manifest, cfg, cfg.eval_clips, cfg.crop_seconds)
        print(f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.2f} M parameters", flush=True)

    def loss(self, model, step: int, micro: int, rank: int, world: int):
        cfg, g = self.cfg, step_generator(self.cfg.seed, step, micro)
        mine = slice(rank, None, world)
        idx = torch.randint(len(self.data), (cfg.batch_size,), generator=g)[mine]
        self.data.epoch = step * cfg.grad_accum + micro
        wav = torch.stack([self.data[int(i)] for i in idx])[:, 0]
        feats = log_mel_frames(wav, cfg)
        mask = span_mask(cfg.batch_size, feats.shape[1], cfg, g)[mine]
        noisy = log_mel_frames(augment(wav, cfg.augment_prob, g, mine, cfg.batch_size), cfg) if cfg.augment_prob > 0 \
            else feats
        ce, correct, n = model(noisy, mask, clean=feats if cfg.augment_prob > 0 else None)
        total = torch.tensor(float(n))
        if world > 1:   # the mean over the global batch's masked frames, as one process would take it
            torch.distributed.all_reduce(total)
        return ce * world / total, {"masked_acc": float(correct) / max(n, 1), "_seen": wav.numel() / cfg.sample_rate}

    def evaluate(self, model) -> dict:
        return {"heldout_masked_acc": masked_accuracy(model, self.held_out, self.cfg)}

    def finish(self, model) -> Path:
        out = Path(self.cfg.out) / "tokenizer"
        fit_kmeans(self.cfg, model.model).save(out)
        print(f"saved the tokenizer (conformer + k-means, k={self.cfg.codebook_size}) to {out}", flush=True)
        return out


def train(cfg: SemanticTokenizerConfig, resume: bool = False, stop_after: int | None = None) -> Path:
    return run(SemanticTask(cfg, resume), cfg, resume, stop_after, betas=(0.9, 0.999))


def fit_kmeans(cfg: SemanticTokenizerConfig, model: nn.Module | None) -> SemanticTokenizer:
    """Mini-batch k-means on `kmeans_frames` frames of layer `cfg.layer` over the training split."""
    from sklearn.cluster import MiniBatchKMeans
    probe = SemanticTokenizer(cfg, torch.zeros(1, 1), model)
    rows = read_manifest(cfg.train_manifest)
    rng = np.random.default_rng(cfg.seed)
    rows = [rows[i] for i in rng.permutation(len(rows))[: cfg.kmeans_clips]]
    feats, skips = [], SkipCounter()
    for _, wav in tqdm(iter_audio(rows, cfg.sample_rate, skips), total=len(rows), desc="k-means features",
                       mininterval=5.0):
        feats.append(probe.features(torch.from_numpy(wav)[None, None])[0])
    x = torch.cat(feats).numpy()
    x = x[rng.permutation(len(x))[: cfg.kmeans_frames]]
    if len(x) < cfg.codebook_size:
        raise UserError(f"only {len(x)} frames for k={cfg.codebook_size}; use more clips or a smaller k")
    mean = std = None
    if cfg.kmeans_standardize:   # otherwise the few dims with the largest spread decide the clusters
        mean, std = x.mean(0), x.std(0) + 1e-5
        x = (x - mean) / std
        mean, std = torch.from_numpy(mean), torch.from_numpy(std)
    km = MiniBatchKMeans(cfg.codebook_size, batch_size=4096, n_init=1, max_iter=50, random_state=cfg.seed,
                         reassignment_ratio=0.01).fit(x)
    print(f"k-means on {len(x)} frames of {x.shape[1]} dims; {skips.summary()}", flush=True)
    return SemanticTokenizer(cfg, torch.from_numpy(km.cluster_centers_).float(), model, mean, std)


KMEANS_KEYS = ("backend", "pretrained_path", "layer", "codebook_size", "train_manifest", "kmeans_clips",
               "kmeans_frames", "kmeans_standardize", "seed", "threads")


def kmeans_command(cfg: SemanticTokenizerConfig, model_path: str | None, out: Path) -> None:
    """Fit and save a tokenizer for any backend (w2vbert needs --model: a run or a tokenizer)."""
    torch.set_num_threads(cfg.threads)
    print(format_config(cfg), flush=True)
    model = None
    if cfg.backend == "w2vbert":
        if not model_path:
            raise UserError("backend=w2vbert needs --model (a training run's last/ or a tokenizer)")
        header = load_checkpoint(model_path, kind=("semantic_ssl", "semantic_tokenizer"))
        trained = config_from_dict(SemanticTokenizerConfig, header.config, model_path)
        if header.kind == "semantic_tokenizer":
            model = load_semantic(model_path).model
        else:
            net = BestRQ(trained)
            net.load_state_dict(header.state_dict)
            model = net.model
        # the model and how it was trained come from its checkpoint; only the k-means settings from here
        for key, value in vars(trained).items():
            if key not in KMEANS_KEYS:
                setattr(cfg, key, value)
    fit_kmeans(cfg, model).save(out)
    print(f"saved {out}")


def main() -> None:
    import argparse

    from common.config import load_config, parse_args_with_overrides
    from data.audio import load_audio

    ap = argparse.ArgumentParser(prog="python -m audio_tokenizers.semantic", description="Train or use a semantic tokenizer.")
    sub = ap.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="self-supervised training (BEST-RQ), then k-means")
    km = sub.add_parser("kmeans", help="fit k-means for any backend and save a tokenizer")
    for p in (tr, km):
        p.add_argument("--config", default="configs/semantic_tokenizer.yaml")
        p.add_argument("overrides", nargs="*", help="key=value")
    tr.add_argument("--resume", action="store_true")
    tr.add_argument("--stop-after", type=int, default=None, metavar="STEP", help="save and stop at this step")
    km.add_argument("--model", default=None, help="a trained tokenizer/run whose conformer to reuse")
    km.add_argument("--out", required=True, help="tokenizer checkpoint folder to write")
    en = sub.add_parser("encode", help="print the token ids of audio files")
    en.add_argument("files", nargs="+")
    en.add_argument("--checkpoint", default=None)
    args = parse_args_with_overrides(ap)
    if args.command in ("train", "kmeans"):
        cfg = load_config(SemanticTokenizerConfig, args.config, args.overrides)
        if args.command == "train":
            train(cfg, resume=args.resume, stop_after=args.stop_after)
        else:
            kmeans_command(cfg, args.model, Path(args.out))
        return
    tok = load_semantic(args.checkpoint)
    for f in args.files:
        wav = torch.from_numpy(load_audio(f, tok.sample_rate, allow_silent=True))[None, None]
        ids = tok.encode(wav)[0]
        print(f"{f} " + " ".join(str(int(i)) for i in ids))
