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
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

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


def instrument_classifier(rows: list[dict], sr: int, seconds: float, label: str = "instrument_label"):
    """Fit MFCC-stats + logistic regression on original clips; returns (classifier, classes)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    X, y = [], []
    for row, wav in iter_audio(rows, sr, SkipCounter()):
        X.append(mfcc_features(crop_or_pad(wav, int(seconds * sr)), sr))
        y.append(row[label])
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    clf.fit(np.array(X), np.array(y))
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
    args = ap.parse_args()
    torch.set_num_threads(2)
    results = evaluate_codec(load_acoustic(args.checkpoint), args.corpus, args.clips, args.seconds,
                             args.train_clips, args.out)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    run_cli(main)
