"""The one training loop (common/training.py) under every trainer: DDP, SIGKILL + resume, the out-dir lock,
resume refusals, leftovers of killed saves, and bad values."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import soundfile as sf
import torch

from common.checkpoint import load_checkpoint
from common.config import load_config
from common.errors import ConfigError, UserError
from common.training import OutDirLock, RunConfig, check_resume
from tests.helpers import ROOT, assert_clean_error, run_module, run_modules, sine
from tests.stage_helpers import make_cache


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Tones with captions (codec, semantic tokenizer, MuLan) and a synthetic token cache (stages)."""
    d = tmp_path_factory.mktemp("train_data")
    rows = []
    for i, f in enumerate([220, 277, 330, 392, 440, 523, 587, 659]):
        sf.write(d / f"{i}.wav", sine(f, 1.5, 24000) * (0.5 + 0.05 * i), 24000)
        rows.append(json.dumps({"audio": f"{i}.wav", "caption": f"a tone at {f} hertz, number {i}"}))
    (d / "m.jsonl").write_text("\n".join(rows) + "\n")
    make_cache(d / "cache")
    return d


def command(trainer: str, d, out, steps: int) -> list[str]:
    """The training command of `trainer` on the debug config, logging every step, saving every 2."""
    m = d / "m.jsonl"
    run = [f"out={out}", f"steps={steps}", "log_every=1", "eval_every=1000", "ckpt_every=2", "threads=1"]
    return {
        "stage": ["stages.coarse", "--config", "configs/debug/coarse.yaml", f"cache={d / 'cache'}", *run],
        "codec": ["audio_tokenizers.acoustic", "train", "--config", "configs/debug/acoustic.yaml",
                  f"train_manifest={m}", f"valid_manifest={m}", *run],
        "semantic": ["audio_tokenizers.semantic", "train", "--config", "configs/debug/semantic_tokenizer.yaml",
                     f"train_manifest={m}", f"valid_manifest={m}", "ssl_targets=bestrq", "augment_prob=0.5", "dropout=0.0", *run],
        "mulan": ["audio_tokenizers.mulan", "train", "--config", "configs/debug/mulan.yaml", f"train_manifest={m}",
                  f"valid_manifest={m}", "dropout=0.0", "eval_clips=4", *run],
    }[trainer]


def env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def losses(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("trainer", ["stage", "codec", "semantic", "mulan"])
def test_ddp_matches_one_process_and_sigkill_resume_is_bit_identical(trainer, data, tmp_path):
    """One uninterrupted run is the reference for both: torchrun with 2 processes logs the same losses (within
    1e-4), and a run killed with SIGKILL after a checkpoint, then resumed, ends with the same weights bit for bit."""
    steps = 8
    # the reference run and the run to be killed go side by side (one core each), then DDP takes both cores
    with open(tmp_path / "a.err", "w") as err:   # the child keeps its own copy of the handle
        straight = subprocess.Popen([sys.executable, "-m", *command(trainer, data, tmp_path / "a", steps)], cwd=ROOT,
                                    env=env(), stdout=subprocess.DEVNULL, stderr=err)
    proc = subprocess.Popen([sys.executable, "-m", *command(trainer, data, tmp_path / "b", steps)], cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:   # kill it once a checkpoint past step 2 is written
        log = tmp_path / "b" / "metrics.jsonl"
        if log.exists() and len(losses(tmp_path / "b")) >= 5:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert straight.wait(timeout=300) == 0, (tmp_path / "a.err").read_text()[-2000:]
    # the killed run resumes beside the DDP run (its own folder; most of either is interpreter start-up)
    two, resumed = run_modules(["torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                "-m", *command(trainer, data, tmp_path / "two", steps)],
                               [*command(trainer, data, tmp_path / "b", steps), "--resume"])
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = losses(tmp_path / "a"), losses(tmp_path / "two")
    assert len(a) == len(b) == steps and max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-2000:]
    a, b = (load_checkpoint(tmp_path / d / "last") for d in ("a", "b"))
    assert b.meta["step"] == a.meta["step"] == steps and a.state_dict.keys() == b.state_dict.keys()
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k]), k
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.startswith(".last.")]   # no leftovers


