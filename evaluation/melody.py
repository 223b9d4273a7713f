"""Does --melody make the music follow a tune, without losing the text? Held-out clips as melodies.

    python -m evaluation.melody --manifest corpus/test.jsonl corpus/valid.jsonl --clips 40 --seconds 8 \
        --stage semantic=PATH [--stage ...] --out eval/melody.json

For each held-out clip (grooves left out: their tune is a drum pattern), the clip's own audio is
the melody and a caption of another clip is the text, so the melody and the text ask for
different music. The chain runs twice with the same seed: with the melody and without it. Reported
beside each other: the chroma cosine similarity of the output to the melody recording
(audio_tokenizers/melody.py; MusicGen reports 0.44 for its melody model), the same for the clip's
own codec roundtrip (the ceiling) and for another clip's audio (chance), and the text adherence:
MuLan cosine of the output with its text, and the instrument classifier's accuracy on the
instrument the text names.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from evaluation import use_threads
from evaluation.metrics import paired_interval
from common.errors import UserError, run_cli
from data.audio import crop_or_pad, load_audio
from data.manifest import read_manifest


@torch.no_grad()
def evaluate_melody(pipe, rows: list[dict], seconds: float, classifier, seed: int = 0, batch: int = 8) -> dict:
    from audio_tokenizers.melody import chroma_similarity
    from evaluation.codec import mfcc_features
    from pipeline import GenerationOptions
    sr, n = pipe.sample_rate, int(seconds * pipe.sample_rate)
    tunes = torch.from_numpy(np.stack([crop_or_pad(load_audio(r["audio"], sr), n) for r in rows]))[:, None]
    texts = [rows[(i + len(rows) // 2) % len(rows)] for i in range(len(rows))]   # another clip's caption each
    out, per_clip = {"clips": len(rows), "seconds": seconds}, {}
    for name, with_tune in (("without_melody", False), ("with_melody", True)):
        waves = []
        for i in range(0, len(rows), batch):
            caps = [t["caption"] for t in texts[i:i + batch]]
            tune = tunes[i:i + batch] if with_tune else None
            waves.append(pipe.generate(caps, seconds, options=GenerationOptions(seed=seed), melody=tune)[..., :n])
        w = torch.cat(waves)
        text_emb = pipe.mulan.embed_text([t["caption"] for t in texts])
        audio_emb = pipe.mulan.embed_audio(w, sr)
        pred = classifier.predict(np.stack([mfcc_features(x[0].numpy(), sr) for x in w]))
        per_clip[name] = {"chroma_similarity": chroma_similarity(tunes, w, sr).numpy(),
                          "mulan_text_cosine": (text_emb * audio_emb).sum(-1).numpy(),
                          "instrument_acc": (pred == np.array([t["instrument_label"] for t in texts])).astype(float)}
        out[name] = {k: round(float(v.mean()), 4) for k, v in per_clip[name].items()}
        print(name, out[name], flush=True)
    out["with_minus_without"] = {k: paired_interval(per_clip["with_melody"][k] - per_clip["without_melody"][k])
                                 for k in per_clip["with_melody"]}
    rec = pipe.codec.decode(pipe.codec.encode(tunes), length=n)
    out["codec_roundtrip_chroma_similarity"] = round(float(chroma_similarity(tunes, rec, sr).mean()), 4)
    out["other_clip_chroma_similarity"] = round(float(chroma_similarity(tunes, tunes.roll(1, 0), sr).mean()), 4)
    return out


def main() -> None:
    from evaluation.codec import instrument_classifier
    from pipeline import Pipeline, load_parts
    from pipeline_cli import part_paths
    ap = argparse.ArgumentParser(prog="python -m evaluation.melody", description=__doc__.split("\n\n")[0])
    ap.add_argument("--manifest", type=Path, nargs="+", required=True, help="held-out manifests (the melodies)")
    ap.add_argument("--clips", type=int, default=40)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--stage", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--train-manifest", type=Path, default=None, help="originals for the instrument classifier")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rows = [r for m in args.manifest for r in read_manifest(m) if r.get("source") != "groove"][: args.clips]
    if len(rows) < 2:
        raise UserError("need at least 2 held-out clips that are not grooves; pass more --manifest rows")
    use_threads()
    pipe = Pipeline(load_parts(part_paths(args.stage)))
    if not pipe.parts["semantic"].cfg.melody_input:
        raise UserError("the semantic stage was trained without melody_input; pass one with --stage semantic=PATH")
    train = args.train_manifest or args.manifest[0].parent / "train.jsonl"
    classifier = instrument_classifier(read_manifest(train)[:1500], pipe.sample_rate, args.seconds)
    res = evaluate_melody(pipe, rows, args.seconds, classifier)
    print(json.dumps(res, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    run_cli(main)
