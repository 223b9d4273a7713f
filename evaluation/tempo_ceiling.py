"""How much of the tempo score a set of prompts allows: the ceiling to read a chain's tempo number against.

    python -m evaluation.tempo_ceiling --prompts corpus/test.jsonl --limit 50 --mulan DIR [--out ceiling.json]

The tempo score (evaluation.adherence) checks each output against its clip's metadata tempo, also where the caption
states no bpm. A chain can know that tempo only where the prompt states it; elsewhere the best it has is what the
words suggest (data.tempo_guess: the vote of the training captions nearest the prompt, whose table lives in the
MuLan folder DIR), and within a style the corpus draws the tempo at random. Nor is every reference tracked right:
a beat tracker on 10 s of a legato chorale misses tempos the clip has. So, per prompt:

    reference tracked   the beat tracker reads the reference clip's own tempo right (the score's rule)
    knowable            the prompt states its bpm, or the words' guess is right by the score's rule
    ceiling             both: a chain that renders the knowable tempo as trackably as the reference does
    knowable only       every render trackable: an upper bound no corpus-like audio reaches
    chance              the references' tempo estimates against shuffled prompts (adherence.tempo_chance)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from common.errors import UserError, run_cli
from evaluation import use_threads

SAMPLE_RATE = 24000   # the codec's rate, at which generate_and_score reads the references


def ceiling(tracked: list[bool], stated: list[bool], guess_right: list[bool]) -> dict:
    """Per-prompt outcomes -> the summary the module prints (fractions of all prompts unless named)."""
    tracked, stated, guess = (np.asarray(x, dtype=bool) for x in (tracked, stated, guess_right))
    knowable = stated | guess
    unstated = ~stated
    return {"prompts": int(len(tracked)), "stated": int(stated.sum()),
            "reference_tracked": float(tracked.mean()),
            "guess_right_of_unstated": float(guess[unstated].mean()) if unstated.any() else float("nan"),
            "knowable_only": float(knowable.mean()), "ceiling": float((tracked & knowable).mean())}


def main() -> None:
    import torch
    from audio_tokenizers.mulan import load_conditioner
    from data import tempo_guess
    from data.attributes import bpm_in_text
    from data.audio import load_audio
    from evaluation.adherence import estimate_tempo, tempo_chance, tempo_correct
    from evaluation.generate_and_score import load_prompts

    p = argparse.ArgumentParser(prog="python -m evaluation.tempo_ceiling", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", required=True, help="JSONL manifest: caption, tempo (metadata) and reference audio")
    p.add_argument("--limit", type=int, default=None, help="the first N rows (as generate_and_score --limit)")
    p.add_argument("--mulan", required=True, help="a MuLan folder with a tempo table (python -m data.tempo_guess)")
    p.add_argument("--out", default=None, help="also write the summary and each prompt's outcome as JSON here")
    args = p.parse_args()

    use_threads()
    rows = load_prompts(Path(args.prompts), args.limit)
    if not rows:
        raise UserError(f"{args.prompts}: no prompts to score; give a non-empty manifest and --limit of at least 1")
    if any("tempo" not in r or "audio" not in r for r in rows):
        raise UserError(f"{args.prompts}: every row needs its metadata tempo and reference audio "
                        f"(a corpus manifest such as corpus/test.jsonl)")
    mulan = load_conditioner(args.mulan)
    table = tempo_guess.load(args.mulan, mulan)
    if table is None:
        raise UserError(f"{args.mulan} has no tempo table; build it with "
                        f"python -m data.tempo_guess --mulan {args.mulan} --manifest corpus/train.jsonl")
    with torch.no_grad():
        guessed = tempo_guess.guess(table, mulan.embed_text([r["caption"] for r in rows]))[0].tolist()
    per = []
    for r, g in zip(rows, guessed):
        wav = load_audio(r["audio"], SAMPLE_RATE, allow_silent=True)
        est, want, said = estimate_tempo(wav, SAMPLE_RATE), float(r["tempo"]), bpm_in_text(r["caption"])
        per.append({"caption": r["caption"], "tempo": want, "stated": said is not None, "guess": g,
                    "reference_estimate": round(est, 2), "tracked": tempo_correct(est, want),
                    "guess_right": said is None and tempo_correct(g, want)})
    res = ceiling([c["tracked"] for c in per], [c["stated"] for c in per], [c["guess_right"] for c in per])
    res["chance"] = tempo_chance([c["reference_estimate"] for c in per], [c["tempo"] for c in per])
    print(f"{res['prompts']} prompts, {res['stated']} state a bpm; references tracked right "
          f"{res['reference_tracked']:.3f}; the words' guess right for {res['guess_right_of_unstated']:.3f} of "
          f"the rest; ceiling {res['ceiling']:.3f} (every render trackable: {res['knowable_only']:.3f}; "
          f"chance {res['chance']:.3f})")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({"summary": res, "prompts": per}, indent=1))
        tmp.replace(out)


if __name__ == "__main__":
    run_cli(main)
