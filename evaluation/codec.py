"""Held-out quality of an acoustic codec: what the model card reports.

    python -m evaluation.codec --corpus corpus --checkpoint pretrained/acoustic --out eval/codec

- multi-resolution log-mel L1 distance (FFT 512/1024/2048, log10 mel) at 2, 4 and all levels
  on the test split (SI-SNR too, meaningful only for codecs that model phase);
- instrument retention: a classifier (MFCC mean/std + logistic regression) trained on
  original train-split clips, scored on the test clips and on their reconstructions;
- a PNG of log-mel spectrograms of 3 test clips, original beside reconstruction.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from evaluation import use_threads
from audio_tokenizers.acoustic import load_acoustic
from common.errors import UserError, run_cli
from data.audio import crop_or_pad
from data.manifest import SkipCounter, iter_audio, read_manifest
from evaluation.metrics import mel_distance, si_snr


def mfcc_features(wav: np.ndarray, sr: int) -> np.ndarray:
    """MFCC (20) and delta mean/std over time: a fixed 80-dim clip descriptor."""
    import librosa
    m = librosa.feature.mfcc(y=wav, sr=sr, n_mfcc=20)
    d = librosa.feature.delta(m)
    return np.concatenate([m.mean(1), m.std(1), d.mean(1), d.std(1)])


def instrument_classifier(rows: list[dict], sr: int, seconds: float, label: str = "instrument_label",
                          features: Path | None = None):
    """Fit MFCC-stats + logistic regression on original clips; returns the classifier. `features`: an .npz that
    keeps the clips' features between runs (reused only for the same clips, crop length and sample rate)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    key = hashlib.sha256(json.dumps([[r["audio"] for r in rows], seconds, sr, label]).encode()).hexdigest()[:16]
    saved = dict(np.load(features, allow_pickle=False)) if features is not None and features.is_file() else {}
    if str(saved.get("key")) == key:
        X, y = saved["X"], saved["y"]
    else:
        X, y = [], []
        for row, wav in iter_audio(rows, sr, SkipCounter()):
            X.append(mfcc_features(crop_or_pad(wav, int(seconds * sr)), sr))
            y.append(row[label])
        X, y = np.array(X), np.array(y)
        if features is not None:
            features.parent.mkdir(parents=True, exist_ok=True)
            tmp = features.with_name(features.name + ".tmp.npz")
            np.savez(tmp, X=X, y=y, key=key)
            tmp.replace(features)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    clf.fit(X, y)
    return clf


def load_clips(rows, sr, seconds):
    out = []
    for row, wav in iter_audio(rows, sr, SkipCounter()):
        out.append((row, torch.from_numpy(crop_or_pad(wav, int(seconds * sr)).copy())))
    return out


