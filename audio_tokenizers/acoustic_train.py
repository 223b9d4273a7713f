"""Training the acoustic codec (both backends) on the one loop of common/training.py:
`python -m audio_tokenizers.acoustic train`.

Random crops from a manifest, AdamW with warmup + cosine, reconstruction + commitment
losses, held-out metrics every `eval_every` steps (multi-resolution log-mel distance at 2, 4
and all levels, SI-SNR for EnCodec, codes used per level) appended to `out/metrics.jsonl`,
checkpoints to `out/last` every `ckpt_every` steps and on SIGINT/SIGTERM. Under torchrun the RVQ
makes the codebook updates of the whole global batch on every rank (audio_tokenizers/rvq.py).
"""
from __future__ import annotations

from pathlib import Path

import torch

from audio_tokenizers.acoustic import AcousticConfig, build_codec, load_acoustic, tokenizer_for
from common.errors import UserError
from common.training import run, step_generator
from data.audio import crop_or_pad
from data.dataset import ClipDataset
from data.manifest import SkipCounter, iter_audio, read_manifest
from evaluation.metrics import mel_distance, si_snr


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


class CodecLoss(torch.nn.Module):
    """What DDP wraps: a forward that is the codec's training loss (the codec is its only submodule, so its
    weights are saved and shared unprefixed)."""

    def __init__(self, codec: torch.nn.Module):
        super().__init__()
        self.codec = codec

    def forward(self, wav: torch.Tensor) -> dict[str, torch.Tensor]:
        if hasattr(self.codec, "training_loss"):
            return self.codec.training_loss(wav)
        return spectral_loss(self.codec, wav)


class CodecTask:
    """The codec as a task of the one training loop (common/training.py)."""

    def __init__(self, cfg: AcousticConfig):
        self.cfg, self.kind = cfg, model_kind(cfg)
        torch.manual_seed(cfg.seed)
        self.model = build_codec(cfg)
        self.train_module = CodecLoss(self.model)
        rows = read_manifest(cfg.train_manifest)
        self.data = ClipDataset(rows, cfg.sample_rate, int(cfg.crop_seconds * cfg.sample_rate), seed=cfg.seed)
        self.clips = eval_set(cfg)
        print(f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.2f} M parameters; "
              f"{len(rows)} training clips; {len(self.clips)} held-out clips", flush=True)

    def loss(self, model, step: int, micro: int, rank: int, world: int):
        g = step_generator(self.cfg.seed, step, micro)
        idx = torch.randint(len(self.data), (self.cfg.batch_size,), generator=g)[rank::world]
        self.data.epoch = step * self.cfg.grad_accum + micro   # a new crop per step, reproducible on resume
        wav = torch.stack([self.data[int(i)] for i in idx])[:, 0]
        losses = model(wav)
        loss = sum(v for k, v in losses.items() if not k.startswith("_"))
        logs = {k.lstrip("_"): float(v) if v.numel() == 1 else [round(float(x), 1) for x in v] for k, v in losses.items()}
        return loss, {**logs, "_seen": wav.numel() / self.cfg.sample_rate}

    def evaluate(self, model) -> dict:
        return {**evaluate(model, self.clips, self.cfg), "skipped": self.data.skips.summary()}

    def finish(self, model) -> Path:
        out = Path(self.cfg.out) / "last"
        print(f"saved {out} at step {self.cfg.steps}; {self.data.skips.summary()}", flush=True)
        return out


def train(cfg: AcousticConfig, resume: bool = False, stop_after: int | None = None) -> Path:
    return run(CodecTask(cfg), cfg, resume, stop_after, betas=(0.8, 0.99))


def spectral_loss(model, wav: torch.Tensor) -> dict[str, torch.Tensor]:
    logmag = model.log_magnitude(wav)
    res = model(logmag)
    losses = model.loss(res["logmag"], logmag)
    return {**losses, "commit": model.cfg.commit_weight * res["commit"], "_perplexity": res["perplexity"].detach()}


def model_kind(cfg: AcousticConfig) -> str:
    return "acoustic_spectral" if cfg.backend == "spectral" else "acoustic_encodec"


def main() -> None:
    import argparse

    from common.config import load_config, parse_args_with_overrides
    from common.errors import UserError
    from data.audio import load_audio, write_wav

    ap = argparse.ArgumentParser(prog="python -m audio_tokenizers.acoustic", description="Train or use an acoustic codec.")
    sub = ap.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a codec on a manifest")
    tr.add_argument("--config", default="configs/acoustic.yaml")
    tr.add_argument("--resume", action="store_true", help="continue from OUT/last")
    tr.add_argument("--stop-after", type=int, default=None, metavar="STEP", help="save and stop at this step")
    tr.add_argument("overrides", nargs="*", help="key=value")
    rt = sub.add_parser("roundtrip", help="encode and decode one file")
    rt.add_argument("input")
    rt.add_argument("output")
    rt.add_argument("--checkpoint", default=None)
    rt.add_argument("--levels", type=int, default=None, help="decode with the first Q levels")
    args = parse_args_with_overrides(ap)
    if args.command == "train":
        train(load_config(AcousticConfig, args.config, args.overrides), resume=args.resume, stop_after=args.stop_after)
        return
    tok = load_acoustic(args.checkpoint)
    levels = args.levels or tok.num_quantizers
    if not 1 <= levels <= tok.num_quantizers:
        raise UserError(f"--levels must be between 1 and {tok.num_quantizers}")
    if not Path(args.output).parent.is_dir():
        raise UserError(f"cannot write {args.output}: its folder does not exist")
    wav = torch.from_numpy(load_audio(args.input, tok.sample_rate, allow_silent=True))[None, None]
    codes = tok.encode(wav)
    out = tok.decode(codes[:, :levels], length=wav.shape[-1])
    write_wav(args.output, out[0, 0].numpy(), tok.sample_rate)
    print(f"{args.input}: {wav.shape[-1] / tok.sample_rate:.2f} s -> codes {list(codes.shape[1:])} "
          f"({levels} levels decoded) -> {args.output}")
