"""Generate one clip per prompt with the pipeline and score the outputs.

    python -m evaluation.generate_and_score --prompts corpus/test.jsonl --limit 50 --out eval/gen \
        [--duration 5] [--stage NAME=PATH ...] [--seed 0] [--guidance 3] [--fad features mulan clap:PATH]

Prompts: a JSONL manifest (the caption is the prompt; a row's own audio, e.g. the corpus
builder's render of that caption, is its reference, and its metadata drives adherence) or a
text file with one prompt per line (then only the reference-free metrics are reported).
Writes `scores.json`, `scores.md` (one table), `clips.jsonl` (each clip's own outcomes) and `grid.png`
(log-mel spectrograms) to --out, and the generated clips to --out/clips/.

Metrics (see evaluation/metrics.py and evaluation/adherence.py):
- `fad_<backend>`: Fréchet distance between outputs and references, per embedding backend;
- `mcc` / `mcc_shuffled`: MuLan cycle consistency, with the pipeline's own conditioner;
- `kl`: KL(reference || output) of the instrument classifier's label distributions;
- `tempo_acc`, `key_acc`, `instrument_acc` on the outputs, and `ref_*` the same on the references;
- `tempo_chance`: the outputs' tempo score against shuffled prompts (what ignoring the asked tempo scores);
- `codec_mel_distance`, `codec_si_snr_db`: encode-decode of the references by the pipeline's codec;
- `seconds_per_clip`: median generation time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from evaluation import use_threads
from common.errors import UserError, run_cli
from data.audio import crop_or_pad, load_audio, write_wav
from data.manifest import read_manifest, read_prompts

TABLE_KEYS = ["fad_features", "fad_mulan", "mcc", "mcc_shuffled", "kl", "tempo_acc", "tempo_chance", "key_acc",
              "instrument_acc", "instrument_distinct_correct",
              "ref_tempo_acc", "ref_key_acc", "ref_instrument_acc", "codec_mel_distance", "seconds_per_clip"]


def load_prompts(path: Path, limit: int) -> list[dict]:
    """The first `limit` prompts; a manifest's reference audio must all be there (checked before any generation,
    which the references are scored beside only at the end)."""
    rows = read_prompts(path)[:limit]
    missing = [r["audio"] for r in rows if "audio" in r and not Path(r["audio"]).is_file()]
    if missing:
        raise UserError(f"{len(missing)} reference clips of {path} are missing, e.g. {missing[0]}; the manifest's "
                        f"relative audio paths are read from its own folder: keep it beside its audio/ or make them absolute")
    return rows


@torch.no_grad()
def generate_all(pipe, rows: list[dict], duration: float, options, out: Path) -> tuple[list[np.ndarray], list[float]]:
    waves, times = [], []
    (out / "clips").mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(rows):
        t = time.perf_counter()
        k = options.rerank   # best of k candidates, made as one batch
        wav = pipe.generate([row["caption"]] * k, duration, options=options)
        if k > 1:
            wav = pipe.rerank([row["caption"]], wav, k, options.rerank_tempo)
        wav = wav[0, 0].numpy()
        times.append(time.perf_counter() - t)
        write_wav(out / "clips" / f"{i:03d}.wav", wav, pipe.sample_rate)
        waves.append(wav)
        print(f"[{i + 1}/{len(rows)}] {times[-1]:.1f} s  {row['caption'][:70]}", flush=True)
    return waves, times


@torch.no_grad()
def score(pipe, rows, waves, times, duration: float, fad_backends: list[str], classifier=None,
          per_clip: list[dict] | None = None) -> dict:
    """The table's measures over all clips; with `per_clip` (one dict per row), each clip's own outcomes too
    (MuLan cosine to its prompt, tempo / key / instrument right or not), for paired comparisons."""
    from evaluation.adherence import adherence
    from evaluation.embeddings import embedder
    from evaluation.metrics import cycle_consistency, frechet_distance, kl_divergence, mel_distance, si_snr
    sr = pipe.sample_rate
    n = int(duration * sr)
    refs = [crop_or_pad(load_audio(r["audio"], sr), n) for r in rows] if all("audio" in r for r in rows) else None
    res = {"clips": len(rows), "duration_s": duration, "seconds_per_clip": round(statistics.median(times), 2)}
    text = pipe.mulan.embed_text([r["caption"] for r in rows])
    audio = torch.cat([pipe.mulan.embed_audio(torch.from_numpy(w)[None, None], sr) for w in waves])
    res.update(cycle_consistency(text, audio))
    if per_clip is not None:
        for d, cos in zip(per_clip, (text * audio).sum(-1).tolist()):
            d["mcc"] = round(cos, 4)
    res.update(adherence(rows, waves, sr, classifier, per_clip))
    if refs is not None:
        res.update({f"ref_{k}": v for k, v in adherence(rows, refs, sr, classifier).items()})
        for backend in fad_backends:
            embed = embedder(backend, pipe.mulan if backend == "mulan" else None)
            res[f"fad_{backend.split(':')[0]}"] = frechet_distance(embed(waves, sr), embed(refs, sr))
        if classifier is not None:
            from evaluation.codec import mfcc_features
            p_ref = classifier.predict_proba(np.stack([mfcc_features(w, sr) for w in refs]))
            p_out = classifier.predict_proba(np.stack([mfcc_features(w, sr) for w in waves]))
            res["kl"] = kl_divergence(p_ref, p_out)
        x = torch.from_numpy(np.stack(refs))
        rec = pipe.codec.decode(pipe.codec.encode(x[:, None]), length=n)[:, 0]
        res["codec_mel_distance"] = float(mel_distance(x, rec, sr).mean())
        res["codec_si_snr_db"] = float(si_snr(rec, x).mean())
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}


def markdown_table(results: dict[str, dict]) -> str:
    keys = [k for k in TABLE_KEYS if any(k in r for r in results.values())]
    lines = ["| variant | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def plot_grid(waves, titles, sr: int, path: Path, cols: int = 5) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from audio_tokenizers.spectral import log_mel
    rows = -(-len(waves) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, w, title in zip(axes.flat, waves, titles):
        ax.imshow(log_mel(torch.from_numpy(w)[None], sr, 1024, 256, 80)[0].numpy(), origin="lower", aspect="auto",
                  vmin=-5)
        ax.set_title(title[:40], fontsize=6)
    plt.tight_layout()
    plt.savefig(path, dpi=70)
    plt.close(fig)


def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--prompts", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--limit", type=int, default=50)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--fad", nargs="+", default=["features", "mulan"], help="features, mulan, clap:PATH")
    ap.add_argument("--train-manifest", type=Path, default=None,
                    help="corpus clips to train the instrument classifier on (default: train.jsonl beside --prompts)")
    ap.add_argument("--train-clips", type=int, default=600)


def instrument_classifier_for(args, rows, sr: int):
    from evaluation.codec import instrument_classifier
    train = args.train_manifest or args.prompts.parent / "train.jsonl"
    if not any("instrument_label" in r for r in rows) or not train.is_file():
        return None
    return instrument_classifier(read_manifest(train)[: args.train_clips], sr, 5.0)


def run_variant(name: str, paths: dict, options, rows, args, classifier, out: Path) -> dict:
    from pipeline import Pipeline, load_parts
    pipe = Pipeline(load_parts(paths))
    waves, times = generate_all(pipe, rows, args.duration, options, out)
    per_clip = [{"caption": r["caption"]} for r in rows]
    res = score(pipe, rows, waves, times, args.duration, args.fad, classifier, per_clip)
    plot_grid(waves, [r["caption"] for r in rows], pipe.sample_rate, out / "grid.png")
    (out / "scores.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "clips.jsonl").write_text("".join(json.dumps(d) + "\n" for d in per_clip))
    (out / "scores.md").write_text(markdown_table({name: res}))
    return res


def main() -> None:
    from pipeline import GenerationOptions
    from pipeline_cli import part_paths
    ap = argparse.ArgumentParser(prog="python -m evaluation.generate_and_score", description=__doc__.split("\n\n")[0])
    add_common_args(ap)
    ap.add_argument("--stage", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--guidance", type=float, default=3.0)
    args = ap.parse_args()
    use_threads()
    paths = part_paths(args.stage)
    rows = load_prompts(args.prompts, args.limit)
    classifier = instrument_classifier_for(args, rows, 24000)
    res = run_variant("default", paths, GenerationOptions(seed=args.seed, guidance=args.guidance), rows, args,
                      classifier, args.out)
    print(json.dumps(res, indent=1))
    print(f"wrote {args.out / 'scores.json'}, {args.out / 'scores.md'} and {args.out / 'grid.png'}")


if __name__ == "__main__":
    run_cli(main)
