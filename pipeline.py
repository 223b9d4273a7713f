"""Text to music: MuLan text tokens -> semantic stage -> coarse stage -> fine stage -> codec.

    python pipeline.py --text "a calm solo piano piece in C major" --out song.wav

The generation chain is not built yet (see the open issue on pipeline.py); for now this
checks which of the parts named in configs/pipeline.yaml exist and says what is missing.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path

from common.config import load_config, register_config
from common.errors import UserError, run_cli

ROOT = Path(__file__).resolve().parent
PARTS = ("mulan", "semantic_tokenizer", "acoustic", "semantic", "coarse", "fine")


@register_config("pipeline")
@dataclass
class PipelineParts:
    """The checkpoint folder of each part (relative paths are relative to the repository)."""
    mulan: str = "pretrained/mulan"
    semantic_tokenizer: str = "pretrained/semantic_tokenizer"
    acoustic: str = "pretrained/acoustic"
    semantic: str = "pretrained/semantic"
    coarse: str = "pretrained/coarse"
    fine: str = "pretrained/fine"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--text", action="append", required=True, help="a prompt (repeatable)")
    ap.add_argument("--out", default="song.wav")
    ap.add_argument("--stage", action="append", default=[], metavar="NAME=PATH")
    args = ap.parse_args()
    if any(not t.strip() for t in args.text):
        raise UserError("--text is empty; describe the music, e.g. --text \"calm solo piano\"")
    parts = asdict(load_config(PipelineParts, ROOT / "configs" / "pipeline.yaml"))
    for item in args.stage:
        name, _, path = item.partition("=")
        if name not in PARTS or not path:
            raise UserError(f"--stage {item!r}: use NAME=PATH with NAME one of {', '.join(PARTS)}")
        parts[name] = path
    missing = [f"{name} ({parts[name]})" for name in PARTS if not (ROOT / parts[name]).exists()]
    if missing:
        raise UserError(f"models not available yet: {', '.join(missing)}; the pipeline needs all six "
                        "(see README: Status)")
    raise UserError("the generation chain is not implemented yet (see README: Status)")


if __name__ == "__main__":
    run_cli(main)
