import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def sine(freq: float, seconds: float, sr: int, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def run_module(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m ...` from the repository root and capture its output."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def run_modules(*commands: list[str], timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """Several independent `python -m ...` runs side by side (most of a short CLI run is interpreter and torch
    start-up, which two cores do in parallel); their results in the order given."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")   # torch threads spinning on shared cores
    procs = [subprocess.Popen([sys.executable, "-m", *c], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in commands]
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


def assert_clean_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    """Exit code 2, one line on stderr starting with 'error:', containing `words`, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])


def save_debug_tokenizers(d: Path, semantic_name: str = "semantic_tokenizer") -> None:
    """Debug acoustic codec, log-mel semantic tokenizer and MuLan, saved as checkpoints in `d`."""
    import torch

    from audio_tokenizers.acoustic import AcousticConfig, build_codec
    from audio_tokenizers.mulan import MuLan, MuLanConfig
    from audio_tokenizers.mulan_train import train_sentencepiece
    from audio_tokenizers.semantic import SemanticTokenizer, SemanticTokenizerConfig
    from common.checkpoint import save_checkpoint
    from common.config import config_to_dict, load_config
    torch.manual_seed(0)
    acfg = load_config(AcousticConfig, ROOT / "configs/debug/acoustic.yaml")
    save_checkpoint(d / "acoustic", "acoustic_spectral", config_to_dict(acfg), build_codec(acfg).state_dict())
    scfg = load_config(SemanticTokenizerConfig, ROOT / "configs/debug/semantic_tokenizer.yaml", ["backend=logmel"])
    SemanticTokenizer(scfg, torch.randn(16, 64)).save(d / semantic_name)
    mcfg = load_config(MuLanConfig, ROOT / "configs/debug/mulan.yaml")
    mulan = MuLan(mcfg, train_sentencepiece(["a calm piano piece", "fast drums", "slow strings"] * 10, 400))
    mulan.rvq.fit(torch.randn(64, mcfg.embed_dim))
    save_checkpoint(d / "mulan", "mulan", config_to_dict(mcfg), mulan.state_dict())


def save_debug_parts(d: Path) -> Path:
    """All six debug parts (tokenizers + untrained stages), saved as checkpoints in `d` that fit together."""
    from common.config import load_config
    from stages.base import StageConfig, build_stage, save_stage
    save_debug_tokenizers(d)
    for kind in ("semantic", "coarse", "fine"):
        cfg = load_config(StageConfig, ROOT / f"configs/debug/{kind}.yaml", ["acoustic_rate=100"])
        save_stage(build_stage(cfg), d / kind)
    return d
