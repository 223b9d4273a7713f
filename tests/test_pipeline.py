import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from common.config import load_config
from common.errors import run_cli
from pipeline import Pipeline, load_parts
from stages.base import StageConfig, build_stage, save_stage
from tests.helpers import ROOT, save_debug_parts, sine


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Debug versions of all six parts, saved as checkpoints that fit together."""
    return save_debug_parts(tmp_path_factory.mktemp("parts"))


def stage_args(d, **swap):
    names = ("mulan", "semantic_tokenizer", "acoustic", "semantic", "coarse", "fine")
    return [x for n in names for x in ("--stage", f"{n}={swap.get(n, d / n)}")]


def cli(monkeypatch, capsys, *args):
    import pipeline_cli
    monkeypatch.setattr(sys, "argv", ["pipeline.py", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        run_cli(pipeline_cli.main)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_end_to_end_length_rate_and_seed(parts, tmp_path, monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "--text", "calm piano", "--duration", "2.5", "--seed", 1,
                         "--out", tmp_path / "a.wav", "--plot", *stage_args(parts))
    assert code == 0, err
    a, sr = sf.read(tmp_path / "a.wav")
    assert sr == 24000 and len(a) == int(2.5 * 24000)
    # the same seed makes the same clip (the untrained debug codec decodes to near-silence, so compare what the
    # stages generated too)
    pipe = Pipeline(load_parts({k: str(parts / k) for k in ("mulan", "semantic_tokenizer", "acoustic",
                                                             "semantic", "coarse", "fine")}))
    codes = []
    for seed in (1, 1, 2):
        from pipeline import GenerationOptions
        wav = pipe.generate(["calm piano"], 2.5, options=GenerationOptions(seed=seed))
        codes.append(pipe.last_codes["acoustic"])
        if len(codes) == 1:   # the command line's file, byte for byte
            from data.audio import write_wav
            write_wav(tmp_path / "b.wav", wav[0, 0].numpy(), pipe.sample_rate)
            assert (tmp_path / "a.wav").read_bytes() == (tmp_path / "b.wav").read_bytes()
    assert torch.equal(codes[0], codes[1]) and not torch.equal(codes[0], codes[2])
    assert codes[0].shape == (1, 4, 252)  # ceil(2.5 s x 25 Hz) = 63 semantic frames x 4
    from pipeline_cli import parse_knobs   # a stage's own guidance overrides the global one
    (stage, key, value), = parse_knobs(["coarse.guidance=1"])
    s = pipe._sampling(GenerationOptions(guidance=4.0, **{stage: {key: value}}))
    assert (s["semantic"].guidance, s["coarse"].guidance, s["fine"].guidance) == (4.0, 1, 1.0)
    # a checkpoint may carry its own defaults (export --sampling), between the kind's and the caller's
    from common.checkpoint import export, sampling_meta
    from stages.base import load_stage
    pipe.parts["semantic"] = load_stage(export(parts / "semantic", tmp_path / "sem",
                                               meta={"sampling": sampling_meta(["temperature=0.5", "top_k=7"])}))
    s = pipe._sampling(GenerationOptions(semantic={"top_k": 3}))
    assert (s["semantic"].temperature, s["semantic"].top_k, s["coarse"].temperature) == (0.5, 3, 0.95)
    from tests.helpers import assert_clean_error, run_module
    assert_clean_error(run_module("common.checkpoint", "export", str(parts / "semantic"), str(tmp_path / "s2"),
                                  "--sampling", "temprature=0.5"), "temprature")
    assert not (tmp_path / "s2").exists()
    assert (tmp_path / "a.png").stat().st_size > 1000
    assert "generated in" in out and "semantic" in out


def test_long_story_continuation_rerank_and_batch(parts, tmp_path, monkeypatch, capsys):
    pipe = Pipeline(load_parts({k: str(parts / k) for k in ("mulan", "semantic_tokenizer", "acoustic",
                                                             "semantic", "coarse", "fine")}))
    wav = pipe.generate(["fast drums"], duration=3.3)  # > 3 training windows of 1 s
    assert wav.shape == (1, 1, int(3.3 * 24000))
    story = pipe.generate(None, 2.0, story=[("calm piano", 0.0), ("fast drums", 1.0)])
    assert story.shape == (1, 1, 48000)
    prompt = torch.from_numpy(sine(440, 1.0, 24000))[None, None]
    cont = pipe.generate(["slow strings"], duration=1.5, prompt_audio=prompt[..., :24500])  # cut to 24000
    assert cont.shape == (1, 1, 24000 + 36000)
    assert torch.equal(pipe.last_codes["acoustic"][..., :100], pipe.codec.encode(prompt))  # starts with the prompt
    sf.write(tmp_path / "p.wav", sine(330, 1.0, 24000), 24000)
    code, out, err = cli(monkeypatch, capsys, "--text", "calm piano", "fast drums", "--batch", "2", "--rerank", "2",
                         "--duration", "1", "--out", tmp_path / "x.wav", "--prompt-audio", tmp_path / "p.wav",
                         *stage_args(parts))
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.glob("x_*.wav")) == ["x_0_0.wav", "x_0_1.wav", "x_1_0.wav", "x_1_1.wav"]
    code, _, err = cli(monkeypatch, capsys, "--text", "piano", "--rerank", "2", "--rerank-tempo", "-1",
                       "--out", tmp_path / "y.wav", *stage_args(parts))
    assert code != 0 and "--rerank-tempo must be at least 0" in err and not (tmp_path / "y.wav").exists()


def test_parts_that_do_not_fit_are_named(parts, tmp_path, monkeypatch, capsys):
    cfg = load_config(StageConfig, ROOT / "configs/debug/coarse.yaml", ["acoustic_rate=100", "acoustic_codebook=64"])
    save_stage(build_stage(cfg), tmp_path / "coarse64")
    code, _, err = cli(monkeypatch, capsys, "--text", "x", "--out", tmp_path / "o.wav",
                       *stage_args(parts, coarse=tmp_path / "coarse64"))
    assert code == 2 and "the coarse stage and the acoustic part disagree on acoustic codebook size: 64 vs 32" in err
    assert not (tmp_path / "o.wav").exists()


def test_stage_trained_on_another_semantic_tokenizer_is_refused(parts, tmp_path, monkeypatch, capsys):
    cfg = load_config(StageConfig, ROOT / "configs/debug/semantic.yaml", ["semantic_tokens=0123456789abcdef"])
    save_stage(build_stage(cfg), tmp_path / "semantic_other")
    code, _, err = cli(monkeypatch, capsys, "--text", "x", "--out", tmp_path / "o.wav",
                       *stage_args(parts, semantic=tmp_path / "semantic_other"))
    assert code == 2 and "the semantic stage was trained on the ids of semantic tokenizer 0123456789abcdef" in err
    assert not (tmp_path / "o.wav").exists()


@pytest.mark.parametrize("case", ["empty", "zero", "long", "stage_name", "missing", "truncated", "wrong_kind",
                                  "bad_prompt", "silent_prompt", "unwritable", "story", "top_p_zero", "guidance_nan",
                                  "negative_temperature", "zero_steps", "semantic_from_bad", "two_sources",
                                  "out_is_folder", "story_after_end", "config_null", "missing_tensor", "wrong_dim",
                                  "bad_knob", "knob_type"])
def test_bad_input_is_one_line_exit_2_and_no_wav(case, parts, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o.wav"
    args = ["--text", "calm piano", "--duration", "1", "--out", out]
    swap = {}
    if case == "empty":
        args[1] = "  "
    elif case == "zero":
        args[3] = "0"
    elif case == "long":
        args[3] = "100000"
    elif case == "stage_name":
        args += ["--stage", "bass=x"]
    elif case == "missing":
        swap["fine"] = tmp_path / "nowhere"
    elif case == "truncated":
        import shutil
        shutil.copytree(parts / "fine", tmp_path / "fine")
        w = tmp_path / "fine" / "model.safetensors"
        w.write_bytes(w.read_bytes()[:200])
        swap["fine"] = tmp_path / "fine"
    elif case == "wrong_kind":
        swap["coarse"] = parts / "semantic"
    elif case == "bad_prompt":
        (tmp_path / "p.wav").write_bytes(b"nope")
        args += ["--prompt-audio", tmp_path / "p.wav"]
    elif case == "silent_prompt":
        sf.write(tmp_path / "p.wav", np.zeros(24000, np.float32), 24000)
        args += ["--prompt-audio", tmp_path / "p.wav"]
    elif case == "unwritable":
        args[5] = tmp_path / "no" / "dir" / "o.wav"
    elif case == "story":
        args = ["--story", "calm:3", "drums:0", "--out", out]
    elif case in ("top_p_zero", "guidance_nan", "negative_temperature", "zero_steps"):
        args += {"top_p_zero": ["--coarse-top-p", "0"], "guidance_nan": ["--guidance", "nan"],
                 "negative_temperature": ["--semantic-temperature", "-1"], "zero_steps": ["--fine-steps", "4", "0"]}[case]
    elif case == "semantic_from_bad":
        (tmp_path / "s.wav").write_bytes(b"nope")
        args += ["--semantic-from", tmp_path / "s.wav"]
    elif case in ("bad_knob", "knob_type"):
        args += ["--knob", "coarse.nope=1" if case == "bad_knob" else "coarse.candidates=many"]
    elif case == "out_is_folder":
        (tmp_path / "songs").mkdir()
        args[5] = tmp_path / "songs"
    elif case == "story_after_end":
        args = ["--story", "calm:0", "drums:1.5", "--duration", "1", "--out", out]
    elif case in ("config_null", "missing_tensor", "wrong_dim"):
        import json
        import shutil

        from safetensors.torch import load_file, save_file
        shutil.copytree(parts / "coarse", tmp_path / "coarse")
        header, weights = tmp_path / "coarse" / "config.json", tmp_path / "coarse" / "model.safetensors"
        if case == "config_null":
            header.write_text("null")
        elif case == "missing_tensor":
            w = load_file(str(weights))
            save_file({k: v for k, v in w.items() if not k.startswith("blocks.0.qkv")}, str(weights))
        else:
            h = json.loads(header.read_text())
            h["config"]["dim"] = 64
            header.write_text(json.dumps(h))
        swap["coarse"] = tmp_path / "coarse"
    elif case == "two_sources":
        sf.write(tmp_path / "p.wav", np.sin(np.arange(24000) / 10).astype(np.float32) * 0.3, 24000)
        args += ["--prompt-audio", tmp_path / "p.wav", "--semantic-from", tmp_path / "p.wav"]
    code, stdout, err = cli(monkeypatch, capsys, *args, *[a for a in stage_args(parts, **swap)
                                                          if not (case == "stage_name" and False)])
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err and not out.exists() and not list(tmp_path.glob("*.wav.tmp"))


def test_pipeline_benchmark_times_chains_side_by_side(parts, tmp_path):
    from evaluation.bench import bench_pipeline
    for role in ("coarse", "fine"):
        cfg = load_config(StageConfig, ROOT / "configs/debug/delay.yaml", [f"role={role}", "acoustic_rate=100"])
        save_stage(build_stage(cfg), tmp_path / f"delay_{role}")
    flat = {k: str(parts / k) for k in ("mulan", "semantic_tokenizer", "acoustic", "semantic", "coarse", "fine")}
    delay = {**flat, "coarse": str(tmp_path / "delay_coarse"), "fine": str(tmp_path / "delay_fine")}
    res = bench_pipeline({"flat": flat, "delay": delay}, [1.0, 2.0], str(tmp_path), repeats=2)
    for name in ("flat", "delay"):
        assert res[name]["wall_s@1s"] > 0 and len(res[name]["all_wall_s@2s"]) == 2
        assert set(res[name]["stages@2s"]) == {"mulan", "semantic", "coarse", "fine", "decode"}
        assert sf.read(tmp_path / f"bench_{name}_2s.wav")[0].shape == (48000,)
    assert res["delay"]["speedup_over_flat@2s"] == round(res["flat"]["wall_s@2s"] / res["delay"]["wall_s@2s"], 2)
    assert res["peak_rss_mb"] > 100


def test_pipeline_benchmark_variant_errors_are_one_line(tmp_path):
    from tests.helpers import assert_clean_error, run_modules
    bench = ["evaluation.bench", "pipeline", "--variant"]
    colon, twice, missing = run_modules([*bench, "nocolon"], [*bench, "a:", "--variant", "a:"],
                                        [*bench, "a:coarse=" + str(tmp_path / "none")])
    assert_clean_error(colon, "--variant", "NAME:")
    assert_clean_error(twice, "own name")
    assert_clean_error(missing, "none")


def test_int8_flag_quantizes_the_three_stages(parts, tmp_path, monkeypatch, capsys):
    from stages.quantize import Int8Linear
    pipe = Pipeline(load_parts({k: str(parts / k) for k in ("mulan", "semantic_tokenizer", "acoustic",
                                                             "semantic", "coarse", "fine")}), int8=True)
    for name in ("semantic", "coarse", "fine"):
        assert any(isinstance(m, Int8Linear) for m in pipe.parts[name].model.modules()), name
    code, out, err = cli(monkeypatch, capsys, "--text", "calm piano", "--duration", "1", "--int8",
                         "--out", tmp_path / "q.wav", *stage_args(parts))
    assert code == 0, err
    assert sf.read(tmp_path / "q.wav")[0].shape == (24000,)


def test_shipped_models_fit_together_and_generate():
    """The README's main command in miniature: the six models in pretrained/ load, fit and make audio."""
    pipe = Pipeline.from_pretrained(ROOT / "pretrained")
    wav = pipe.generate(["a calm solo piano piece in C major"], duration=1.0)
    assert wav.shape == (1, 1, pipe.sample_rate) and pipe.sample_rate == 24000
    assert torch.isfinite(wav).all() and 0.001 < float(wav.abs().max()) <= 1.0


