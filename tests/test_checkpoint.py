import json
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from common.checkpoint import load_checkpoint, read_header, rng_state, save_checkpoint, set_rng_state
from common.errors import CheckpointError
from tests.helpers import ROOT


def tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def test_round_trip_weights_config_and_kind(tmp_path):
    model = tiny_model()
    save_checkpoint(tmp_path / "ck", "toy", {"dim": 8, "levels": [1, 2]}, model.state_dict(), meta={"step": 3})
    ck = load_checkpoint(tmp_path / "ck", kind="toy")
    assert ck.kind == "toy" and ck.config == {"dim": 8, "levels": [1, 2]} and ck.meta == {"step": 3}
    for k, v in model.state_dict().items():
        assert torch.equal(ck.state_dict[k], v)
    header = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert header["format_version"] == 1 and header["kind"] == "toy"


def test_fp16_storage(tmp_path):
    model = tiny_model()
    save_checkpoint(tmp_path / "ck", "toy", {}, model.state_dict(), dtype=torch.float16)
    sd = load_checkpoint(tmp_path / "ck").state_dict
    assert sd["0.weight"].dtype == torch.float16
    assert torch.allclose(sd["0.weight"].float(), model[0].weight, atol=1e-3)


def test_wrong_kind_and_version_are_rejected(tmp_path):
    save_checkpoint(tmp_path / "ck", "coarse", {}, tiny_model().state_dict())
    with pytest.raises(CheckpointError, match="is a 'coarse' checkpoint but a 'semantic' checkpoint is needed"):
        load_checkpoint(tmp_path / "ck", kind="semantic")
    header = json.loads((tmp_path / "ck" / "config.json").read_text())
    header["format_version"] = 99
    (tmp_path / "ck" / "config.json").write_text(json.dumps(header))
    with pytest.raises(CheckpointError, match="format_version 99"):
        load_checkpoint(tmp_path / "ck")


def test_missing_truncated_and_foreign_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        read_header(tmp_path / "empty")
    save_checkpoint(tmp_path / "ck", "toy", {}, tiny_model().state_dict())
    weights = tmp_path / "ck" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "ck")
    # a pickle is never unpickled: it is simply not a safetensors file
    torch.save(tiny_model().state_dict(), weights)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "ck")


def test_train_state_round_trip_resumes_identically(tmp_path):
    def run(model, opt, sched, steps):
        out = []
        for _ in range(steps):
            x = torch.randn(16, 4) + float(np.random.rand()) + random.random()
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            out.append(loss.item())
        return out

    def fresh():
        model = tiny_model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, opt, torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)

    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    model, opt, sched = fresh()
    straight = run(model, opt, sched, 6)

    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    model, opt, sched = fresh()
    first = run(model, opt, sched, 3)
    save_checkpoint(tmp_path / "ck", "toy", {}, model.state_dict(), train_state={
        "step": 3, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng_state()})
    torch.manual_seed(123), np.random.seed(123), random.seed(123)  # clobber the RNGs
    ck = load_checkpoint(tmp_path / "ck", with_train_state=True)
    model, opt, sched = fresh()
    model.load_state_dict(ck.state_dict)
    opt.load_state_dict(ck.train_state["optimizer"])
    sched.load_state_dict(ck.train_state["scheduler"])
    set_rng_state(ck.train_state["rng"])
    assert ck.train_state["step"] == 3
    assert first + run(model, opt, sched, 3) == straight


WRITER = """
import sys, torch
sys.path.insert(0, {root!r})
from common.checkpoint import save_checkpoint
big = {{"w": torch.full((64, 1024, 1024), 2.0)}}   # 256 MB: the kill lands mid-write
print("go", flush=True)
while True:
    save_checkpoint({path!r}, "toy", {{"version": 2}}, big)
"""


def test_killed_write_leaves_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "ck"
    save_checkpoint(path, "toy", {"version": 1}, {"w": torch.ones(3)})
    proc = subprocess.Popen([sys.executable, "-c", WRITER.format(root=str(ROOT), path=str(path))],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "go"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ck = load_checkpoint(path)  # either the old one or a complete new one, never a mix
    if ck.config["version"] == 1:
        assert torch.equal(ck.state_dict["w"], torch.ones(3))
    else:
        assert ck.state_dict["w"].shape == (64, 1024, 1024) and float(ck.state_dict["w"][0, 0, 0]) == 2.0
    save_checkpoint(path, "toy", {"version": 3}, {"w": torch.zeros(2)})  # leftovers don't block saving
    assert load_checkpoint(path).config["version"] == 3


def test_export_casts_to_fp16_and_drops_train_state(tmp_path):
    from tests.helpers import run_module
    model = tiny_model()
    save_checkpoint(tmp_path / "run", "toy", {"a": 1}, model.state_dict(), train_state={"step": 1})
    proc = run_module("common.checkpoint", "export", str(tmp_path / "run"), str(tmp_path / "ship"))
    assert proc.returncode == 0, proc.stderr
    ck = load_checkpoint(tmp_path / "ship", with_train_state=True)
    assert ck.train_state is None and ck.config == {"a": 1} and ck.state_dict["0.weight"].dtype == torch.float16
    assert not (tmp_path / "ship" / "train_state.json").exists()
    # exporting over a shipped model keeps its card and replaces only the checkpoint files
    (tmp_path / "ship" / "CARD.md").write_text("# card\n")
    proc = run_module("common.checkpoint", "export", str(tmp_path / "run"), str(tmp_path / "ship"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ship" / "CARD.md").read_text() == "# card\n"
    assert sorted(f.name for f in (tmp_path / "ship").iterdir()) == ["CARD.md", "config.json", "model.safetensors"]
