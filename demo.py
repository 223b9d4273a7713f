"""The web demo: a page over the same Pipeline object `pipeline.py` uses; no logic of its own.

    python -m demo [--host 127.0.0.1] [--port 7860] [--stage NAME=PATH ...]

Type a prompt (or a story: one "TEXT:SECONDS" per line), pick the duration, seed, guidance, the
sampling knobs of each stage and, optionally, stage checkpoints other than the defaults (any
folder under pretrained/ or a typed path), an audio prompt to continue or a recording whose
semantic ids to re-render, or a melody to follow (a semantic stage trained with melody_input); the page plays the result and shows its spectrogram and how long each
stage took. It binds to localhost unless told otherwise.
"""
from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from common.errors import UserError, run_cli
from pipeline import PARTS, ROOT, GenerationOptions, Pipeline, load_parts

STAGES = ("semantic", "coarse", "fine")


def stage_choices(name: str) -> list[str]:
    """Checkpoint folders under pretrained/ that could fill a pipeline slot (by name prefix, as shipped)."""
    found = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "pretrained").glob(f"{name}*") if (p / "config.json").is_file())
    return found or [f"pretrained/{name}"]


class Demo:
    """Keeps one loaded Pipeline per set of checkpoint paths, so switching back is instant."""

    def __init__(self, defaults: dict[str, str]):
        self.defaults, self.loaded = defaults, {}

    def pipeline(self, paths: dict[str, str]) -> Pipeline:
        key = tuple(sorted(paths.items()))
        if key not in self.loaded:
            self.loaded[key] = Pipeline(load_parts(paths))
        return self.loaded[key]

    def generate(self, prompt: str, duration: float, seed: float, guidance: float, story_mode: bool,
                 semantic_stage: str, coarse_stage: str, fine_stage: str, knobs: dict,
                 prompt_audio: str | None, semantic_from: str | None, melody: str | None = None):
        """-> ((sample rate, int16 samples), spectrogram PNG path, timings as markdown)."""
        from data.audio import load_audio
        from pipeline_cli import parse_story
        if not prompt.strip():
            raise UserError("describe the music first, e.g. 'a calm solo piano piece in C major'")
        paths = {**self.defaults, "semantic": semantic_stage, "coarse": coarse_stage, "fine": fine_stage}
        pipe = self.pipeline(paths)
        opts = GenerationOptions(seed=int(seed), guidance=float(guidance),
                                 **{k: {n: v for n, v in knobs[k].items() if v is not None} for k in STAGES})
        kwargs = {}
        if prompt_audio:
            kwargs["prompt_audio"] = torch.from_numpy(load_audio(prompt_audio, pipe.sample_rate))[None, None]
        if semantic_from:
            kwargs["semantic_ids"] = pipe.semantic_ids(torch.from_numpy(load_audio(semantic_from, pipe.sample_rate))[None, None])
            duration = min(duration, kwargs["semantic_ids"].shape[1] / pipe.parts["semantic_tokenizer"].frame_rate)
        if melody:
            kwargs["melody"] = torch.from_numpy(load_audio(melody, pipe.sample_rate))[None, None]
        if story_mode:
            story = parse_story([line for line in prompt.splitlines() if line.strip()], duration)
            wav = pipe.generate(None, duration, story=story, options=opts, **kwargs)
        else:
            wav = pipe.generate([prompt.strip()], duration, options=opts, **kwargs)
        audio = wav[0, 0].numpy()
        timings = " · ".join(f"{k} {v:.2f} s" for k, v in pipe.timings.items())
        return (pipe.sample_rate, (np.clip(audio, -1, 1) * 32767).astype(np.int16)), spectrogram(audio, pipe.sample_rate), \
            f"**{len(audio) / pipe.sample_rate:.1f} s of audio** — {timings}"


def spectrogram(audio: np.ndarray, sr: int) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from audio_tokenizers.spectral import log_mel
    m = log_mel(torch.from_numpy(audio)[None].float(), sr, 1024, 256, 80)[0].numpy()
    fig, ax = plt.subplots(figsize=(9, 2.6))
    ax.imshow(m, origin="lower", aspect="auto", vmin=-5, extent=[0, len(audio) / sr, 0, 80])
    ax.set_xlabel("seconds")
    ax.set_ylabel("mel band")
    plt.tight_layout()
    path = tempfile.NamedTemporaryFile(suffix=".png", delete=False).name
    plt.savefig(path, dpi=80)
    plt.close(fig)
    return path


