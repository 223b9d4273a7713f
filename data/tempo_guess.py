"""The metronome a prompt suggests: a tempo where it states none, and how hard its beats strike.

A coarse stage with onset_input follows a metronome (data/onsets.py), and one that hears none (NOT_GIVEN) where the
prompt states no bpm loses the instrument (measured, README). A prompt without a number still implies a pace ("a
slow lullaby", "a reel"): MuLan's text tower puts captions of one pace and style near each other, so the k training
captions nearest the prompt (cosine of text embeddings) vote. The tempo is the bpm of a grid that the most of their
tempos would accept under the tempo score's rule (within 4%, octave errors allowed: evaluation.adherence), within a
factor 1.5 of their median (a slow prompt gets a slow click, not three per beat), the tie nearest it.

The click's onset level comes from the same neighbours: a choir's or a flute's notes start softly (the beat-rate
frames of its clips are level 1), a harp's or a banjo's hard (level 3), and a level-3 click on every beat asks the
stage for plucked notes whatever the prompt names. A clip's beat strength is the level of its n-th strongest frame,
n = the beats in the clip; the guess is the median of the neighbours'. The pipeline clicks this softly only where it
guessed the tempo: a stated bpm gets a hard click, which the stage follows best (README, session 18).

The table (training captions' text embeddings [N, D], their clips' tempos and beat strengths [N]) belongs to the
MuLan that embedded them and lives in its folder as `tempo_table.safetensors`, written by

    python -m data.tempo_guess --mulan pretrained/mulan --manifest corpus/train.jsonl

A MuLan folder without one guesses nothing; one whose weights changed since is refused at load.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common.errors import CheckpointError, UserError, umask_mode
from evaluation.adherence import OCTAVE_FACTORS, TEMPO_TOLERANCE   # the tempo score's rule, which the vote uses

FILE = "tempo_table.safetensors"
GRID = torch.arange(40.0, 221.0)               # candidate bpm
SPAN = 0.405                                   # log(1.5): how far from the neighbours' median a guess may go
PROBES = ("a slow waltz on piano", "a fast reel on fiddle")   # re-embedded at load: the table fits this MuLan
SAMPLE_RATE = 24000                            # clips are read at the codec's rate, as data.tokenize reads them


def beat_strength(levels: torch.Tensor, bpm: float, frame_rate: float) -> int:
    """A clip's onset levels [T] and tempo -> the level of its n-th strongest frame, n = the beats in the clip."""
    n = max(1, round(bpm * len(levels) / frame_rate / 60.0))
    return int(levels.sort(descending=True).values[min(n, len(levels)) - 1])


def build(mulan, captions: list[str], bpm: list[float], strength: list[int], batch: int = 256) -> dict[str, torch.Tensor]:
    """The table of `captions` (each with its clip's tempo and beat strength) as this MuLan embeds them."""
    with torch.no_grad():
        emb = torch.cat([mulan.embed_text(captions[i:i + batch]) for i in range(0, len(captions), batch)])
        probes = mulan.embed_text(list(PROBES))
    return {"embeddings": emb.half(), "bpm": torch.tensor(bpm, dtype=torch.float32),
            "strength": torch.tensor(strength, dtype=torch.uint8), "probes": probes.float()}


def save(table: dict[str, torch.Tensor], folder: str | Path) -> Path:
    path = Path(folder) / FILE
    tmp = path.with_suffix(".tmp")
    save_file(table, str(tmp))
    os.chmod(tmp, umask_mode())
    os.replace(tmp, path)
    return path


def load(folder: str | Path, mulan) -> dict[str, torch.Tensor] | None:
    """The folder's table, or None where it has none; refused if `mulan` no longer embeds the probes as it did."""
    path = Path(folder) / FILE
    if not path.is_file():
        return None
    table = load_file(str(path))
    with torch.no_grad():
        now = mulan.embed_text(list(PROBES)).float()
    if not torch.allclose(now, table["probes"], atol=1e-3):
        raise CheckpointError(f"{path} was built with other MuLan weights; rebuild it: "
                              f"python -m data.tempo_guess --mulan {folder} --manifest TRAIN.jsonl")
    return table


def guess(table: dict[str, torch.Tensor], text_emb: torch.Tensor, k: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Text embeddings [B, D] -> a bpm [B] (float) and a click level [B] (int64) from the k nearest captions."""
    keys = torch.nn.functional.normalize(table["embeddings"].float(), dim=-1)
    sim = torch.nn.functional.normalize(text_emb.float(), dim=-1) @ keys.T
    nearest = sim.topk(min(k, len(keys)), dim=1).indices                               # [B, k]
    near = table["bpm"][nearest]
    target = GRID[:, None] * torch.tensor(OCTAVE_FACTORS)                            # [G, F]
    accepts = ((near[:, None, :, None] - target[None, :, None]).abs()
               <= TEMPO_TOLERANCE * target[None, :, None]).any(-1)                    # [B, G, k]
    votes = accepts.sum(-1).float()                                                   # [B, G]
    off = (GRID.log()[None] - near.log().median(1).values[:, None]).abs()             # |log(g / median)|
    votes[off > SPAN] = -1                        # a slow prompt's guess stays slow: no x2 or x3 of its neighbours
    level = table["strength"][nearest].long().median(1).values.clamp_min(1)   # a click of level 0 would be no click
    return GRID[(votes - 1e-3 * off).argmax(1)], level    # the tie nearest the median


def main(argv: list[str] | None = None) -> None:
    from audio_tokenizers.mulan import load_conditioner
    from common.errors import run_cli
    from data.manifest import SkipCounter, iter_audio, read_manifest
    from data.onsets import onset_levels

    p = argparse.ArgumentParser(description="Write a MuLan folder's tempo table from a training manifest's clips.")
    p.add_argument("--mulan", required=True, help="a MuLan checkpoint folder; the table is written into it")
    p.add_argument("--manifest", required=True, action="append", help="jsonl with audio, caption and tempo (repeatable)")
    p.add_argument("--frame-rate", type=float, default=50.0, help="onset frames per second (the coarse stage's rate)")
    args = p.parse_args(argv)

    def run():
        rows = [r for m in args.manifest for r in read_manifest(m) if r.get("caption") and r.get("tempo")]
        if not rows:
            raise UserError(f"no rows with both a caption and a tempo in {', '.join(args.manifest)}")
        mulan = load_conditioner(args.mulan)
        kept, strength, skips = [], [], SkipCounter()
        for row, wav in iter_audio(rows, SAMPLE_RATE, skips):
            frames = int(len(wav) / SAMPLE_RATE * args.frame_rate)
            lv = onset_levels(torch.from_numpy(wav)[None], SAMPLE_RATE, args.frame_rate, frames)[0]
            kept.append(row)
            strength.append(beat_strength(lv, float(row["tempo"]), args.frame_rate))
        if not kept:
            raise UserError(f"no readable audio among {len(rows)} rows; {skips.summary()}")
        table = build(mulan, [r["caption"] for r in kept], [float(r["tempo"]) for r in kept], strength)
        print(f"wrote {save(table, args.mulan)}: {len(kept)} clips; {skips.summary()}")

    run_cli(run)


if __name__ == "__main__":
    main()
