"""The tempo guess for prompts that state none (data/tempo_guess.py) and the metronome it gives the pipeline."""
import pytest
import torch

from audio_tokenizers.mulan import load_conditioner
from common.errors import CheckpointError
from data import onsets, tempo_guess
from evaluation.adherence import tempo_correct
from pipeline import GenerationOptions, Pipeline, load_parts
from stages.base import build_stage, save_stage
from tests.helpers import assert_clean_error, run_module, save_debug_parts
from tests.test_onsets import PARTS, clicks, delay_cfg


def table(bpm: list[float], emb: list[list[float]], strength: list[int]) -> dict:
    return {"embeddings": torch.tensor(emb).half(), "bpm": torch.tensor(bpm), "strength": torch.tensor(strength),
            "probes": torch.zeros(2, 2)}


def test_the_nearest_captions_vote_and_octaves_count_but_stay_near_their_median():
    slow, fast = [1.0, 0.0], [0.0, 1.0]
    t = table([70, 71, 69, 140, 180, 182], [slow, slow, slow, slow, fast, fast], [1, 1, 2, 1, 3, 3])
    bpm, level = tempo_guess.guess(t, torch.tensor([[1.0, 0.1], [0.1, 1.0]]), k=4)
    assert all(tempo_correct(float(bpm[0]), b) for b in (69, 70, 71, 140))   # 140 is 70's octave: four votes
    assert float(bpm[0]) < 105                  # the slow neighbours' scale, not 3 x 70
    assert level.tolist()[0] == 1               # the median of their beat strengths
    bpm, level = tempo_guess.guess(t, torch.tensor([[0.0, 1.0]]), k=2)
    assert tempo_correct(float(bpm[0]), 180) and tempo_correct(float(bpm[0]), 182) and level.tolist() == [3]


def test_a_clips_beat_strength_is_its_nth_strongest_frame_n_its_beats():
    levels = torch.tensor([3, 0, 0, 2, 0, 1, 0, 0, 1, 0])      # 10 frames at 10 a second: one second
    assert tempo_guess.beat_strength(levels, 60.0, 10.0) == 3    # one beat: the strongest frame
    assert tempo_guess.beat_strength(levels, 180.0, 10.0) == 1   # three beats: the third strongest


def test_the_table_is_written_into_the_mulan_folder_and_refused_after_the_weights_change(tmp_path):
    import soundfile as sf
    parts = save_debug_parts(tmp_path / "parts")
    mulan = load_conditioner(parts / "mulan")
    assert tempo_guess.load(parts / "mulan", mulan) is None                  # no table: no guess
    sf.write(tmp_path / "a.wav", clicks([0.1, 0.6, 1.1, 1.6])[0].numpy(), 24000)   # four hard attacks at 120 bpm
    hum = 0.3 * torch.sin(torch.arange(48000) / 24000 * 2 * torch.pi * 220) * torch.linspace(0.2, 1.0, 48000)
    sf.write(tmp_path / "b.wav", hum.numpy(), 24000)                                # one swelling note
    (tmp_path / "m.jsonl").write_text('{"audio": "a.wav", "caption": "a fast reel", "tempo": 120}\n'
                                      '{"audio": "b.wav", "caption": "a slow air", "tempo": 120}\n'
                                      '{"audio": "c.wav", "caption": "no tempo here"}\n')
    proc = run_module("data.tempo_guess", "--mulan", str(parts / "mulan"), "--manifest", str(tmp_path / "m.jsonl"))
    assert proc.returncode == 0 and "2 clips" in proc.stdout, proc.stderr
    t = tempo_guess.load(parts / "mulan", mulan)
    assert t["bpm"].tolist() == [120.0, 120.0] and t["embeddings"].dtype == torch.float16
    assert t["strength"].tolist()[0] == 3 and t["strength"].tolist()[1] < 3
    with torch.no_grad():
        for w in mulan.text.parameters():                                    # other weights than the table's
            w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * 0.1)
    with pytest.raises(CheckpointError, match="rebuild it"):
        tempo_guess.load(parts / "mulan", mulan)
    (tmp_path / "none.jsonl").write_text('{"audio": "c.wav", "caption": "no tempo here"}\n')
    proc = run_module("data.tempo_guess", "--mulan", str(parts / "mulan"), "--manifest", str(tmp_path / "none.jsonl"))
    assert_clean_error(proc, "no rows with both a caption and a tempo")


def test_a_prompt_without_a_bpm_gets_a_soft_metronome_at_the_guessed_tempo_and_strength(tmp_path, monkeypatch):
    parts = save_debug_parts(tmp_path / "parts")
    mulan = load_conditioner(parts / "mulan")
    tempo_guess.save(tempo_guess.build(mulan, ["a jig", "a jig again"], [150.0, 150.0], [1, 1]), parts / "mulan")
    save_stage(build_stage(delay_cfg(tmp_path, acoustic_rate=100, onset_input=True)), tmp_path / "onset_coarse")
    pipe = Pipeline(load_parts({**{k: str(parts / k) for k in PARTS}, "coarse": str(tmp_path / "onset_coarse")}))
    seen = []
    real = pipe.parts["coarse"].generate
    monkeypatch.setattr(pipe.parts["coarse"], "generate", lambda *a, **k: seen.append(k["onsets"]) or real(*a, **k))
    pipe.generate(["a jig", "a jig at 60 bpm"], 1.0, options=GenerationOptions(seed=0))
    got = torch.cat(seen, 1)
    assert torch.nonzero(got[0] == 1).ravel().tolist() == [0, 40, 80]      # 150 bpm guessed, the neighbours' level 1
    assert torch.nonzero(got[1] == 3).ravel().tolist() == [0]              # a stated bpm wins, with a hard click
    assert set(got[0].unique().tolist()) == {0, 1} and pipe.guessed == {"a jig": 150.0}
    for opts, want in ((GenerationOptions(seed=0, metronome_bpm=100, metronome_level=3), [0, 60]),
                       (GenerationOptions(seed=0, guess_tempo=False, metronome_level=3), [])):
        seen.clear()
        pipe.generate(["a jig"], 1.0, options=opts)
        got = torch.cat(seen, 1)[0]
        assert torch.nonzero(got == 3).ravel().tolist() == want
    assert (got == onsets.NOT_GIVEN).all()                                 # no guess, no stated bpm: not given


def test_a_metronome_bpm_out_of_range_is_refused_before_loading(tmp_path):
    proc = run_module("pipeline", "--text", "a jig", "--metronome-bpm", "5", "--out", str(tmp_path / "a.wav"))
    assert_clean_error(proc, "--metronome-bpm must be between 20 and 400")
    assert not (tmp_path / "a.wav").exists()
