"""Where is the prompt lost? The stage-wise oracle on held-out clips.

    python -m evaluation.oracle --manifest corpus/test.jsonl corpus/valid.jsonl --per-label 4 --seconds 4 \
        --out eval/oracle [--stage NAME=PATH ...] [--rows codec coarse_stage ...] [--seed 0]
    python -m evaluation.oracle --manifest corpus/test.jsonl --stated-bpm --per-label 1000 --seconds 10 \
        --group-by family --rows codec fine_stage coarse_stage --out eval/beat     # where the beat is lost

Each row hands the chain the truth of a real clip down to some point and runs the rest:

    original            the clip itself (the classifier's ceiling)
    codec               encode -> decode, all levels
    coarse_only         the true coarse levels alone, decoded
    fine_stage          true coarse codes + fine codes sampled by the fine stage
    coarse_stage_only   true semantic ids + the clip's MuLan audio tokens -> the coarse stage's levels alone
                        (beside coarse_only: what the coarse stage loses, without the fine stage's part)
    coarse_stage        true semantic ids + the clip's own MuLan audio tokens -> coarse (+ fine) stages
    coarse_stage_text   true semantic ids + the MuLan text tokens of its caption -> coarse (+ fine) stages
    chain               the whole pipeline from the caption

A coarse stage trained with onset_input is handed the clip's own onset levels in the coarse_stage rows (true, as
the semantic ids are) and, in the chain row, a metronome at the bpm the caption states (options.metronome).

An acoustic-role stage in the coarse slot makes every level, so it has no fine_stage row.
Measures: instrument accuracy by the project's classifier (MFCC statistics + logistic regression
fitted on train-split originals, evaluation/codec.py), the number of distinct instruments it hears,
tempo and key accuracy against the clip's metadata (evaluation/adherence.py: within 4% allowing octave
errors; the key by Krumhansl-Schmuckler profiles), and the mel distance to the original for the rows that
are time-aligned with it (all but chain). The original row is each measure's ceiling: a beat tracker on a
few seconds misses tempos the clip has. Two measures of the beat: `onset_alignment`, the normalised
correlation at lag 0 of a row's onset envelope with the original's (do its notes start where the clip's
do? 1 for the original, about 0 for another clip; time-aligned rows only), and `pulse`, the median over
clips of the onset envelope's autocorrelation at the clip's own tempo (`spectral.pulse_strength`).
Clips are picked per instrument label (up to --per-label each), so every instrument the held-out
manifests have is covered; the table says how many labels that is. `--stated-bpm` keeps only the clips
whose caption states a bpm, and `--group-by family` (groove / scored) or a metadata field (`source`)
also reports every measure per group: the 10 s stage table of where a beat is lost.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from evaluation import use_threads
from common.errors import UserError, run_cli
from data.attributes import bpm_in_text, from_texts, ids, raw_from_metadata
from data.audio import crop_or_pad, load_audio
from data.manifest import read_manifest
from data.onsets import onset_levels

ROWS = ("original", "codec", "coarse_only", "fine_stage", "coarse_stage_only", "coarse_stage", "coarse_stage_text",
        "chain")


def pick_clips(manifests: list[Path], per_label: int, limit: int, stated_bpm: bool = False) -> list[dict]:
    """Up to `per_label` rows of each instrument label, in manifest order, at most `limit` in all
    (with `stated_bpm`, only rows whose caption states a bpm)."""
    by_label = defaultdict(list)
    for m in manifests:
        if not m.is_file():
            raise UserError(f"manifest {m} not found; pass held-out manifests, e.g. corpus/test.jsonl")
        for row in read_manifest(m):
            if stated_bpm and bpm_in_text(row.get("caption", "")) is None:
                continue
            if "instrument_label" in row and len(by_label[row["instrument_label"]]) < per_label:
                by_label[row["instrument_label"]].append(row)
    rows = [r for group in zip(*[g + [None] * (per_label - len(g)) for g in by_label.values()]) for r in group if r]
    if not rows:
        raise UserError(f"no rows with an instrument_label{' and a caption stating a bpm' if stated_bpm else ''} "
                        f"in {', '.join(map(str, manifests))}")
    return rows[:limit]


def row_codes(name: str, pipe, x: torch.Tensor, rows: list[dict], options) -> torch.Tensor | None:
    """Audio [B, 1, N] of real clips (and their manifest rows) -> the codec codes the oracle row `name` decodes
    (None: not applicable). Rows handed the clip's own MuLan tokens get its true tempo and key too (a stage with
    attribute_input reads them); the text row gets what its caption states, as a prompt would."""
    captions = [r["caption"] for r in rows]
    codec, mulan = pipe.codec, pipe.mulan
    codes = codec.encode(x)
    qc = pipe.parts["coarse"].cfg.coarse_levels
    if name == "codec":
        return codes
    if name == "coarse_only":
        return codes[:, :qc]
    if name == "fine_stage":
        return None if pipe.parts["fine"] is None else pipe.render(None, coarse=codes[:, :qc], options=options)
    sem = pipe.semantic_ids(x)
    onsets = None   # a coarse stage with onset_input is handed the clip's own, as its true semantic ids
    if getattr(pipe.parts["coarse"], "takes_onsets", False):
        onsets = onset_levels(x[:, 0], pipe.sample_rate, pipe.parts["coarse"].cfg.acoustic_rate, sem.shape[1] * pipe.ratio)
    if name in ("coarse_stage", "coarse_stage_only"):
        return pipe.render(mulan.tokens(mulan.embed_audio(x, pipe.sample_rate)), sem, options=options,
                           fine=name == "coarse_stage", attributes=ids(raw_from_metadata(rows)), onsets=onsets)
    if name == "coarse_stage_text":
        return pipe.render(mulan.tokens(mulan.embed_text(captions)), sem, options=options,
                           attributes=from_texts(captions), onsets=onsets)
    raise ValueError(name)


def group_of(row: dict, group_by: str | None) -> str | None:
    """The group a clip is reported in: `family` = groove or scored (every score source), else a metadata field."""
    if not group_by:
        return None
    if group_by == "family":
        return "groove" if row.get("source") == "groove" else "scored"
    return str(row.get(group_by, "?"))


def onset_alignment(x: torch.Tensor, ref: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """[B, N] audio and its reference [B, N] -> [B]: the normalised correlation at lag 0 of their onset
    envelopes (1: notes start at the same moments; about 0: unrelated)."""
    from audio_tokenizers.spectral import onset_envelope
    a, b = (e - e.mean(-1, keepdim=True) for e in (onset_envelope(x, sample_rate), onset_envelope(ref, sample_rate)))
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-8)


def clip_outcomes(w: torch.Tensor, audio: torch.Tensor, clips: list[dict], classifier, sr: int,
                  aligned: bool) -> list[dict]:
    """One row's audio [B, N] -> each clip's outcomes: instrument heard and right, tempo / key right (where
    the metadata states them), the beat's pulse at the clip's tempo, and for time-aligned rows the mel
    distance and onset alignment to the original."""
    from audio_tokenizers.spectral import pulse_strength
    from evaluation.adherence import adherence
    from evaluation.codec import mfcc_features
    from evaluation.metrics import mel_distance
    per = [{} for _ in clips]
    heard = classifier.predict(np.stack([mfcc_features(v, sr) for v in w.numpy()]))
    adherence(clips, list(w.numpy()), sr, per_clip=per)   # tempo_ok, key_ok of the rows whose metadata state them
    mel = mel_distance(audio, w, sr) if aligned else None
    onsets = onset_alignment(w, audio, sr) if aligned else None
    for i, (r, o) in enumerate(zip(clips, per)):
        o.update(heard=str(heard[i]), instrument_ok=bool(heard[i] == r["instrument_label"]))
        if "tempo" in r:
            o["pulse"] = float(pulse_strength(w[i:i + 1], sr, float(r["tempo"]))[0])
        if aligned:
            o.update(mel_distance=float(mel[i]), onset_alignment=float(onsets[i]))
    return per


def summarise(per: list[dict]) -> dict:
    """Clips' outcomes -> the row's measures (means; the pulse's median)."""
    def mean(key):
        v = [o[key] for o in per if key in o]
        return round(float(np.mean(v)), 4) if v else None
    res = {"instrument_acc": mean("instrument_ok"), "distinct_instruments": len({o["heard"] for o in per}),
           "tempo_acc": mean("tempo_ok"), "key_acc": mean("key_ok"), "mel_distance": mean("mel_distance"),
           "onset_alignment": mean("onset_alignment")}
    pulses = [o["pulse"] for o in per if "pulse" in o]
    res["pulse"] = round(float(np.median(pulses)), 4) if pulses else None
    res["tempo_hits"] = sum(o.get("tempo_ok", False) for o in per)
    return {k: v for k, v in res.items() if v is not None}


@torch.no_grad()
def run_oracle(pipe, clips: list[dict], seconds: float, rows: list[str], classifier, options, batch: int,
               group_by: str | None = None) -> tuple[dict, list[dict]]:
    """-> each row's measures, and each (row, clip)'s outcomes (for clip-by-clip comparisons of two runs)."""
    sr, n = pipe.sample_rate, int(seconds * pipe.sample_rate)
    audio = torch.from_numpy(np.stack([crop_or_pad(load_audio(r["audio"], sr), n) for r in clips]))
    groups = [group_of(r, group_by) for r in clips]
    results, outcomes = {}, []
    for name in rows:
        t0, waves = time.perf_counter(), []
        for i in range(0, len(clips), batch):
            x, part = audio[i:i + batch, None], clips[i:i + batch]
            if name == "original":
                waves.append(x[:, 0])
            elif name == "chain":
                waves.append(pipe.generate([r["caption"] for r in part], seconds, options=options)[:, 0, :n])
            else:
                codes = row_codes(name, pipe, x, part, options)
                if codes is None:
                    break
                waves.append(pipe.codec.decode(codes, length=n)[:, 0])
        if not waves:
            continue
        per = clip_outcomes(torch.cat(waves), audio, clips, classifier, sr, aligned=name not in ("original", "chain"))
        res = summarise(per)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        if group_by:
            res["groups"] = {g: summarise([o for o, h in zip(per, groups) if h == g]) | {"clips": groups.count(g)}
                             for g in sorted(set(groups))}
        results[name] = res
        outcomes += [{"row": name, "audio": r["audio"], **o} for r, o in zip(clips, per)]
        print(f"{name}: {res}", flush=True)
    return results, outcomes


def markdown(results: dict, clips: int, labels: int, seconds: float) -> str:
    codec = results.get("codec", {}).get("instrument_acc")
    lines = [f"{clips} held-out clips, {labels} instrument labels, {seconds:g} s each", "",
             "| row | instrument accuracy | of codec | distinct instruments | tempo | key | mel distance | "
             "onset alignment | pulse |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        rel = f"{r['instrument_acc'] / codec:.2f}" if codec else ""
        lines.append(f"| {name} | {r['instrument_acc']:.3f} | {rel} | {r['distinct_instruments']} | "
                     f"{r.get('tempo_acc', '')} | {r.get('key_acc', '')} | {r.get('mel_distance', '')} | "
                     f"{r.get('onset_alignment', '')} | {r.get('pulse', '')} |")
    names = sorted({g for r in results.values() for g in r.get("groups", {})})
    if names:
        lines += ["", "Per group: tempo hits of clips, onset alignment, pulse", "",
                  "| row | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for name, r in results.items():
            cells = []
            for g in names:
                x = r["groups"].get(g, {})
                cells.append(f"{x.get('tempo_hits', 0)} of {x.get('clips', 0)}, {x.get('onset_alignment', '-')}, "
                             f"{x.get('pulse', '-')}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from evaluation.codec import instrument_classifier
    from pipeline import GenerationOptions, Pipeline, load_parts
    from pipeline_cli import part_paths
    ap = argparse.ArgumentParser(prog="python -m evaluation.oracle", description=__doc__.split("\n\n")[0])
    ap.add_argument("--manifest", type=Path, nargs="+", required=True, help="held-out manifests")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--per-label", type=int, default=4)
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    ap.add_argument("--stage", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--train-manifest", type=Path, default=None,
                    help="originals to fit the instrument classifier on (default: train.jsonl beside the first manifest)")
    ap.add_argument("--train-clips", type=int, default=1500)
    ap.add_argument("--classifier-features", type=Path, default=None, metavar="FILE.npz",
                    help="keep the classifier's training features here and reuse them in later runs (same clips)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--knob", action="append", default=[], metavar="STAGE.KEY=VALUE",
                    help="a sampling knob of one stage, as pipeline.py --knob (e.g. coarse.temperature=0.7)")
    ap.add_argument("--stated-bpm", action="store_true", help="only clips whose caption states a bpm")
    ap.add_argument("--group-by", default=None, metavar="family|FIELD",
                    help="also report each measure per group: family (groove / scored) or a metadata field")
    args = ap.parse_args()
    if not 1 <= args.seconds <= 10 or args.per_label < 1:
        raise UserError("--seconds must be in [1, 10] (the corpus clips are 10 s) and --per-label at least 1")
    train = args.train_manifest or args.manifest[0].parent / "train.jsonl"
    if not train.is_file():
        raise UserError(f"{train} not found; pass --train-manifest (train-split originals for the classifier)")
    from pipeline_cli import parse_knobs
    options = GenerationOptions(seed=args.seed, guidance=args.guidance)
    for stage, key, value in parse_knobs(args.knob):
        getattr(options, stage)[key] = value
    clips = pick_clips(args.manifest, args.per_label, args.limit, args.stated_bpm)   # bad manifests fail fast
    use_threads()
    pipe = Pipeline(load_parts(part_paths(args.stage)))
    labels = len({r["instrument_label"] for r in clips})
    print(f"{len(clips)} clips, {labels} instrument labels; fitting the classifier on {train}", flush=True)
    classifier = instrument_classifier(read_manifest(train)[: args.train_clips], pipe.sample_rate, args.seconds,
                                       features=args.classifier_features)
    results, outcomes = run_oracle(pipe, clips, args.seconds, args.rows, classifier, options, args.batch,
                                   args.group_by)
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(results, len(clips), labels, args.seconds)
    (args.out / "oracle.json").write_text(json.dumps({"clips": len(clips), "labels": labels, "seconds": args.seconds,
                                                       "stages": part_paths(args.stage), "knobs": args.knob,
                                                       "stated_bpm": args.stated_bpm, "group_by": args.group_by,
                                                       "rows": results}, indent=1))
    (args.out / "oracle.md").write_text(table)
    (args.out / "clips.jsonl").write_text("".join(json.dumps(o) + "\n" for o in outcomes))
    print(table)


if __name__ == "__main__":
    run_cli(main)
