"""Do semantic ids pulse at the beat a prompt asks for? References' ids vs the semantic stage's.

    python -m evaluation.semantic_pulse --prompts corpus/test.jsonl --limit 200 [--stage semantic=PATH]
        [--knob semantic.beat_copy=4]

For every prompt that states a bpm (data.attributes.bpm_in_text), two measures of the ids' pulse (PULSE_MEASURES):
"repeats", the share of frames whose id equals the id one, two or four beats earlier, minus the share at off-beat
lags (a half and a quarter beat between); "onsets", the autocorrelation of the id changes at one and two beats minus
that at off-beat lags.
The reference audio's ids (from the semantic tokenizer; a manifest's `audio`) are scored beside the ids the semantic
stage generates from the caption (10 s, seed 0). A tempo can only reach the audio if the ids carry it: the coarse
stage follows the ids it is given (README: "Where the beat is lost").
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from common.errors import UserError, run_cli
from data.attributes import PULSE_MEASURES, bpm_in_text, from_texts
from evaluation import use_threads


def pulse(ids: np.ndarray, bpm: float, rate: float, measure: str = "repeats") -> float:
    """ids [T] at `rate` Hz -> their pulse at `bpm` by one of data.attributes.PULSE_MEASURES; nan if the clip is
    too short."""
    return PULSE_MEASURES[measure](torch.as_tensor(ids), rate * 60 / bpm)


def summary(values: list[float]) -> str:
    v = np.array([x for x in values if not np.isnan(x)])
    return f"mean {v.mean():+.3f}, median {np.median(v):+.3f}, above 0.02 in {(v > 0.02).sum()} of {len(v)}"


@torch.no_grad()
def main() -> None:
    from data.audio import load_audio
    from evaluation.generate_and_score import load_prompts
    from pipeline import GenerationOptions, Pipeline, load_parts
    from pipeline_cli import parse_knobs, part_paths
    ap = argparse.ArgumentParser(prog="python -m evaluation.semantic_pulse", description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--stage", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--knob", action="append", default=[], metavar="semantic.KEY=VALUE")
    args = ap.parse_args()
    knobs = parse_knobs(args.knob)
    if any(stage != "semantic" for stage, _, _ in knobs):
        raise UserError("only semantic-stage knobs change the ids; write --knob semantic.KEY=VALUE")
    rows = [r for r in load_prompts(args.prompts, args.limit) if bpm_in_text(r["caption"])]   # references checked
    if not rows:
        raise UserError(f"none of the first {args.limit} prompts of {args.prompts} states a bpm; give ones that do")
    use_threads()
    pipe = Pipeline(load_parts(part_paths(args.stage)))
    rate = pipe.parts["semantic_tokenizer"].frame_rate
    s = pipe._sampling(GenerationOptions(semantic={k: v for _, k, v in knobs}))["semantic"]
    n = int(args.seconds * rate)
    refs, gens = {m: [] for m in PULSE_MEASURES}, {m: [] for m in PULSE_MEASURES}
    for r in rows:
        bpm = bpm_in_text(r["caption"])
        if "audio" in r:
            wav = load_audio(r["audio"], pipe.sample_rate)[: int(args.seconds * pipe.sample_rate)]
            ref = pipe.semantic_ids(torch.from_numpy(wav)[None, None])[0].numpy()
            for m in PULSE_MEASURES:
                refs[m].append(pulse(ref, bpm, rate, m))
        cond, attrs = pipe.mulan.tokens(pipe.mulan.embed_text([r["caption"]])), from_texts([r["caption"]])
        torch.manual_seed(0)
        ids = pipe._semantic(lambda sec: cond, n, s, None, torch.Generator().manual_seed(0), rate, None,
                             lambda sec: attrs)
        for m in PULSE_MEASURES:
            gens[m].append(pulse(ids[0].numpy(), bpm, rate, m))
    print(f"{len(rows)} prompts that state a bpm; pulse of the semantic ids at the asked beat")
    for m in PULSE_MEASURES:
        if refs[m]:
            print(f"{m}, references: {summary(refs[m])}")
        print(f"{m}, generated:  {summary(gens[m])}")


if __name__ == "__main__":
    run_cli(main)
