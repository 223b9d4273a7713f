import numpy as np
import pytest
import soundfile as sf

from common.errors import AudioError
from data.audio import crop_or_pad, load_audio, resample, rms_dbfs, write_wav
from tests.helpers import sine


def peak_frequency(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(spec)])


@pytest.mark.parametrize("sr_in", [44100, 48000, 16000, 22050, 32000])
def test_resampled_sine_keeps_its_frequency_and_level(sr_in):
    x = sine(1000.0, 2.0, sr_in)
    y = resample(x, sr_in, 24000)
    assert len(y) == 48000
    assert abs(peak_frequency(y, 24000) - 1000.0) < 1.0
    assert abs(rms_dbfs(y[2000:-2000]) - rms_dbfs(x)) < 0.1


def test_resampling_removes_content_above_the_new_nyquist():
    x = sine(15000.0, 1.0, 48000)  # above 12 kHz: must not alias into the band
    y = resample(x, 48000, 24000)
    assert rms_dbfs(y[1000:-1000]) < -60


def test_load_downmixes_stereo_and_resamples(tmp_path):
    left, right = sine(440, 1.0, 48000), sine(440, 1.0, 48000, amp=0.1)
    sf.write(tmp_path / "s.flac", np.stack([left, right], 1), 48000)
    y = load_audio(tmp_path / "s.flac", 24000)
    assert y.shape == (24000,) and y.dtype == np.float32
    assert abs(np.max(np.abs(y[1000:-1000])) - 0.3) < 0.01  # mean of 0.5 and 0.1


def test_load_rejects_broken_files_with_a_reason(tmp_path):
    (tmp_path / "junk.wav").write_bytes(b"not audio at all")
    sf.write(tmp_path / "empty.wav", np.zeros((0,), np.float32), 24000)
    sf.write(tmp_path / "silent.wav", np.zeros(24000, np.float32), 24000)
    nan = sine(440, 0.5, 24000)
    nan[100] = np.nan
    sf.write(tmp_path / "nan.wav", nan, 24000, subtype="FLOAT")
    for name, reason in [("junk", "unreadable"), ("empty", "empty"), ("silent", "silent"), ("nan", "nan"),
                         ("missing", "unreadable")]:
        with pytest.raises(AudioError, match=f"^{reason}:"):
            load_audio(tmp_path / f"{name}.wav", 24000)
    assert load_audio(tmp_path / "silent.wav", 24000, allow_silent=True).shape == (24000,)


def test_crop_or_pad():
    x = np.arange(10, dtype=np.float32)
    assert np.array_equal(crop_or_pad(x, 4), x[:4])
    assert np.array_equal(crop_or_pad(x, 12), np.r_[x, 0, 0])
    c = crop_or_pad(x, 4, np.random.default_rng(0))
    assert len(c) == 4 and np.array_equal(c, np.arange(c[0], c[0] + 4))


def test_write_wav_round_trip_and_clipping(tmp_path):
    x = sine(440, 0.5, 24000) * 3  # clipped to [-1, 1]
    write_wav(tmp_path / "a.wav", x, 24000)
    y, sr = sf.read(tmp_path / "a.wav")
    assert sr == 24000 and len(y) == len(x) and np.max(np.abs(y)) <= 1.0
    assert not list(tmp_path.glob(".*tmp"))
