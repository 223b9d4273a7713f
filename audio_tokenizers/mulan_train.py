"""Training MuLan (symmetric InfoNCE), fitting its conditioning-token RVQ, and the commands.

    python -m audio_tokenizers.mulan train --config configs/mulan.yaml [key=value ...]
    python -m audio_tokenizers.mulan score --audio A.wav B.wav --text "..." "..." [--checkpoint P]
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from audio_tokenizers.mulan import MuLan, MuLanConfig, captioned_rows, retrieval
from common.checkpoint import save_checkpoint
from common.config import config_to_dict
from common.errors import UserError
from common.training import run, step_generator
from data import captions as cap
from data.audio import crop_or_pad
from data.manifest import SkipCounter, iter_audio, read_manifest
from data.dataset import ClipDataset


def train_sentencepiece(texts: list[str], vocab_size: int) -> bytes:
    import contextlib

    import sentencepiece as spm
    with tempfile.TemporaryDirectory() as d, contextlib.chdir(d):   # relative paths: the model records them,
        (Path(d) / "captions.txt").write_text("\n".join(texts) + "\n")    # and a temp folder's name differs per run
        if vocab_size < 400:  # byte fallback alone takes 256 pieces
            raise UserError(f"vocab_size={vocab_size} is too small for a byte-fallback vocabulary; use at least 400")
        spm.SentencePieceTrainer.train(input="captions.txt", model_prefix="spm",
                                       vocab_size=vocab_size, model_type="unigram", pad_id=0, unk_id=1,
                                       bos_id=-1, eos_id=-1, byte_fallback=True, character_coverage=1.0,
                                       hard_vocab_limit=False, minloglevel=2)
        return (Path(d) / "spm.model").read_bytes()


def fresh_caption(row: dict, rng: np.random.Generator) -> str:
    """A new phrasing of the clip's caption from its metadata (corpus clips), else its caption."""
    if cap.has_metadata(row):
        return cap.make_caption(row, rng)
    return row["caption"]


class MuLanLoss(torch.nn.Module):
    """What DDP wraps: symmetric InfoNCE of a batch of (audio crop, caption) pairs. Under DDP each rank embeds
    its rows and gathers every rank's embeddings (with their gradients), so the logits are the global batch's
    and the loss is the one a single process would compute."""

    def __init__(self, model: MuLan):
        super().__init__()
        self.model = model

    def forward(self, wav: torch.Tensor, texts: list[str], rank: int, world: int) -> torch.Tensor:
        a, t = self.model.audio(wav), self.model.text(texts)
        if world > 1:
            from torch.distributed.nn.functional import all_gather
            everyone = lambda x: torch.stack(all_gather(x), 1).reshape(-1, x.shape[-1])  # noqa: E731 (global order)
            a_all, t_all = everyone(a), everyone(t)
        else:
            a_all, t_all = a, t
        target = torch.arange(len(a)) * world + rank          # where this rank's rows sit in the global batch
        scale = self.model.logit_scale.exp().clamp(max=100)
        return (F.cross_entropy(scale * a @ t_all.t(), target) + F.cross_entropy(scale * t @ a_all.t(), target)) / 2


class MuLanTask:
    """MuLan as a task of the one training loop (common/training.py)."""
    kind = "mulan"

    def __init__(self, cfg: MuLanConfig):
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.rows = captioned_rows(cfg.train_manifest)
        rng = np.random.default_rng(cfg.seed)
        proto = None
        if not cfg.text_pretrained_path:
            proto = train_sentencepiece([r["caption"] for r in self.rows] + [fresh_caption(r, rng) for r in self.rows],
                                        cfg.vocab_size)
        self.model = MuLan(cfg, proto)
        self.train_module = MuLanLoss(self.model)
        self.data = ClipDataset(self.rows, cfg.sample_rate, int(cfg.crop_seconds * cfg.sample_rate), seed=cfg.seed)
        self.valid = read_manifest(cfg.valid_manifest)[: cfg.eval_clips]
        print(f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.2f} M parameters; {len(self.rows)} captioned "
              "clips", flush=True)

    def loss(self, model, step: int, micro: int, rank: int, world: int):
        cfg = self.cfg
        idx = torch.randint(len(self.rows), (cfg.batch_size,), generator=step_generator(cfg.seed, step, micro))
        self.data.epoch = step * cfg.grad_accum + micro
        mine = range(rank, cfg.batch_size, world)
        wav = torch.stack([self.data[int(idx[j])] for j in mine])[:, 0]
        # every caption re-phrased from its clip's metadata, drawn per (step, place in the global batch)
        texts = [fresh_caption(self.rows[int(idx[j])], np.random.default_rng([cfg.seed, step, micro, j])) for j in mine]
        loss = model(wav, texts, rank, world)
        return loss, {"temperature": float(1 / self.model.logit_scale.exp()), "_seen": wav.numel() / cfg.sample_rate}

    def evaluate(self, model) -> dict:
        return retrieval(model, self.valid)

    def finish(self, model) -> Path:
        fit_tokens(model, self.rows, self.cfg)
        out = Path(self.cfg.out) / "model"
        save_checkpoint(out, "mulan", config_to_dict(self.cfg), model.state_dict())
        print(f"saved {out}", flush=True)
        return out


