"""The web demo, end to end in a real browser (Debian's headless Chromium; ./install.sh --dev installs it)."""
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.helpers import ROOT, save_debug_parts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    parts = save_debug_parts(tmp_path_factory.mktemp("demo_parts"))
    port = free_port()
    stages = [x for n in ("mulan", "semantic_tokenizer", "acoustic", "semantic", "coarse", "fine")
              for x in ("--stage", f"{n}={parts / n}")]
    proc = subprocess.Popen([sys.executable, "-m", "demo", "--port", str(port), *stages], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"the demo exited: {proc.stdout.read()[-2000:]}")
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_demo_plays_what_was_asked_for_in_a_real_browser(server, tmp_path):
    from evaluation.browser_check import check_page
    played = check_page(server, "a calm solo piano piece", 3.5, screenshot=tmp_path / "demo.png")
    assert abs(played - 3.5) < 0.05
    assert (tmp_path / "demo.png").stat().st_size > 20_000


def test_demo_binds_to_localhost_by_default():
    from demo import Demo, parse_args
    assert parse_args([]).host == "127.0.0.1" and parse_args(["--host", "0.0.0.0"]).host == "0.0.0.0"
    with pytest.raises(Exception, match="describe the music first"):
        Demo({}).generate("  ", 1, 0, 3, False, "", "", "", {}, None, None)


def test_demo_follows_a_melody_only_with_a_stage_that_reads_one(tmp_path):
    import soundfile as sf

    from common.config import load_config
    from common.errors import UserError
    from demo import STAGES, Demo
    from pipeline import PARTS
    from stages.base import StageConfig, build_stage, save_stage
    from tests.helpers import sine
    parts = save_debug_parts(tmp_path / "parts")
    cfg = load_config(StageConfig, ROOT / "configs/debug/semantic.yaml", ["acoustic_rate=100", "melody_input=true"])
    save_stage(build_stage(cfg), tmp_path / "semantic_melody")
    sf.write(tmp_path / "tune.wav", sine(440.0, 2.0, 24000), 24000)
    paths = {n: str(parts / n) for n in PARTS}
    demo, knobs = Demo(paths), {s: {} for s in STAGES}
    (sr, audio), png, timings = demo.generate("a tune", 1.0, 0, 3, False, str(tmp_path / "semantic_melody"),
                                              paths["coarse"], paths["fine"], knobs, None, None, str(tmp_path / "tune.wav"))
    assert sr == 24000 and audio.shape == (24000,) and "semantic" in timings
    with pytest.raises(UserError, match="without a melody input"):
        demo.generate("a tune", 1.0, 0, 3, False, paths["semantic"], paths["coarse"], paths["fine"], knobs, None, None,
                      str(tmp_path / "tune.wav"))
