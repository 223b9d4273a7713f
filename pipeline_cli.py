"""The command line of pipeline.py (kept apart so pipeline.py stays the readable chain)."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from common.config import load_config
from common.errors import AudioError, UserError
from data.attributes import pulse_measure
from data.audio import load_audio, write_wav
from pipeline import MAX_SECONDS, PARTS, ROOT, GenerationOptions, Pipeline, PipelineParts, load_parts


def parse_story(items: list[str], duration: float) -> list[tuple[str, float]]:
    story = []
    for item in items:
        text, _, start = item.rpartition(":")
        try:
            story.append((text, float(start)))
        except ValueError:
            raise UserError(f"--story {item!r}: write TEXT:SECONDS, e.g. \"calm piano:0\"") from None
    if sorted(s for _, s in story) != [s for _, s in story] or story[0][1] != 0:
        raise UserError("--story segments must start at 0 and be in time order")
    late = [f"{t!r} at {s:g} s" for t, s in story if s >= duration]
    if late:
        raise UserError(f"--story segment {late[0]} starts after the end (--duration {duration:g}); "
                        "make --duration longer or start it earlier")
    return story


def parse_knobs(items: list[str]) -> list[tuple[str, str, object]]:
    """['coarse.candidates=4', ...] -> [('coarse', 'candidates', 4), ...], each key and type checked
    (STAGE.guidance overrides --guidance for that stage)."""
    from stages.sampling import parse_knob
    out = []
    for item in items:
        name, _, text = item.partition("=")
        stage, _, key = name.partition(".")
        if stage not in ("semantic", "coarse", "fine"):
            raise UserError(f"--knob {item!r}: write STAGE.KEY=VALUE with STAGE semantic, coarse or fine")
        try:
            value = parse_knob(key, text)
        except ValueError as e:
            raise UserError(f"--knob {item!r}: write STAGE.KEY=VALUE; {e}") from None
        try:
            check_knob(stage, key, value)
        except ValueError as e:
            raise UserError(f"--knob {item!r}: {e}") from None
        out.append((stage, key, value))
    return out


def check_knob(stage: str, key: str, value) -> None:
    """ValueError naming the fix for a knob its stage cannot take (the semantic-only ones elsewhere, a bad count)."""
    if key in ("beat_copy", "beat_pick", "beat_pick_by") and stage != "semantic":
        raise ValueError(f"{key} acts on the semantic ids only; write semantic.{key}=V")
    if key == "beat_pick" and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ValueError(f"beat_pick is a whole number of candidates, at least 1, got {value!r}")
    if key == "beat_pick_by":
        pulse_measure(value)


def check_knobs(args) -> None:
    """Sampling knobs a run could not use, refused before anything loads."""
    import math
    for name in ("guidance", "guidance_end"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number (1 = no guidance), got {value}")
    for stage in ("semantic", "coarse", "fine"):
        t, k, p = (getattr(args, f"{stage}_{x}") for x in ("temperature", "top_k", "top_p"))
        if t is not None and not (math.isfinite(t) and t >= 0):
            raise UserError(f"--{stage}-temperature must be 0 (greedy) or more, got {t}")
        if k is not None and k < 0:
            raise UserError(f"--{stage}-top-k must be 0 (off) or more, got {k}")
        if p is not None and not 0 < p <= 1:
            raise UserError(f"--{stage}-top-p must be in (0, 1] (1 = off), got {p}")
        steps = getattr(args, f"{stage}_steps")
        if steps is not None and min(steps) < 1:
            raise UserError(f"--{stage}-steps must be at least 1 per level, got {steps}")


def part_paths(stage_items: list[str] = ()) -> dict[str, str]:
    """The checkpoint of each part: configs/pipeline.yaml, with `--stage NAME=PATH` items applied."""
    paths = dict(vars(load_config(PipelineParts, ROOT / "configs" / "pipeline.yaml")))
    for item in stage_items:
        name, _, path = item.partition("=")
        if name not in PARTS or not path:
            raise UserError(f"--stage {item!r}: use NAME=PATH with NAME one of {', '.join(PARTS)}")
        paths[name] = path
    return paths


def out_paths(out: Path, n_texts: int, batch: int) -> list[Path]:
    if n_texts * batch == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}_{b}{out.suffix}") for i in range(n_texts) for b in range(batch)]


def main() -> None:
    ap = argparse.ArgumentParser(prog="python pipeline.py", description="Text to music.")
    ap.add_argument("--text", nargs="+", action="extend", default=[], help="one or more prompts (one file each)")
    ap.add_argument("--story", nargs="+", default=None, metavar="TEXT:SECONDS")
    ap.add_argument("--out", type=Path, default=Path("song.wav"))
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--batch", type=int, default=1, help="variations per prompt")
    ap.add_argument("--rerank", type=int, default=1, metavar="K", help="keep the best of K by MuLan score (+ --rerank-tempo)")
    ap.add_argument("--rerank-tempo", type=float, default=1.0, metavar="W",
                    help="with --rerank: add W x how strongly a candidate pulses at the bpm the prompt states")
    ap.add_argument("--prompt-audio", type=Path, default=None)
    ap.add_argument("--semantic-from", type=Path, default=None, metavar="AUDIO",
                    help="semantic ids from this recording instead of the semantic stage (acoustic resynthesis; "
                         "with another --text, a timbre transfer); --duration is capped to its length")
    ap.add_argument("--melody", type=Path, default=None, metavar="AUDIO",
                    help="a recording whose tune the music follows (a semantic stage trained with melody_input)")
    ap.add_argument("--rhythm", type=Path, default=None, metavar="AUDIO",
                    help="a recording whose note onsets the music follows (a coarse stage trained with onset_input)")
    ap.add_argument("--no-metronome", action="store_true",
                    help="a coarse stage with onset_input gets no click at the bpm the prompt states (or suggests)")
    ap.add_argument("--metronome-bpm", type=float, default=0.0, metavar="BPM",
                    help="the click's tempo for a prompt that states none (default: the tempo its words suggest)")
    ap.add_argument("--stage", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--plot", action="store_true", help="save a log-mel spectrogram PNG beside each WAV")
    ap.add_argument("--int8", action="store_true", help="stages generate with int8 weights (faster on CPU)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    for stage in ("semantic", "coarse", "fine"):
        for knob, tp in (("temperature", float), ("top-k", int), ("top-p", float)):
            ap.add_argument(f"--{stage}-{knob}", type=tp, default=None)
        ap.add_argument(f"--{stage}-steps", type=int, nargs="+", default=None, metavar="N",
                        help="masked stages: decoding steps per level")
    ap.add_argument("--guidance-end", type=float, default=None,
                    help="masked stages: anneal the guidance to this as the mask empties (MAGNeT: 1)")
    ap.add_argument("--knob", action="append", default=[], metavar="STAGE.KEY=VALUE",
                    help="any sampling knob of a stage, e.g. coarse.candidates=4 coarse.ar_stage=PATH "
                         "coarse.rescore_weight=0.5 coarse.hybrid_seconds=2 (see stages/sampling.py)")
    args = ap.parse_args()
    check_knobs(args)
    parse_knobs(args.knob)

    if bool(args.text) == bool(args.story):
        raise UserError("give either --text (one or more prompts) or --story")
    if any(not t.strip() for t in args.text):
        raise UserError("--text is empty; describe the music, e.g. --text \"calm solo piano\"")
    if not 0 < args.duration <= MAX_SECONDS:
        raise UserError(f"--duration must be in (0, {MAX_SECONDS:.0f}] seconds, got {args.duration}")
    if args.batch < 1 or args.rerank < 1:
        raise UserError("--batch and --rerank must be at least 1")
    if args.rerank_tempo < 0:
        raise UserError(f"--rerank-tempo must be at least 0 (0: MuLan score alone), got {args.rerank_tempo}")
    if not (args.metronome_bpm == 0 or 20 <= args.metronome_bpm <= 400):
        raise UserError(f"--metronome-bpm must be between 20 and 400 (0: guessed from the words), got {args.metronome_bpm}")
    story = parse_story(args.story, args.duration) if args.story else None
    if args.out.is_dir():
        raise UserError(f"--out {args.out} is a folder; give a file name, e.g. --out {args.out / 'song.wav'}")
    out_dir = args.out.parent if str(args.out.parent) else Path(".")
    if not out_dir.is_dir() or not os.access(out_dir, os.W_OK):
        raise UserError(f"cannot write {args.out}: {out_dir} is not a writable folder")
    paths = part_paths(args.stage)
    if args.prompt_audio and args.semantic_from:
        raise UserError("give either --prompt-audio (continue a recording) or --semantic-from (re-render one), not both")
    prompt = source = None
    tune = rhythm = None
    for flag, path in (("--prompt-audio", args.prompt_audio), ("--semantic-from", args.semantic_from),
                       ("--melody", args.melody), ("--rhythm", args.rhythm)):
        if path:
            try:
                audio = torch.from_numpy(load_audio(path, 24000))[None, None]
            except AudioError as e:
                raise UserError(f"{flag} {e}") from None
            if flag == "--prompt-audio":
                prompt = audio
            elif flag == "--semantic-from":
                source = audio
            elif flag == "--melody":
                tune = audio
            else:
                rhythm = audio

    t0 = time.perf_counter()
    pipe = Pipeline(load_parts(paths), int8=args.int8)
    load_s = time.perf_counter() - t0
    if tune is not None and not pipe.parts["semantic"].cfg.melody_input:
        raise UserError("--melody needs a semantic stage trained with melody_input=true; pass one with "
                        "--stage semantic=PATH or leave out --melody")
    if rhythm is not None and not getattr(pipe.parts["coarse"], "takes_onsets", False):
        raise UserError("--rhythm needs a coarse stage trained with onset_input=true; pass one with "
                        "--stage coarse=PATH or leave out --rhythm")
    if prompt is not None and pipe.sample_rate != 24000:
        prompt = torch.from_numpy(load_audio(args.prompt_audio, pipe.sample_rate))[None, None]
    ids = None
    if source is not None:
        if pipe.sample_rate != 24000:
            source = torch.from_numpy(load_audio(args.semantic_from, pipe.sample_rate))[None, None]
        ids = pipe.semantic_ids(source)
        args.duration = min(args.duration, ids.shape[1] / pipe.parts["semantic_tokenizer"].frame_rate)
    opts = GenerationOptions(seed=args.seed, guidance=args.guidance, metronome=not args.no_metronome,
                             metronome_bpm=args.metronome_bpm)
    for stage in ("semantic", "coarse", "fine"):
        for knob in ("temperature", "top_k", "top_p", "steps"):
            value = getattr(args, f"{stage}_{knob}")
            if value is not None:
                getattr(opts, stage)[knob] = value
        if args.guidance_end is not None and stage != "fine":
            getattr(opts, stage)["guidance_end"] = args.guidance_end
    for stage, key, value in parse_knobs(args.knob):
        getattr(opts, stage)[key] = value
    texts = [t for t, _ in story] if story else args.text
    rows = 1 if story else len(texts)
    if any(pipe.parts[k] is not None and pipe.parts[k].cfg.attribute_input for k in ("semantic", "coarse")):
        from data.attributes import stated
        for text in texts:   # what the stages trained with attribute_input will be told, so a user can check it
            print(f"the prompt states: {stated(text)}  ({text[:50]})")
    per = args.batch * args.rerank
    t1 = time.perf_counter()
    try:
        wav = generate_all(pipe, args, story, texts, opts, prompt, ids, per, tune, rhythm)
    except KeyboardInterrupt:
        print(f"interrupted in the {pipe.where}; nothing was written", file=sys.stderr)
        raise SystemExit(130) from None
    gen_s = time.perf_counter() - t1
    for path, w in zip(out_paths(args.out, rows, args.batch), wav):
        write_wav(path, w[0].numpy(), pipe.sample_rate)
        if args.plot:
            plot_single(w[0], pipe.sample_rate, path.with_suffix(".png"), path.stem)
        print(f"wrote {path} ({w.shape[-1] / pipe.sample_rate:.1f} s at {pipe.sample_rate} Hz)")
    for text, bpm in pipe.guessed.items():
        print(f"metronome at {bpm:.0f} bpm, the tempo the words suggest  ({text[:50]})")
    times = ", ".join(f"{k} {v:.1f} s" for k, v in pipe.timings.items())
    print(f"loaded models in {load_s:.1f} s; generated in {gen_s:.1f} s ({times})")


def generate_all(pipe, args, story, texts, opts, prompt, ids, per, tune=None, rhythm=None) -> torch.Tensor:
    """Every requested clip: [rows * batch, 1, N] (reranked down to `batch` per prompt with --rerank)."""
    progress = not args.quiet
    if story:
        wav = torch.cat([pipe.generate(None, args.duration, story=story, options=opts, prompt_audio=prompt,
                                       semantic_ids=ids, progress=progress, melody=tune, rhythm=rhythm)
                         for _ in range(per)])
    else:
        expanded = [t for t in texts for _ in range(per)]
        wav = pipe.generate(expanded, args.duration, options=opts,
                            prompt_audio=prompt.expand(len(expanded), -1, -1) if prompt is not None else None,
                            semantic_ids=ids.expand(len(expanded), -1) if ids is not None else None,
                            progress=progress, melody=tune, rhythm=rhythm)
    if args.rerank > 1:
        keys = [" ".join(texts)] if story else texts
        wav = pipe.rerank([k for k in keys for _ in range(args.batch)], wav, args.rerank, args.rerank_tempo)
    return wav


def plot_single(wav: torch.Tensor, sr: int, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from audio_tokenizers.spectral import log_mel
    m = log_mel(wav[None].float(), sr, 1024, 256, 80)[0].numpy()
    fig, ax = plt.subplots(figsize=(10, 3))
    ax.imshow(m, origin="lower", aspect="auto", vmin=-5, extent=[0, len(wav) / sr, 0, 80])
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("seconds")
    ax.set_ylabel("mel band")
    plt.tight_layout()
    plt.savefig(path, dpi=80)
    plt.close(fig)