def test_a_second_run_into_the_same_out_dir_is_refused(tmp_path):
    lock = OutDirLock(tmp_path)
    code = ("from pathlib import Path; from common.errors import run_cli; from common.training import OutDirLock; "
            f"run_cli(lambda: OutDirLock(Path({str(tmp_path)!r})))")
    child = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True)
    assert_clean_error(child, f"being written by the run with PID {os.getpid()}")
    lock.release()
    (tmp_path / ".lock").write_text("999999999")          # a dead run's lock is taken over
    OutDirLock(tmp_path).release()
    assert not (tmp_path / ".lock").exists()


def test_stage_run_lock_exits_2_naming_the_pid(data, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text(str(os.getpid()))   # "another run": this live process
    assert_clean_error(run_module(*command("stage", data, tmp_path / "run", 4)), f"PID {os.getpid()}")


def test_resume_refuses_a_changed_config_or_cache(data, tmp_path):
    from stages.base import StageConfig
    from stages.train import train
    over = [f"cache={data / 'cache'}", f"out={tmp_path / 'r'}", "steps=4", "ckpt_every=2", "eval_every=100"]
    train(load_config(StageConfig, ROOT / "configs/debug/coarse.yaml", over))
    with pytest.raises(UserError, match=r"another config: dim \(32 -> 64\)"):
        train(load_config(StageConfig, ROOT / "configs/debug/coarse.yaml", over + ["dim=64", "steps=6"]), resume=True)
    other = make_cache(tmp_path / "other_cache")
    index = json.loads((other / "index.json").read_text())
    index["tokenizer_hashes"]["acoustic"] = "another"
    (other / "index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="trained on data made by"):
        train(load_config(StageConfig, ROOT / "configs/debug/coarse.yaml", over + [f"cache={other}", "steps=6"]),
              resume=True)
    check_resume({"steps": 4, "lr": 1.0, "eval_every": 5}, {"steps": 9, "lr": 1.0, "eval_every": 7}, tmp_path)
    # a field added to the code after the run began: fine at its default, refused at another value
    check_resume({"steps": 4, "lr": 1.0}, {"steps": 9, "lr": 1.0, "span": 3}, tmp_path, defaults={"span": 3})
    with pytest.raises(UserError, match=r"span \(3 -> 5\)"):
        check_resume({"steps": 4, "lr": 1.0}, {"steps": 9, "lr": 1.0, "span": 5}, tmp_path, defaults={"span": 3})


def test_leftovers_of_killed_saves_are_cleaned_and_the_newest_copy_wins(data, tmp_path):
    """A save killed between its two renames leaves OUT/last moved aside; a half-deleted old copy and a
    temporary of a dead writer are also lying there. Resume picks the newest complete copy, and removes the rest."""
    from stages.base import StageConfig
    from stages.train import train
    over = [f"cache={data / 'cache'}", f"out={tmp_path / 'r'}", "steps=4", "ckpt_every=2", "eval_every=100"]
    train(load_config(StageConfig, ROOT / "configs/debug/coarse.yaml", over), stop_after=2)
    last = tmp_path / "r" / "last"
    import shutil
    shutil.copytree(last, tmp_path / "r" / ".last.old-999999998")          # older by step? no: same step, older
    train(load_config(StageConfig, ROOT / "configs/debug/coarse.yaml", over), resume=True, stop_after=4)
    last.rename(tmp_path / "r" / ".last.old-1")                            # newest complete copy, low PID
    half = tmp_path / "r" / ".last.old-999999997"
    shutil.copytree(tmp_path / "r" / ".last.old-1", half)
    (half / "model.safetensors").unlink()                                  # half-deleted
    (tmp_path / "r" / ".last.tmp-999999996-x").mkdir()                     # a dead writer's temporary
    assert load_checkpoint(last).meta["step"] == 4                         # found by step, not by PID
    train(load_config(StageConfig, ROOT / "configs/debug/coarse.yaml", over + ["steps=6"]), resume=True)
    assert load_checkpoint(last).meta["step"] == 6
    assert sorted(p.name for p in (tmp_path / "r").iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("bad,match", [("ckpt_every=0", "ckpt_every=0 must be greater than 0"),
                                       ("lr=nan", "lr=nan must be a finite number"),
                                       ("batch_size=0", "batch_size=0 must be greater than 0"),
                                       ("steps=-5", "steps=-5 must be greater than 0"),
                                       ("ema=1.5", "ema=1.5 must be in"), ("device=tpu", "device='tpu'"),
                                       ("cond_dropout=2", "cond_dropout=2.0 must be in")])
def test_bad_values_are_one_line_errors(bad, match, data, tmp_path):
    from stages.base import StageConfig
    with pytest.raises(ConfigError, match=match.replace("(", "\\(").replace("[", "\\[")):
        load_config(StageConfig, ROOT / "configs/debug/coarse.yaml", [bad])
    if bad == "steps=-5":
        assert_clean_error(run_module(*command("stage", data, tmp_path / "x", 4), bad), "steps=-5")
        assert not (tmp_path / "x").exists()


def test_cuda_asked_for_where_there_is_none(data, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for trainer in ("stage", "mulan"):    # every trainer picks its device in the one loop (common/training.py)
        assert_clean_error(run_module(*command(trainer, data, tmp_path / trainer, 4), "device=cuda"),
                           "no CUDA device", "device=cpu")
        assert not (tmp_path / trainer / "last").exists()
    assert RunConfig(device="cuda:1").device == "cuda:1"


@pytest.mark.parametrize("damage", ["index", "missing", "short"])
def test_a_damaged_cache_stops_training_with_one_line(damage, data, tmp_path):
    import shutil

    from tests.stage_helpers import damage_cache
    shutil.copytree(data / "cache", tmp_path / "cache")
    damage_cache(tmp_path / "cache", damage)
    cmd = [c if not c.startswith("cache=") else f"cache={tmp_path / 'cache'}" for c in command("stage", data, tmp_path / "r", 4)]
    assert_clean_error(run_module(*cmd), "damaged")
    assert not (tmp_path / "r" / "last").exists()


def test_train_clips_trains_on_the_first_clips_only_and_refuses_more_than_the_cache_has(data, tmp_path):
    """A data-scaling curve trains every point from one cache: train_clips=N draws batches from the first N
    training clips, and asking for more clips than the split holds stops before any work with the fix in one line."""
    from data.tokenize import TokenCache
    from stages.base import StageConfig
    from stages.train import StageTask, batch_at

    cache = TokenCache(data / "cache")
    cfg = load_config(StageConfig, "configs/debug/coarse.yaml", [f"cache={data / 'cache'}", "train_clips=3"])
    task = StageTask(cfg, cache)
    first = cache.rows("train")[:3]
    assert list(task.rows) == list(first) and len(cache.rows("train")) > 3
    seen = set()
    for step in range(20):   # batch_at draws with replacement from the rows it is handed: only those three
        b, _ = batch_at(cache, task.rows, cfg, step, 4, train=False)
        seen |= {tuple(r.tolist()) for r in b["mulan"]}
    own = {tuple(cache.arrays["mulan"][r].astype(int).tolist()) for r in first}
    assert seen <= own and len(seen) > 1
    n = len(cache.rows("train"))
    cmd = [*command("stage", data, tmp_path / "r", 4), f"train_clips={n + 1}"]
    assert_clean_error(run_module(*cmd), f"train_clips={n + 1}", f"has {n} training clips")
    assert not (tmp_path / "r" / "last").exists()
