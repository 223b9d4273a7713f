"""Checkpoints: a folder with weights in safetensors and a JSON describing them.

    ckpt/
      config.json              {"kind", "format_version", "config": {...}, "meta": {...}}
      model.safetensors        the weights (state_dict)
      train_state.safetensors  optional: optimizer tensors and RNG states, for --resume
      train_state.json         optional: step, scheduler, optimizer param groups, python RNG

Writing is atomic: everything goes into a fresh sibling folder which then replaces the old
one with `os.replace`, so a run killed mid-write leaves the previous checkpoint intact.
Loading never unpickles: tensors come from safetensors, everything else from JSON.
"""
from __future__ import annotations

import json
import os
import re
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common.errors import CheckpointError, umask_mode

FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    kind: str
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    train_state: dict[str, Any] | None = None
    path: Path | None = None


# ---------------------------------------------------------------- writing

CHECKPOINT_FILES = {"model.safetensors", "config.json", "train_state.safetensors", "train_state.json"}


def save_checkpoint(path: str | Path, kind: str, config: dict[str, Any],
                    state_dict: dict[str, torch.Tensor], meta: dict[str, Any] | None = None,
                    train_state: dict[str, Any] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write a checkpoint folder atomically. `dtype` (e.g. torch.float16) casts float weights."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        tensors = {k: _prepare(v, dtype) for k, v in state_dict.items()}
        save_file(tensors, str(tmp / "model.safetensors"))
        header = {"kind": kind, "format_version": FORMAT_VERSION, "config": config, "meta": meta or {}}
        _write_json(tmp / "config.json", header)
        if train_state is not None:
            tensors, info = _flatten_train_state(train_state)
            save_file(tensors, str(tmp / "train_state.safetensors"))
            _write_json(tmp / "train_state.json", info)
        if path.is_dir():   # files beside the checkpoint (a model card, notes) survive a re-save or an export
            for f in path.iterdir():
                if f.is_file() and f.name not in CHECKPOINT_FILES:
                    shutil.copy2(f, tmp / f.name)
        _fsync_dir(tmp)
        os.chmod(tmp, umask_mode(directory=True))   # mkdtemp made it 0700
        for f in tmp.iterdir():
            os.chmod(f, umask_mode())
        _swap_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _prepare(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    t = t.detach().cpu()
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.contiguous()


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    for p in path.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def _swap_in(tmp: Path, path: Path) -> None:
    """Replace folder `path` by `tmp`. The old folder is moved aside first because
    rename cannot replace a non-empty directory; `load_checkpoint` falls back to it if a
    crash lands between the two renames."""
    if not path.exists():
        os.replace(tmp, path)
        return
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- what a killed writer leaves

def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(folder: Path, prefix: str) -> None:
    """Remove `<prefix>tmp-PID...` and `<prefix>old-PID` entries of `folder` whose writer is no longer running."""
    if not folder.is_dir():
        return
    for p in folder.glob(f"{prefix}*"):
        m = re.match(re.escape(prefix) + r"(tmp|old)-(\d+)", p.name)
        if m and (int(m.group(2)) == os.getpid() or not pid_alive(int(m.group(2)))):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _complete(folder: Path) -> bool:
    """All the files of a checkpoint folder are there and its header reads (a half-deleted one is not)."""
    try:
        json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    pair = [(folder / f"train_state.{e}").is_file() for e in ("json", "safetensors")]
    return (folder / "model.safetensors").is_file() and pair[0] == pair[1]


def _step_of(folder: Path) -> int:
    try:
        return int(json.loads((folder / "config.json").read_text()).get("meta", {}).get("step", -1))
    except (OSError, ValueError, TypeError):
        return -1


def recover(path: Path) -> None:
    """Before writing `path`: if a crash left it moved aside (between the two renames of a save), put the newest
    complete copy back; then remove every leftover of killed saves (temporaries, old copies)."""
    if not path.exists():
        olds = [p for p in path.parent.glob(f".{path.name}.old-*") if _complete(p)] if path.parent.exists() else []
        if olds:
            os.replace(max(olds, key=lambda p: (_step_of(p), p.stat().st_mtime)), path)
    for p in path.parent.glob(f".{path.name}.old-*"):
        shutil.rmtree(p, ignore_errors=True)
    remove_stale(path.parent, f".{path.name}.")


# ---------------------------------------------------------------- training state

def _flatten_train_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a nested dict into tensors (for safetensors) and JSON (everything else).
    A tensor leaf is replaced in the JSON by {"__tensor__": key}."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj: Any, prefix: str) -> Any:
        if isinstance(obj, torch.Tensor):
            tensors[prefix] = obj.detach().cpu().contiguous()
            return {"__tensor__": prefix}
        if isinstance(obj, dict):
            return {"__dict__": [[_key(k), walk(v, f"{prefix}.{k}")] for k, v in obj.items()]}
        if isinstance(obj, (list, tuple)):
            return [walk(v, f"{prefix}.{i}") for i, v in enumerate(obj)]
        if isinstance(obj, (np.integer, np.floating)):
            return obj.item()
        return obj

    return tensors, walk(state, "s")


def _key(k: Any) -> Any:
    if not isinstance(k, (str, int)):
        raise TypeError(f"train state keys must be str or int, got {type(k)}")
    return k


def _unflatten_train_state(info: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(info, dict) and "__tensor__" in info:
        return tensors[info["__tensor__"]]
    if isinstance(info, dict) and "__dict__" in info:
        return {k: _unflatten_train_state(v, tensors) for k, v in info["__dict__"]}
    if isinstance(info, list):
        return [_unflatten_train_state(v, tensors) for v in info]
    return info


def rng_state() -> dict[str, Any]:
    """RNG states of python, numpy's legacy global RNG and torch, for exact resume."""
    np_state = np.random.get_state()
    return {"python": _tuples_to_lists(random.getstate()),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def _tuples_to_lists(obj: Any) -> Any:
    return [_tuples_to_lists(v) for v in obj] if isinstance(obj, (tuple, list)) else obj


# ---------------------------------------------------------------- reading

def read_header(path: str | Path) -> dict[str, Any]:
    """The config.json of a checkpoint, with clear errors for missing or broken folders."""
    path = _resolve(Path(path))
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} is not a checkpoint (no config.json); pass a checkpoint folder")
    try:
        header = json.loads(cfg_file.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{cfg_file} is corrupt (not JSON); re-save or re-download the checkpoint") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{cfg_file} holds {json.dumps(header)[:20]}, not a checkpoint header; re-save the checkpoint")
    for key in ("kind", "format_version", "config"):
        if key not in header:
            raise CheckpointError(f"{cfg_file} lacks '{key}'; it was not written by this project")
    if not isinstance(header["config"], dict):
        raise CheckpointError(f"{cfg_file} has no config (config: {json.dumps(header['config'])[:20]}); re-save the checkpoint")
    return header


def load_weights(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: str | Path) -> None:
    """module.load_state_dict (floats as float32), with a one-line error when the weights do not fit the model
    the checkpoint's config describes (a missing tensor, another size)."""
    state = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        lines = [l.strip() for l in str(e).splitlines() if l.strip()]
        detail = next((l for l in lines if l.startswith(("Missing", "Unexpected", "size mismatch"))), lines[-1])
        raise CheckpointError(f"{path}: the weights do not fit the model its config.json describes "
                              f"({detail[:160]}); the checkpoint is damaged or was edited, re-save it") from None


def hf_model_type(path: str | Path) -> str | None:
    """The `model_type` of a Hugging Face folder (e.g. "encodec", "clap"), None for our checkpoints."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        return None
    try:
        return json.loads(cfg_file.read_text()).get("model_type")
    except json.JSONDecodeError:
        raise CheckpointError(f"{cfg_file} is corrupt (not JSON)") from None


def load_checkpoint(path: str | Path, kind: str | tuple[str, ...] | None = None,
                    with_train_state: bool = False) -> Checkpoint:
    """Read a checkpoint; `kind` (one or several) rejects checkpoints of other kinds."""
    path = _resolve(Path(path))
    header = read_header(path)
    kinds = (kind,) if isinstance(kind, str) else kind
    if kinds and header["kind"] not in kinds:
        raise CheckpointError(f"{path} is a '{header['kind']}' checkpoint but a "
                              f"{' or '.join(repr(k) for k in kinds)} checkpoint is needed here")
    if header["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version {header['format_version']}, this code reads "
                              f"version {FORMAT_VERSION}; convert it or use a matching release")
    state_dict = _load_tensors(path / "model.safetensors")
    train_state = None
    if with_train_state and (path / "train_state.json").is_file():
        tensors = _load_tensors(path / "train_state.safetensors")
        info = json.loads((path / "train_state.json").read_text())
        train_state = _unflatten_train_state(info, tensors)
    return Checkpoint(header["kind"], header["config"], state_dict, header.get("meta", {}),
                      train_state, path)


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file} is missing; the checkpoint is incomplete")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file} is truncated or corrupt ({e}); re-save the checkpoint") from None


def _resolve(path: Path) -> Path:
    """`path`, or the folder a crash left moved aside while swapping it in."""
    if path.exists():
        return path
    leftovers = [p for p in path.parent.glob(f".{path.name}.old-*") if _complete(p)] if path.parent.exists() else []
    if leftovers:   # the newest complete one: by training step, then by age (not by PID)
        return max(leftovers, key=lambda p: (_step_of(p), p.stat().st_mtime))
    raise CheckpointError(f"checkpoint {path} not found; check the path")


def export(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.float16, meta: dict | None = None) -> Path:
    """Copy a checkpoint for shipping: float weights cast to `dtype` (fp16), no training state."""
    ck = load_checkpoint(src)
    return save_checkpoint(dst, ck.kind, ck.config, ck.state_dict, meta={**ck.meta, **(meta or {})}, dtype=dtype)


def sampling_meta(items: list[str]) -> dict:
    """['temperature=0.8', ...] -> {'temperature': 0.8}, each key a stages.sampling.Sampling knob of its type."""
    from common.errors import UserError
    from stages.sampling import parse_knob
    out = {}
    for item in items:
        key, _, text = item.partition("=")
        try:
            out[key] = parse_knob(key, text)
        except ValueError as e:
            raise UserError(f"--sampling {item!r}: write KEY=VALUE; {e}") from None
    return out


def main() -> None:
    import argparse

    from common.errors import run_cli

    def run() -> None:
        ap = argparse.ArgumentParser(prog="python -m common.checkpoint", description="Checkpoint utilities.")
        sub = ap.add_subparsers(dest="command", required=True)
        ex = sub.add_parser("export", help="fp16 weights without training state, e.g. into pretrained/")
        ex.add_argument("src")
        ex.add_argument("dst")
        ex.add_argument("--sampling", nargs="+", default=[], metavar="KEY=VALUE",
                        help="a stage's default sampling knobs, chosen on held-out prompts (e.g. temperature=0.8): "
                             "the pipeline uses them unless told otherwise")
        args = ap.parse_args()
        meta = {"sampling": sampling_meta(args.sampling)} if args.sampling else None
        out = export(args.src, args.dst, meta=meta)
        size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
        print(f"exported {args.src} -> {out} ({size:.1f} MB)")
    run_cli(run)


if __name__ == "__main__":
    main()
