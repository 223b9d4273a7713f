import json

import numpy as np
import pytest
import soundfile as sf
import torch

from audio_tokenizers.acoustic import AcousticConfig, build_codec, load_acoustic, tokenizer_for
from audio_tokenizers.encodec import EncodecTokenizer, TrainableEncodec, init_weight_norm_convs
from common.checkpoint import save_checkpoint
from common.config import config_to_dict, load_config
from common.errors import AudioError
from evaluation.metrics import mel_distance, si_snr
from tests.helpers import ROOT, assert_clean_error, run_module, run_modules, sine


def debug_cfg(**kw) -> AcousticConfig:
    return load_config(AcousticConfig, ROOT / "configs/debug/acoustic.yaml", [f"{k}={v}" for k, v in kw.items()])


def published_encodec(tmp_path):
    """A tiny random EnCodec saved with save_pretrained: the same path as facebook/encodec_24khz."""
    from transformers import EncodecConfig, EncodecModel
    torch.manual_seed(0)
    cfg = EncodecConfig(num_filters=4, hidden_size=16, codebook_size=32, codebook_dim=16,
                        target_bandwidths=[1.5, 3.0, 6.0], num_lstm_layers=1, audio_channels=1)
    EncodecModel(cfg).save_pretrained(tmp_path / "encodec_tiny")
    return EncodecTokenizer.from_pretrained(tmp_path / "encodec_tiny")


def spectral_tok():
    torch.manual_seed(0)
    return tokenizer_for(build_codec(debug_cfg()))


def trained_encodec_tok():
    torch.manual_seed(0)
    return tokenizer_for(TrainableEncodec(debug_cfg(backend="encodec", encodec_filters=4, encodec_hidden=8,
                                                     encodec_ratios="[4,4,5,3]")))


@pytest.fixture(params=["spectral", "encodec_trained", "encodec_published"])
def tok(request, tmp_path):
    return {"spectral": spectral_tok, "encodec_trained": trained_encodec_tok,
            "encodec_published": lambda: published_encodec(tmp_path)}[request.param]()


