"""Training MuLan (symmetric InfoNCE), fitting its conditioning-token RVQ, and the commands.

    python -m audio_tokenizers.mulan train --config configs/mulan.yaml [key=value ...]
    python -m audio_tokenizers.mulan score --audio A.wav B.wav --text "..." "..." [--checkpoint P]
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from audio_tokenizers.mulan import MuLan, MuLanConfig
from common.checkpoint import save_checkpoint
from common.config import config_to_dict, format_config
from common.errors import UserError
from common.training import StopFlag, log_jsonl, optimizer_step, resume_run, save_run, warmup_cosine
from data import captions as cap
from data.audio import crop_or_pad
from data.manifest import SkipCounter, iter_audio, read_manifest
from data.dataset import ClipDataset


def train_sentencepiece(texts: list[str], vocab_size: int) -> bytes:
    import sentencepiece as spm
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "captions.txt").write_text("\n".join(texts) + "\n")
        if vocab_size < 400:  # byte fallback alone takes 256 pieces
            raise UserError(f"vocab_size={vocab_size} is too small for a byte-fallback vocabulary; use at least 400")
        spm.SentencePieceTrainer.train(input=str(Path(d) / "captions.txt"), model_prefix=str(Path(d) / "spm"),
                                       vocab_size=vocab_size, model_type="unigram", pad_id=0, unk_id=1,
                                       bos_id=-1, eos_id=-1, byte_fallback=True, character_coverage=1.0,
                                       hard_vocab_limit=False, minloglevel=2)
        return (Path(d) / "spm.model").read_bytes()


def fresh_caption(row: dict, rng: np.random.Generator) -> str:
    """A new phrasing of the clip's caption from its metadata (corpus clips), else its caption."""
    if all(k in row for k in ("style", "players", "tempo", "key", "mode", "meter")):
        return cap.make_caption(row, rng)
    return row["caption"]


@torch.no_grad()
def retrieval(model: MuLan, rows: list[dict], texts: list[str] | None = None) -> dict[str, float]:
    """Text-to-audio retrieval among the given clips: recall@1, recall@10 (chance = 1/n, 10/n)."""
    model.eval()
    audio, kept = [], []
    for row, wav in iter_audio(rows, model.sample_rate, SkipCounter()):
        audio.append(model.embed_audio(torch.from_numpy(wav)[None, None]))
        kept.append(row)
    a = torch.cat(audio)
    t = torch.cat([model.embed_text((texts or [r["caption"] for r in kept])[i:i + 64])
                   for i in range(0, len(kept), 64)])
    model.train()
    return {"n": len(kept), **recall(t, a)}


def recall(t: torch.Tensor, a: torch.Tensor) -> dict[str, float]:
    """Text and audio embeddings [n, D], matched by row -> recall@1 and @10 of text-to-audio retrieval."""
    rank = (t @ a.t()).argsort(1, descending=True)
    hit = rank == torch.arange(len(a))[:, None]
    return {"recall@1": float(hit[:, :1].any(1).float().mean()), "recall@10": float(hit[:, :10].any(1).float().mean())}


def train(cfg: MuLanConfig, resume: bool = False) -> Path:
    torch.set_num_threads(cfg.threads)
    print(format_config(cfg), flush=True)
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed), np.random.seed(cfg.seed)
    rows = [r for r in read_manifest(cfg.train_manifest) if r.get("caption", "").strip()]
    if not rows:
        raise UserError(f"{cfg.train_manifest} has no captioned clips; MuLan needs (clip, caption) pairs")
    rng = np.random.default_rng(cfg.seed)
    proto = None
    if not cfg.text_pretrained_path:
        proto = train_sentencepiece([r["caption"] for r in rows] + [fresh_caption(r, rng) for r in rows],
                                    cfg.vocab_size)
    model = MuLan(cfg, proto)
    opt = torch.optim.AdamW([p for n, p in model.named_parameters()], lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = 0
    if resume:
        step = resume_run(out, "mulan", model, opt)["step"]
    data = ClipDataset(rows, cfg.sample_rate, int(cfg.crop_seconds * cfg.sample_rate), seed=cfg.seed)
    valid = read_manifest(cfg.valid_manifest)[: cfg.eval_clips]
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; {len(rows)} captioned clips",
          flush=True)
    stop, t0 = StopFlag(), time.time()
    bar = tqdm(total=cfg.steps, initial=step, desc="mulan", mininterval=5.0)
    while step < cfg.steps and not stop.now:
        data.epoch = step
        idx = np.random.randint(0, len(rows), cfg.batch_size)
        wav = torch.stack([data[int(i)] for i in idx])[:, 0]
        step_rng = np.random.default_rng([cfg.seed, step])
        texts = [fresh_caption(rows[int(i)], step_rng) for i in idx]
        a, t = model.audio(wav), model.text(texts)
        logits = model.logit_scale.exp().clamp(max=100) * a @ t.t()
        target = torch.arange(len(idx))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        optimizer_step(model, opt, loss, warmup_cosine(step, cfg.lr, cfg.warmup, cfg.steps), cfg.grad_clip)
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            log_jsonl(out, {"step": step, "loss": loss.item(), "temperature": float(1 / model.logit_scale.exp()),
                            "elapsed_s": round(time.time() - t0, 1)})
        if step % cfg.eval_every == 0 or step == cfg.steps:
            log_jsonl(out, {"step": step, "valid": retrieval(model, valid)}, echo=True)
        if step % cfg.ckpt_every == 0:
            save_run(out, "mulan", config_to_dict(cfg), model, opt, step)
    save_run(out, "mulan", config_to_dict(cfg), model, opt, step)
    bar.close()
    if stop.now:
        print(f"stopped at step {step}; continue with --resume", flush=True)
        return out / "last"
    fit_tokens(model, rows, cfg)
    save_checkpoint(out / "model", "mulan", config_to_dict(cfg), model.state_dict())
    print(f"saved {out / 'model'}", flush=True)
    return out / "model"


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
    tr.add_argument("overrides", nargs="*")
    sc = sub.add_parser("score", help="cosine of text and audio embeddings, as JSON")
    sc.add_argument("--audio", nargs="+", required=True)
    sc.add_argument("--text", nargs="+", required=True)
    sc.add_argument("--checkpoint", default=None)
    args = parse_args_with_overrides(ap)
    if args.command == "train":
        train(load_config(MuLanConfig, args.config, args.overrides), resume=args.resume)
        return
    with torch.no_grad():
        print(json.dumps(score(load_conditioner(args.checkpoint), args.audio, args.text)))