def build(demo: Demo):
    import gradio as gr
    with gr.Blocks(title="musiclm-offline") as page:
        gr.Markdown("# musiclm-offline\nText to music, every model trained on a CPU. Describe the music and press "
                    "**Generate**.")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt",
                                    placeholder="a calm solo piano piece in C major")
                story = gr.Checkbox(label="Story mode: one 'TEXT:SECONDS' per line", value=False)
                with gr.Row():
                    duration = gr.Slider(1, 60, value=10, step=0.5, label="Duration (s)", elem_id="duration")
                    seed = gr.Number(value=0, precision=0, label="Seed")
                    guidance = gr.Slider(1, 10, value=3, step=0.5, label="Guidance")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                audio = gr.Audio(label="Result", type="numpy", elem_id="result", interactive=False)
                timings = gr.Markdown(elem_id="timings")
        image = gr.Image(label="Spectrogram", type="filepath", elem_id="spectrogram")
        with gr.Accordion("Stages and sampling", open=False):
            picks = [gr.Dropdown(stage_choices(s), value=demo.defaults[s], label=f"{s} stage", allow_custom_value=True)
                     for s in STAGES]
            knob_inputs = []
            for s in STAGES:
                with gr.Row():
                    knob_inputs += [gr.Number(value=None, label=f"{s} temperature"), gr.Number(value=None, precision=0,
                                    label=f"{s} top-k"), gr.Number(value=None, label=f"{s} top-p"),
                                    gr.Textbox(value="", label=f"{s} steps per level (masked stages)")]
        with gr.Accordion("Audio in", open=False):
            prompt_audio = gr.Audio(label="Continue this recording", type="filepath")
            semantic_from = gr.Audio(label="Re-render this recording (its semantic ids; --semantic-from)", type="filepath")
            melody = gr.Audio(label="Follow this melody (--melody; a semantic stage trained with melody_input)",
                              type="filepath")

        def run(prompt_text, dur, sd, gd, story_mode, sem, coarse, fine, *rest):
            knob_values, (p_audio, s_from, tune) = rest[:-3], rest[-3:]
            knobs = {}
            for i, s in enumerate(STAGES):
                t, k, p, steps = knob_values[4 * i: 4 * i + 4]
                knobs[s] = {"temperature": t, "top_k": int(k) if k is not None else None, "top_p": p,
                            "steps": [int(x) for x in str(steps).replace(",", " ").split()] or None}
                if p is not None and not 0 < p <= 1 or t is not None and (t < 0 or not math.isfinite(t)):
                    raise gr.Error(f"{s}: temperature must be 0 or more and top-p in (0, 1]")
            try:
                return demo.generate(prompt_text, dur, sd, gd, story_mode, sem, coarse, fine, knobs, p_audio, s_from,
                                     tune)
            except UserError as e:
                raise gr.Error(str(e)) from None
        button.click(run, [prompt, duration, seed, guidance, story, *picks, *knob_inputs, prompt_audio, semantic_from,
                                  melody],
                     [audio, image, timings])
    return page


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m demo", description="The web demo.")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--stage", action="append", default=[], metavar="NAME=PATH", help="default checkpoint of a part")
    return ap.parse_args(argv)


def main() -> None:
    from pipeline_cli import part_paths
    args = parse_args()
    paths = part_paths(args.stage)
    missing = [f"{k} ({paths[k]})" for k in PARTS if not (ROOT / paths[k]).exists() and not Path(paths[k]).exists()]
    if missing:
        raise UserError(f"models not found: {', '.join(missing)}; train them (README) or pass --stage NAME=PATH")
    demo = Demo(paths)
    demo.pipeline(paths)   # load (and check) the defaults before serving
    build(demo).launch(server_name=args.host, server_port=args.port, show_error=True)


if __name__ == "__main__":
    run_cli(main)
