"""Training loop of the acoustic codec (both backends): `python -m audio_tokenizers.acoustic train`.

Random crops from a manifest, AdamW with warmup + cosine, reconstruction + commitment
losses, held-out metrics every `eval_every` steps (multi-resolution log-mel distance at 2, 4
and all levels, SI-SNR for EnCodec, per-level codebook perplexity) appended to
`out/metrics.jsonl`, checkpoints to `out/last` every `ckpt_every` steps and on SIGINT/SIGTERM.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from audio_tokenizers.acoustic import AcousticConfig, build_codec, tokenizer_for
from common.config import config_to_dict, format_config
from common.errors import UserError
from common.training import StopFlag, log_jsonl, optimizer_step, resume_run, save_run, warmup_cosine
from data.audio import crop_or_pad
from data.dataset import ClipDataset
from data.manifest import SkipCounter, iter_audio, read_manifest
from evaluation.metrics import mel_distance, si_snr


def lr_at(step: int, cfg: AcousticConfig) -> float:
    return warmup_cosine(step, cfg.lr, cfg.warmup, cfg.steps)


def eval_set(cfg: AcousticConfig) -> torch.Tensor:
    """The first `eval_clips` readable held-out clips, `eval_seconds` from their start: [B, N]."""
    skips, clips = SkipCounter(), []
    n = int(cfg.eval_seconds * cfg.sample_rate)
    for _, wav in iter_audio(read_manifest(cfg.valid_manifest)[: cfg.eval_clips * 2], cfg.sample_rate, skips):
        clips.append(torch.from_numpy(crop_or_pad(wav, n).copy()))
        if len(clips) == cfg.eval_clips:
            break
    if not clips:
        raise UserError(f"no readable clips in {cfg.valid_manifest}; {skips.summary()}")
    return torch.stack(clips)


@torch.no_grad()
def evaluate(model, clips: torch.Tensor, cfg: AcousticConfig) -> dict[str, float]:
    model.eval()
    tok = tokenizer_for(model)
    codes = tok.encode(clips[:, None])
    out = {}
    for q in sorted({2, 4, cfg.num_quantizers}):
        if q > cfg.num_quantizers:
            continue
        rec = tok.decode(codes[:, :q], length=clips.shape[-1])[:, 0]
        out[f"mel_distance@{q}"] = float(mel_distance(clips, rec, cfg.sample_rate).mean())
        if cfg.backend == "encodec":
            out[f"si_snr@{q}"] = float(si_snr(rec, clips).mean())
    usage = [len(torch.unique(codes[:, q])) for q in range(codes.shape[1])]
    out["codes_used_per_level"] = usage
    model.train()
    return out


def train(cfg: AcousticConfig, resume: bool = False) -> Path:
    torch.set_num_threads(cfg.threads)
    print(format_config(cfg), flush=True)
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed), np.random.seed(cfg.seed)
    model = build_codec(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.8, 0.99))
    step = 0
    if resume:
        step = resume_run(out, model_kind(cfg), model, opt)["step"]
    rows = read_manifest(cfg.train_manifest)
    data = ClipDataset(rows, cfg.sample_rate, int(cfg.crop_seconds * cfg.sample_rate), seed=cfg.seed)
    clips = eval_set(cfg)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; "
          f"{len(rows)} training clips; {len(clips)} held-out clips", flush=True)

    stop = StopFlag()

    def save() -> None:
        save_run(out, model_kind(cfg), config_to_dict(cfg), model, opt, step)

    bar = tqdm(total=cfg.steps, initial=step, desc="acoustic", mininterval=5.0)
    model.train()
    t0, seen = time.time(), 0
    while step < cfg.steps and not stop.now:
        data.epoch = step  # a new crop per step, reproducible on resume
        idx = np.random.randint(0, len(data), cfg.batch_size)
        wav = torch.stack([data[int(i)] for i in idx])
        losses = model.training_loss(wav[:, 0]) if hasattr(model, "training_loss") else spectral_loss(model, wav[:, 0])
        loss = sum(v for k, v in losses.items() if not k.startswith("_"))
        optimizer_step(model, opt, loss, lr_at(step, cfg), cfg.grad_clip)
        step += 1
        seen += wav.numel()
        bar.update(1)
        if step % cfg.log_every == 0:
            record = {"step": step, "loss": float(loss), "lr": lr_at(step, cfg),
                      "audio_s_per_s": seen / cfg.sample_rate / (time.time() - t0),
                      **{k.lstrip("_"): float(v) if v.numel() == 1 else [round(float(x), 1) for x in v]
                         for k, v in losses.items()}}
            bar.set_postfix(loss=f"{float(loss):.3f}")
            log_jsonl(out, record)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            log_jsonl(out, {"step": step, "eval": evaluate(model, clips, cfg), "skipped": data.skips.summary()},
                      echo=True)
        if step % cfg.ckpt_every == 0:
            save()
    save()
    bar.close()
    print(f"saved {out / 'last'} at step {step}; {data.skips.summary()}", flush=True)
    return out / "last"


def spectral_loss(model, wav: torch.Tensor) -> dict[str, torch.Tensor]:
    logmag = model.log_magnitude(wav)
    res = model(logmag)
    losses = model.loss(res["logmag"], logmag)
    return {**losses, "commit": model.cfg.commit_weight * res["commit"], "_perplexity": res["perplexity"].detach()}


def model_kind(cfg: AcousticConfig) -> str:
    return "acoustic_spectral" if cfg.backend == "spectral" else "acoustic_encodec"

