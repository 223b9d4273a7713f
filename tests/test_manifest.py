import json

import numpy as np
import pytest
import soundfile as sf

from common.errors import UserError
from data.dataset import ClipDataset
from data.manifest import build_manifest, iter_audio, read_manifest, read_prompts, SkipCounter, write_jsonl
from tests.helpers import assert_clean_error, run_module, sine


@pytest.fixture
def music_dir(tmp_path):
    d = tmp_path / "music"
    (d / "sub").mkdir(parents=True)
    sf.write(d / "abc123.wav", sine(440, 1.0, 44100), 44100)
    sf.write(d / "sub" / "tune.flac", sine(660, 1.5, 24000), 24000)
    sf.write(d / "song.ogg", sine(330, 1.0, 32000), 32000)
    (d / "song.txt").write_text("an ogg song\n")
    (d / "broken.wav").write_bytes(b"RIFF....garbage")
    sf.write(d / "silent.wav", np.zeros(8000, np.float32), 16000)
    sf.write(d / "empty.wav", np.zeros(0, np.float32), 16000)
    return d


def test_folder_with_musiccaps_csv_becomes_a_manifest(music_dir, tmp_path):
    csv = tmp_path / "mc.csv"
    csv.write_text("ytid,start_s,end_s,caption\nabc123,0,10,\"a sine, played low\"\nzzz,0,10,unused\n")
    n, skips = build_manifest(music_dir, tmp_path / "m.jsonl", csv)
    assert n == 3 and skips.total == 3 and dict(skips.counts) == {"unreadable": 1, "silent": 1, "empty": 1}
    rows = read_manifest(tmp_path / "m.jsonl")
    caps = {r["audio"].split("/")[-1]: r["caption"] for r in rows}
    assert caps == {"abc123.wav": "a sine, played low", "song.ogg": "an ogg song", "tune.flac": ""}
    assert all(r["audio"].startswith("/") for r in rows)  # resolved against the manifest folder


def test_jsonl_captions(music_dir, tmp_path):
    caps = tmp_path / "caps.jsonl"
    caps.write_text(json.dumps({"file": "tune.flac", "caption": "a flac tune"}) + "\n")
    build_manifest(music_dir, tmp_path / "m.jsonl", caps)
    rows = {r["audio"].split("/")[-1]: r for r in read_manifest(tmp_path / "m.jsonl")}
    assert rows["tune.flac"]["caption"] == "a flac tune" and rows["tune.flac"]["duration"] == 1.5


def test_iteration_skips_and_counts_broken_files(music_dir):
    rows = [{"audio": str(p)} for p in sorted(music_dir.rglob("*.*")) if p.suffix != ".txt"]
    skips = SkipCounter()
    good = [row for row, wav in iter_audio(rows, 24000, skips)]
    assert len(good) == 3 and skips.total == 3
    assert skips.summary().startswith("skipped 3 files (1 empty, 1 silent, 1 unreadable)")


def test_clip_dataset_replaces_broken_items(music_dir):
    rows = [{"audio": str(music_dir / n)} for n in ["broken.wav", "abc123.wav", "silent.wav"]]
    ds = ClipDataset(rows, 24000, 12000, random_crop=False)
    x = ds[0]
    assert x.shape == (1, 12000) and abs(float(x.abs().max()) - 0.5) < 0.01
    ds[2]  # silent -> wraps round to the broken one (known bad) -> the good one
    assert ds.skips.total == 2


def test_manifest_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_manifest(tmp_path / "none.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"audio": "a.wav"}\n{oops\n')
    with pytest.raises(UserError, match="bad.jsonl:2 is not valid JSON"):
        read_manifest(tmp_path / "bad.jsonl")
    write_jsonl(tmp_path / "noaudio.jsonl", [{"caption": "x"}])
    with pytest.raises(UserError, match='lacks the "audio" field'):
        read_manifest(tmp_path / "noaudio.jsonl")


def test_prompts_read_from_manifests_metadata_and_text(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"audio": "a.wav", "caption": "a harp"}\n\n{"audio": "b.wav", "caption": " "}\n')
    rows = read_prompts(tmp_path / "m.jsonl")
    assert [r["caption"] for r in rows] == ["a harp"] and rows[0]["audio"] == str((tmp_path / "a.wav").resolve())
    (tmp_path / "p.jsonl").write_text('{"caption": "fast drums", "instrument_label": "drums"}\n')
    assert read_prompts(tmp_path / "p.jsonl") == [{"caption": "fast drums", "instrument_label": "drums"}]
    (tmp_path / "p.txt").write_text("a slow cello\n\n  a bright piano \n")
    assert [r["caption"] for r in read_prompts(tmp_path / "p.txt")] == ["a slow cello", "a bright piano"]
    (tmp_path / "bad.jsonl").write_text('{"caption": "ok"}\n{"caption": "no end"\n')
    with pytest.raises(UserError, match="bad.jsonl:2 is not valid JSON"):
        read_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "list.jsonl").write_text('["a harp"]\n')
    with pytest.raises(UserError, match="list.jsonl:1 is not a JSON object"):
        read_prompts(tmp_path / "list.jsonl")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(UserError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(UserError, match="not found"):
        read_prompts(tmp_path / "none.jsonl")


def test_cli_builds_and_reports(music_dir, tmp_path):
    proc = run_module("data.manifest", "--audio-dir", str(music_dir), "--out", str(tmp_path / "m.jsonl"))
    assert proc.returncode == 0, proc.stderr
    assert "wrote 3 clips" in proc.stdout and "skipped 3 files" in proc.stdout
    assert_clean_error(run_module("data.manifest", "--audio-dir", str(tmp_path / "nope"), "--out", "x.jsonl"),
                       "not found")