def train(cfg: MuLanConfig, resume: bool = False, stop_after: int | None = None) -> Path:
    if not 0.0 <= cfg.filler_words <= 1.0 or (cfg.filler_words and not cfg.lock_audio):
        raise UserError(f"filler_words={cfg.filler_words}: a share in [0, 1], and only for text-tower runs "
                        "(lock_audio=<a MuLan>); drop it or set lock_audio")
    if cfg.lock_audio:
        from audio_tokenizers.mulan_lit import LockedAudioTask
        return run(LockedAudioTask(cfg), cfg, resume, stop_after, betas=(0.9, 0.999))
    return run(MuLanTask(cfg), cfg, resume, stop_after, betas=(0.9, 0.999))


@torch.no_grad()
def fit_tokens(model, rows: list[dict], cfg: MuLanConfig) -> None:
    """Fit the conditioning RVQ on audio embeddings: each training clip whole plus random crops."""
    model.eval()
    embs, rng = [], np.random.default_rng(cfg.seed)
    win = int(cfg.crop_seconds * model.sample_rate)
    for _, wav in tqdm(iter_audio(rows, model.sample_rate, SkipCounter()), total=len(rows), desc="rvq features",
                       mininterval=5.0):
        x = torch.from_numpy(wav)[None, None]
        embs.append(model.embed_audio(x))
        crops = [torch.from_numpy(crop_or_pad(wav, win, rng).copy()) for _ in range(cfg.rvq_crops_per_clip)]
        if crops:
            embs.append(model.embed_audio(torch.stack(crops)[:, None]))
    model.rvq.fit(torch.cat(embs))
    print(f"fitted {cfg.rvq_levels} x {cfg.rvq_codebook_size} RVQ on {sum(len(e) for e in embs)} embeddings",
          flush=True)


def score(model, audio_files: list[str], texts: list[str]) -> dict:
    from data.audio import load_audio
    a = torch.cat([model.embed_audio(torch.from_numpy(load_audio(f, model.sample_rate, allow_silent=True))[None, None])
                   for f in audio_files])
    t = model.embed_text(texts)
    return {"audio": audio_files, "text": texts, "cosine": [[round(float(v), 4) for v in row] for row in t @ a.t()]}


def main() -> None:
    import argparse

    from audio_tokenizers.mulan import load_conditioner
    from common.config import load_config, parse_args_with_overrides
    ap = argparse.ArgumentParser(prog="python -m audio_tokenizers.mulan")
    sub = ap.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="contrastive training, then the conditioning-token RVQ")
    tr.add_argument("--config", default="configs/mulan.yaml")
    tr.add_argument("--resume", action="store_true")
    tr.add_argument("--stop-after", type=int, default=None, metavar="STEP", help="save and stop at this step")
    tr.add_argument("overrides", nargs="*")
    sc = sub.add_parser("score", help="cosine of text and audio embeddings, as JSON")
    sc.add_argument("--audio", nargs="+", required=True)
    sc.add_argument("--text", nargs="+", required=True)
    sc.add_argument("--checkpoint", default=None)
    args = parse_args_with_overrides(ap)
    if args.command == "train":
        train(load_config(MuLanConfig, args.config, args.overrides), resume=args.resume, stop_after=args.stop_after)
        return
    with torch.no_grad():
        print(json.dumps(score(load_conditioner(args.checkpoint), args.audio, args.text)))