def evaluate_codec(tok, corpus: Path, clips: int, seconds: float, train_clips: int, out: Path) -> dict:
    sr = tok.sample_rate
    test = load_clips(read_manifest(corpus / "test.jsonl")[:clips], sr, seconds)
    if not test:
        raise UserError(f"no readable clips in {corpus / 'test.jsonl'}")
    levels = sorted({2, 4, tok.num_quantizers} & set(range(1, tok.num_quantizers + 1)))
    results, recon = {"clips": len(test), "seconds": seconds}, {}
    t0 = time.time()
    for q in levels:
        dists, snrs, rec_all = [], [], []
        for i in range(0, len(test), 8):
            x = torch.stack([w for _, w in test[i:i + 8]])
            rec = tok.decode(tok.encode(x[:, None])[:, :q], length=x.shape[-1])[:, 0]
            dists.append(mel_distance(x, rec, sr))
            snrs.append(si_snr(rec, x))
            rec_all.append(rec)
        results[f"mel_distance@{q}"] = round(float(torch.cat(dists).mean()), 4)
        results[f"si_snr_db@{q}"] = round(float(torch.cat(snrs).mean()), 2)
        recon[q] = torch.cat(rec_all)
    results["decode_seconds_per_audio_second"] = round((time.time() - t0) / (len(test) * seconds * len(levels)), 4)
    clf = instrument_classifier(read_manifest(corpus / "train.jsonl")[:train_clips], sr, seconds)
    labels = np.array([r["instrument_label"] for r, _ in test])
    orig = clf.predict(np.array([mfcc_features(w.numpy(), sr) for _, w in test]))
    full = clf.predict(np.array([mfcc_features(w.numpy(), sr) for w in recon[levels[-1]]]))
    results["instrument_acc_original"] = round(float(np.mean(orig == labels)), 4)
    results["instrument_acc_reconstructed"] = round(float(np.mean(full == labels)), 4)
    results["instrument_retention"] = round(results["instrument_acc_reconstructed"] /
                                            max(results["instrument_acc_original"], 1e-9), 4)
    results["instrument_classes"] = len(Counter(labels))
    out.mkdir(parents=True, exist_ok=True)
    plot_pairs([w for _, w in test[:3]], [recon[levels[-1]][i] for i in range(3)],
               [r["caption"] for r, _ in test[:3]], sr, out / "spectrograms.png")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def plot_pairs(originals, reconstructions, titles, sr, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from audio_tokenizers.spectral import log_mel
    fig, axes = plt.subplots(len(originals), 2, figsize=(12, 2.6 * len(originals)), squeeze=False)
    for i, (a, b) in enumerate(zip(originals, reconstructions)):
        for j, (w, name) in enumerate(((a, "original"), (b, "reconstruction"))):
            m = log_mel(w[None].float(), sr, 1024, 256, 80)[0].numpy()
            axes[i, j].imshow(m, origin="lower", aspect="auto", vmin=-5, vmax=m.max(),
                              extent=[0, len(w) / sr, 0, 80])
            axes[i, j].set_title(f"{name}: {titles[i][:60]}", fontsize=8)
            axes[i, j].set_ylabel("mel band")
    plt.tight_layout()
    plt.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description="Held-out quality of an acoustic codec.")
    ap.add_argument("--corpus", type=Path, required=True, help="folder with train/test.jsonl")
    ap.add_argument("--checkpoint", default=None, help="default: the shipped codec")
    ap.add_argument("--out", type=Path, default=Path("eval/codec"))
    ap.add_argument("--clips", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--train-clips", type=int, default=1000)
    ap.add_argument("--card", type=Path, default=None, help="also write a model card (CARD.md) there")
    ap.add_argument("--run", type=Path, default=None, help="the training run (for steps and time on the card)")
    args = ap.parse_args()
    use_threads()
    results = evaluate_codec(load_acoustic(args.checkpoint), args.corpus, args.clips, args.seconds,
                             args.train_clips, args.out)
    print(json.dumps(results, indent=2))
    if args.card:
        write_card(args.card, args.checkpoint, results, args.run, args)


def write_card(path: Path, checkpoint, results: dict, run: Path | None, args) -> None:
    """A model card from the measured results and the run's log."""
    from common.checkpoint import read_header
    header = read_header(checkpoint or "pretrained/acoustic")
    cfg = header["config"]
    log = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()] if run else []
    steps = max((r["step"] for r in log), default=header.get("meta", {}).get("step", "?"))
    evals = [r for r in log if "eval" in r]
    levels = sorted(int(k.split("@")[1]) for k in results if k.startswith("mel_distance@"))
    rows = "\n".join(f"| {q} | {results[f'mel_distance@{q}']} | {results[f'si_snr_db@{q}']} |" for q in levels)
    curve = "\n".join(f"| {r['step']} | {r['eval'].get(f'mel_distance@{levels[-1]}', float('nan')):.4f} |" for r in evals)
    text = f"""# Acoustic codec: {header['kind']}

Backend `{cfg['backend']}`: STFT log-magnitudes (n_fft {cfg['n_fft']}, hop {cfg['hop']} = {cfg['sample_rate'] / cfg['hop']:.0f} Hz
frames at {cfg['sample_rate']} Hz) -> ConvNeXt encoder (dim {cfg['dim']}, {cfg['encoder_blocks']} blocks) ->
RVQ {cfg['num_quantizers']} x {cfg['codebook_size']} (EMA codebooks, k-means init, dead-code restarts, quantizer dropout
{cfg['quantizer_dropout']}) -> ConvNeXt decoder ({cfg['decoder_blocks']} blocks) -> log-magnitudes -> fast Griffin-Lim
({cfg['griffin_lim_iters']} iterations). Weights stored in fp16.

## Training
- data: the project corpus (`python -m data.corpus --out corpus --clips 4000 --seed 0`), train split,
  random {cfg['crop_seconds']} s crops, batch {cfg['batch_size']}
- steps: {steps}; AdamW lr {cfg['lr']}, warmup {cfg['warmup']}, cosine
- command: `python -m audio_tokenizers.acoustic train --config configs/acoustic.yaml {' '.join(f'{k}={cfg[k]}' for k in ('dim', 'decoder_blocks', 'steps', 'warmup'))}`
- full config: `config.json` beside this card

## Held-out quality (test split: {results['clips']} clips x {results['seconds']} s, none of their works seen in training)

Multi-resolution log-mel L1 distance (FFT 512/1024/2048, hop FFT/4, 80 log10 mel bands, mean of the three;
`evaluation/metrics.py`), and SI-SNR (not meaningful for a magnitude codec: Griffin-Lim phase is not the original's).

| levels | mel distance | SI-SNR (dB) |
|---|---|---|
{rows}

Instrument retention: an MFCC-statistics + logistic-regression classifier of the clip's instrument/ensemble
({results['instrument_classes']} classes), trained on {args.train_clips} original train-split clips: accuracy
{results['instrument_acc_original']} on the original test clips, {results['instrument_acc_reconstructed']} on their
{levels[-1]}-level reconstructions: retention {results['instrument_retention']}.

Decoding speed: {results['decode_seconds_per_audio_second']} s per second of audio (encode + decode, 2 CPU threads).

Reference: Griffin-Lim from the *true* magnitudes at this STFT scores mel distance 0.047 (n_fft 1536, 32 iterations),
the ceiling of this design; 1024-point windows would cap it at 0.074.

Held-out mel distance at {levels[-1]} levels during training (16 valid clips x 4 s):

| step | mel distance |
|---|---|
{curve}

Reproduce: `python -m evaluation.codec --corpus corpus --checkpoint pretrained/acoustic --clips {args.clips} --seconds {args.seconds}`

![original vs reconstruction](spectrograms.png)
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    (path / "CARD.md").write_text(text)
    import shutil
    shutil.copy(args.out / "spectrograms.png", path / "spectrograms.png")


if __name__ == "__main__":
    run_cli(main)
