"""How much a semantic tokenizer's tokens say about the music, and how stable they are.

    python -m evaluation.semantic --corpus corpus --checkpoints A B ... --out eval/semantic
        [--test-manifest heldout/valid.jsonl heldout/test.jsonl --test-clips 2000]

For each tokenizer checkpoint, on corpus clips:
- linear probes: logistic regression on each clip's bag of tokens (normalised histogram over
  the k ids), trained on train-split clips and scored on the test split, for the instrument
  and for the source (genre family). The corpus's test split is small (178 clips, ~40 works),
  so one clip moves a probe by 0.6 points; `--test-manifest` scores on other held-out clips
  instead, e.g. `python -m data.corpus --splits valid,test` renders more of the held-out works;
- stability: the fraction of tokens unchanged under a 3 dB gain change and under white noise
  at 30 dB SNR (test split);
- codebook usage: the fraction of the k clusters used on the test split;
- churn: how often the id changes from one frame to the next, per second, and per note onset that
  librosa's onset detector finds in the clip (medians over test clips). Ids that hold across a
  note and change at the next one read about 1 change per onset; a stage that must find note
  starts in the ids (the coarse stage) cannot, when they change several times per note.
With several checkpoints, each is also compared with the last one (the baseline) on the same
clips: the paired difference of probe accuracy and a 95% bootstrap interval that resamples
works, not clips (clips of one work share labels and music, so they are not independent).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from evaluation import use_threads
from audio_tokenizers.semantic import load_semantic
from common.errors import UserError, run_cli
from data.manifest import SkipCounter, iter_audio, read_manifest


def encode_rows(tok, rows, batch: int = 8):
    """-> (list of rows, [n, T] token ids, list of waveforms) for the readable rows."""
    kept, waves = [], []
    for row, wav in iter_audio(rows, tok.sample_rate, SkipCounter()):
        kept.append(row)
        waves.append(torch.from_numpy(wav))
    n = min(len(w) for w in waves)
    x = torch.stack([w[:n] for w in waves])[:, None]
    ids = torch.cat([tok.encode(x[i:i + batch]) for i in range(0, len(x), batch)])
    return kept, ids, x


def bags(ids: torch.Tensor, k: int) -> np.ndarray:
    return np.stack([np.bincount(r.numpy(), minlength=k) / len(r) for r in ids])


def probe(train_x, train_y, test_x, test_y) -> np.ndarray:
    """-> [n_test] bool, whether the probe names each test clip's label."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.5))
    clf.fit(train_x, train_y)
    return clf.predict(test_x) == np.array(test_y)


def paired_interval(a: np.ndarray, b: np.ndarray, groups: list[str], n: int = 2000,
                    seed: int = 0) -> tuple[float, float, float]:
    """Mean of a - b (per-clip 0/1 correctness) and its 95% bootstrap interval over groups (works)."""
    diff = a.astype(float) - b.astype(float)
    names, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(names))]
    rng = np.random.default_rng(seed)
    means = [diff[np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])].mean()
             for _ in range(n)]
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(lo), float(hi)


def churn(ids: torch.Tensor, waves: torch.Tensor, frame_rate: float, sample_rate: int) -> dict:
    """Ids [n, T] at frame_rate of clips [n, N] (or [n, 1, N]) -> median id changes per second and per
    detected onset."""
    import librosa
    changes = (ids[:, 1:] != ids[:, :-1]).sum(1).numpy()
    seconds = ids.shape[1] / frame_rate
    onsets = np.array([len(librosa.onset.onset_detect(y=w.reshape(-1).numpy().astype(np.float32), sr=sample_rate))
                       for w in waves])
    return {"changes_per_second": round(float(np.median(changes / seconds)), 3),
            "changes_per_onset": round(float(np.median(changes / np.maximum(onsets, 1))), 3)}


def evaluate_tokenizer(tok, corpus: Path, train_clips: int, test_clips: int, seed: int = 0,
                       test_manifests: list[Path] | None = None, details: dict | None = None) -> dict:
    """The numbers of one tokenizer; `details`, if given, receives per-clip probe correctness and work ids."""
    train_rows = read_manifest(corpus / "train.jsonl")[:train_clips]
    test_rows = [r for m in test_manifests or [corpus / "test.jsonl"] for r in read_manifest(m)][:test_clips]
    if not train_rows or not test_rows:
        raise UserError(f"{corpus}/train.jsonl and the test manifests need clips")
    k = tok.codebook_size
    tr_rows, tr_ids, _ = encode_rows(tok, train_rows)
    te_rows, te_ids, te_wav = encode_rows(tok, test_rows)
    out = {"k": k, "train_clips": len(tr_rows), "test_clips": len(te_rows)}
    for label in ("instrument_label", "source"):
        correct = probe(bags(tr_ids, k), [r[label] for r in tr_rows], bags(te_ids, k), [r[label] for r in te_rows])
        out[f"probe_{label}"] = round(float(correct.mean()), 4)
        if details is not None:
            details[label] = correct
    if details is not None:
        details["works"] = [r.get("work_id", r["audio"]) for r in te_rows]
        details["clips"] = [r["audio"] for r in te_rows]
    quieter = te_wav * 10 ** (-3 / 20)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(te_wav.shape, generator=g)
    noisy = te_wav + noise * te_wav.pow(2).mean(-1, keepdim=True).sqrt() * 10 ** (-30 / 20)
    for name, x in (("gain_3db", quieter), ("noise_30db", noisy)):
        ids = torch.cat([tok.encode(x[i:i + 8]) for i in range(0, len(x), 8)])
        out[f"unchanged_{name}"] = round(float((ids == te_ids).float().mean()), 4)
    out["codebook_usage"] = round(len(torch.unique(te_ids)) / k, 4)
    out.update(churn(te_ids, te_wav, tok.frame_rate, tok.sample_rate))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="Probe, stability and usage of semantic tokenizers.")
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--checkpoints", nargs="+", required=True)
    ap.add_argument("--out", type=Path, default=Path("eval/semantic"))
    ap.add_argument("--train-clips", type=int, default=1500)
    ap.add_argument("--test-clips", type=int, default=200)
    ap.add_argument("--test-manifest", type=Path, nargs="+",
                    help="held-out clips to score on (default: CORPUS/test.jsonl)")
    args = ap.parse_args()
    use_threads()
    results, details = {}, {}
    for ck in args.checkpoints:
        tok = load_semantic(ck)
        details[ck] = {}
        results[ck] = {"backend": tok.cfg.backend, "layer": tok.cfg.layer,
                       **evaluate_tokenizer(tok, args.corpus, args.train_clips, args.test_clips,
                                           test_manifests=args.test_manifest, details=details[ck])}
        print(json.dumps({ck: results[ck]}), flush=True)
    base = details[args.checkpoints[-1]]
    for ck in args.checkpoints[:-1]:
        if details[ck]["clips"] != base["clips"]:   # a file one backend could not read: no pairing
            continue
        for label in ("instrument_label", "source"):
            d, lo, hi = paired_interval(details[ck][label], base[label], base["works"])
            results[ck][f"{label}_vs_last"] = f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    keys = [k for k in next(iter(results.values())) if k not in ("train_clips", "test_clips")]
    lines = ["| checkpoint | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {ck} | " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for ck, r in results.items()]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    run_cli(main)