def test_progress_bars_quiet_and_where_an_interrupt_landed(parts, tmp_path, monkeypatch, capsys):
    code, _, err = cli(monkeypatch, capsys, "--text", "calm", "--duration", "1", "--out", tmp_path / "a.wav",
                       *stage_args(parts))
    assert code == 0 and "semantic: 100%" in err and "coarse: 100%" in err and "s of audio" in err
    code, _, err = cli(monkeypatch, capsys, "--text", "calm", "--duration", "1", "--out", tmp_path / "b.wav", "--quiet",
                       *stage_args(parts))
    assert code == 0 and "%" not in err
    from stages.coarse import CoarseStage

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(CoarseStage, "generate", interrupted)
    code, _, err = cli(monkeypatch, capsys, "--text", "calm", "--duration", "1", "--out", tmp_path / "c.wav", "--quiet",
                       *stage_args(parts))
    assert code == 130 and "interrupted in the coarse stage; nothing was written" in err
    assert not (tmp_path / "c.wav").exists()


def test_files_honour_the_umask(parts, tmp_path, monkeypatch, capsys):
    import os
    old = os.umask(0o022)
    try:
        code, _, err = cli(monkeypatch, capsys, "--text", "calm", "--duration", "1", "--out", tmp_path / "a.wav",
                           "--quiet", *stage_args(parts))
        cfg = load_config(StageConfig, ROOT / "configs/debug/coarse.yaml")
        save_stage(build_stage(cfg), tmp_path / "ck")
    finally:
        os.umask(old)
    assert code == 0, err
    assert oct((tmp_path / "a.wav").stat().st_mode & 0o777) == "0o644"
    assert oct((tmp_path / "ck").stat().st_mode & 0o777) == "0o755"
    assert oct((tmp_path / "ck" / "model.safetensors").stat().st_mode & 0o777) == "0o644"
