"""Reading, resampling, cropping and writing audio.

Audio inside the project is float32 in [-1, 1]: one clip is `[N]` (numpy) and a batch is
`[B, 1, N]` (torch). Files are read with soundfile (WAV, FLAC, OGG and whatever libsndfile
supports), downmixed to mono and resampled with a band-limited polyphase filter.
"""
from __future__ import annotations

import os
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile as sf

from common.errors import AudioError, umask_mode

SILENCE_DBFS = -60.0


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Band-limited resampling of `x` [..., N] along the last axis (scipy polyphase, Kaiser window)."""
    if sr_in == sr_out:
        return x
    from scipy.signal import resample_poly   # here, not at the top: scipy.signal costs every command ~1 s to import
    ratio = Fraction(sr_out, sr_in)
    y = resample_poly(x, ratio.numerator, ratio.denominator, axis=-1, window=("kaiser", 8.0))
    return y.astype(np.float32)


def rms_dbfs(x: np.ndarray) -> float:
    """Root-mean-square level in dB relative to full scale (a full-scale sine is -3 dBFS)."""
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0
    return 20 * np.log10(max(rms, 1e-10))


def load_audio(path: str | Path, sample_rate: int, allow_silent: bool = False) -> np.ndarray:
    """Read a file as mono float32 [N] at `sample_rate`.

    Raises AudioError (with the reason) for unreadable, empty, NaN-containing or, unless
    `allow_silent`, silent files, so that callers can skip and count them.
    """
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as e:
        raise AudioError(f"unreadable: {path} ({str(e).splitlines()[0]})") from None
    if data.shape[0] == 0:
        raise AudioError(f"empty: {path} has no samples")
    mono = data.mean(axis=1)
    if not np.all(np.isfinite(mono)):
        raise AudioError(f"nan: {path} contains NaN or infinite samples")
    if not allow_silent and rms_dbfs(mono) < SILENCE_DBFS:
        raise AudioError(f"silent: {path} is below {SILENCE_DBFS:.0f} dBFS")
    return resample(mono, sr, sample_rate)


def crop_or_pad(x: np.ndarray, length: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Exactly `length` samples: a random crop if `rng` is given (else from the start),
    zero padding at the end if too short."""
    if len(x) > length:
        start = int(rng.integers(0, len(x) - length + 1)) if rng is not None else 0
        return x[start:start + length]
    if len(x) < length:
        return np.pad(x, (0, length - len(x)))
    return x


def write_wav(path: str | Path, wav: np.ndarray, sample_rate: int) -> None:
    """Write mono float audio [N] as 16-bit WAV atomically (temp file + os.replace)."""
    path = Path(path)
    wav = np.clip(np.nan_to_num(np.asarray(wav, dtype=np.float32).reshape(-1)), -1.0, 1.0)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    try:
        sf.write(tmp, wav, sample_rate, subtype="PCM_16", format="WAV")
        os.chmod(tmp, umask_mode())   # mkstemp made it 0600; a WAV is for others to open too
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