@pytest.mark.parametrize("n", [24000, 24001, 12345, 100])
def test_interface_shapes_and_exact_length(tok, n):
    wav = torch.from_numpy(sine(440, n / tok.sample_rate, tok.sample_rate))[None, None].repeat(2, 1, 1)
    codes = tok.encode(wav)
    frames = max(1, -(-n // tok.hop))
    assert codes.shape == (2, tok.num_quantizers, frames) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < tok.codebook_size
    assert abs(tok.frame_rate - tok.sample_rate / tok.hop) < 1e-6
    out = tok.decode(codes, length=n)
    assert out.shape == (2, 1, n) and torch.isfinite(out).all()
    assert tok.decode(codes).shape == (2, 1, frames * tok.hop)


def test_determinism_levels_and_split(tok):
    wav = torch.from_numpy(sine(330, 1.0, tok.sample_rate))[None, None]
    a, b = tok.encode(wav), tok.encode(wav)
    assert torch.equal(a, b)
    assert torch.equal(tok.decode(a), tok.decode(b))
    for q in range(1, tok.num_quantizers + 1):
        assert tok.decode(a[:, :q], length=1000).shape == (1, 1, 1000)
    coarse, fine = tok.split(a, 2)
    assert coarse.shape[1] == 2 and fine.shape[1] == tok.num_quantizers - 2
    assert torch.equal(tok.join(coarse, fine), a)
    with pytest.raises(ValueError, match="code ids"):
        tok.decode(a + tok.codebook_size)
    with pytest.raises(ValueError, match="Q'"):
        tok.decode(torch.cat([a, a], 1))


def test_bad_input(tok):
    sr = tok.sample_rate
    assert tok.encode(torch.zeros(1, 1, 5)).shape[-1] == 1           # shorter than one frame
    assert torch.isfinite(tok.decode(tok.encode(torch.zeros(1, 1, sr)))).all()  # silence
    loud = torch.from_numpy(np.clip(sine(200, 0.5, sr, amp=4.0), -1, 1))[None, None]
    assert torch.isfinite(tok.decode(tok.encode(loud))).all()        # clipping
    nan = torch.zeros(1, 1, sr)
    nan[0, 0, 10] = float("nan")
    with pytest.raises(AudioError, match="NaN"):
        tok.encode(nan)
    stereo = torch.from_numpy(np.stack([sine(440, 0.5, sr), sine(440, 0.5, sr)]))[None]
    mono = torch.from_numpy(sine(440, 0.5, sr))[None, None]
    assert torch.equal(tok.encode(stereo), tok.encode(mono))           # downmixed
    other = torch.from_numpy(sine(440, 0.5, 16000))[None, None]         # resampled
    assert tok.encode(other, sample_rate=16000).shape[-1] == tok.encode(mono).shape[-1]


def test_weight_norm_init_keeps_the_signal():
    from transformers import EncodecConfig, EncodecModel
    torch.manual_seed(0)
    model = EncodecModel(EncodecConfig(num_filters=8, hidden_size=32, audio_channels=1))
    x = torch.randn(2, 1, 24000) * 0.1
    before = float(model.encoder(x).std().detach())
    assert init_weight_norm_convs(model.encoder) > 10
    after = float(model.encoder(x).std().detach())
    assert before < 0.07 and after > 3 * before


def test_mel_distance_and_si_snr_on_known_cases():
    sr = 24000
    x = torch.from_numpy(sine(440, 1.0, sr))[None] + 0.01 * torch.randn(1, sr)
    assert float(mel_distance(x, x, sr)) == 0.0
    # a 6 dB gain change moves every log10 mel bin by log10(2) (noise floor aside)
    assert abs(float(mel_distance(x, 2 * x, sr)) - np.log10(2)) < 0.01
    y = torch.from_numpy(sine(660, 1.0, sr))[None]
    assert float(mel_distance(x, y, sr)) > 0.5
    assert float(si_snr(3 * x, x)) > 60  # scale-invariant
    noisy = x + 0.1 * x.std() * torch.randn_like(x)
    assert abs(float(si_snr(noisy, x)) - 20.0) < 0.5


def test_debug_training_learns_resumes_and_round_trips(tmp_path):
    rows = []
    (tmp_path / "a").mkdir()
    for i, f in enumerate([220, 330, 440, 550, 660, 880]):
        sf.write(tmp_path / "a" / f"{i}.wav", sine(f, 2.0, 24000), 24000)
        rows.append(json.dumps({"audio": f"a/{i}.wav", "caption": ""}))
    (tmp_path / "m.jsonl").write_text("\n".join(rows) + "\n")
    args = ["audio_tokenizers.acoustic", "train", "--config", "configs/debug/acoustic.yaml",
            f"train_manifest={tmp_path / 'm.jsonl'}", f"valid_manifest={tmp_path / 'm.jsonl'}",
            f"out={tmp_path / 'run'}", "steps=30", "lr=3e-3"]
    proc = run_module(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "backend: spectral" in proc.stdout  # resolved config printed
    log = [json.loads(l) for l in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < 0.7 * losses[0]
    assert any("valid" in r and "mel_distance@4" in r["valid"] for r in log)
    roundtrip = ["audio_tokenizers.acoustic", "roundtrip", str(tmp_path / "a/2.wav"), str(tmp_path / "o.wav")]
    lr_changed, proc, not_a_codec, too_many = run_modules(   # side by side: none of them writes the checkpoint
        [*args[:-2], "steps=40", "lr=1e-3", "--resume"],
        [*roundtrip, "--checkpoint", str(tmp_path / "run/last"), "--levels", "2"],
        [*roundtrip[:-1], str(tmp_path / "o2.wav"), "--checkpoint", str(tmp_path / "m.jsonl")],
        [*roundtrip[:-1], str(tmp_path / "o3.wav"), "--checkpoint", str(tmp_path / "run/last"), "--levels", "9"])
    assert_clean_error(lr_changed, "lr (0.003 -> 0.001)")
    assert proc.returncode == 0, proc.stderr
    out, sr = sf.read(tmp_path / "o.wav")
    assert sr == 24000 and len(out) == 48000
    assert_clean_error(not_a_codec, "not")
    assert_clean_error(too_many, "--levels")
    assert not (tmp_path / "o2.wav").exists() and not (tmp_path / "o3.wav").exists()
    proc = run_module(*args[:-2], "steps=40", "lr=3e-3", "--resume")   # only the run length changes
    assert proc.returncode == 0 and "resumed from" in proc.stdout and "at step 30" in proc.stdout
    tok = load_acoustic(tmp_path / "run/last")
    assert tok.num_quantizers == 4


def test_wrong_kind_checkpoint_is_rejected(tmp_path):
    save_checkpoint(tmp_path / "ck", "semantic", config_to_dict(debug_cfg()), {})
    with pytest.raises(Exception, match="'semantic' checkpoint but"):
        load_acoustic(tmp_path / "ck")
