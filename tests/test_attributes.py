"""Tempo and key as attribute ids (data/attributes.py): read from words, learned by the stages that take them
(attribute_input), and handed on by the pipeline."""
import json
import math

import numpy as np
import pytest
import torch

from common.config import load_config
from common.errors import ConfigError, UserError
from data import attributes
from data.attributes import bpm_in_text
from data.tokenize import TokenCache
from stages.base import StageConfig, build_stage, load_stage, save_stage
from stages.delay import DelayStage
from stages.sampling import Sampling, beat_bias, cfg_mix
from stages.train import check_init, train, warm_start
from tests.helpers import ROOT, assert_clean_error, run_module
from tests import stage_helpers
from tests.stage_helpers import make_cache

TEMPOS = (60, 90, 120)   # the debug cache's semantic cycle steps 1, 2, 3 follow these, not the MuLan tokens


def attribute_cache(root):
    make_cache(root)
    sem = np.load(root / "semantic.npy").astype(np.int64)
    n, t = sem.shape
    which = np.arange(n) % 3
    steps = 1 + which
    sem = (sem[:, :1] + np.arange(t)[None] * steps[:, None]) % 16
    np.save(root / "semantic.npy", sem.astype(np.int16))
    keys = np.array([attributes.key_index("G minor")] * n)
    np.save(root / "attributes.npy", np.stack([np.array(TEMPOS)[which], keys], 1).astype(np.int16))
    return root


def test_words_give_tempo_and_key():
    assert bpm_in_text("Heavy metal at 160 beats per minute") == 160
    assert bpm_in_text("around 51 BPM, 6/8") == 51 and bpm_in_text("metronome at 72") == 72
    assert bpm_in_text("tempo: 88, in 12/8") == 88 and bpm_in_text("slow, 12/8") is None
    assert bpm_in_text("1200 bpm") is None and bpm_in_text("a 4/4 groove at 120") is None
    assert attributes.key_in_text("a little dance in G") == "G major"
    assert attributes.key_in_text("Key of D minor, 2/2 meter") == "D minor"
    assert attributes.key_in_text("F#-minor, fast") == "F# minor" and attributes.key_in_text("in Am, slow") == "A minor"
    assert attributes.key_in_text("in Bb min") == "Bb minor" and attributes.key_in_text("in D-flat major") == "C# major"
    assert attributes.key_in_text("in a minute") is None and attributes.key_in_text("A lonely violin") is None
    assert attributes.key_in_text("A major hit from the 80s") is None   # the article, not the key
    assert attributes.key_in_text("a minor detail, in G major") == "G major"
    assert attributes.key_in_text("In Ab - 101 BPM") == "Ab major" and attributes.key_in_text("In C#m, kit") == "C# minor"
    assert bpm_in_text("96-bpm groove") == 96 and bpm_in_text("BPM: 128") == 128 and bpm_in_text("tempo 60s pop") is None
    assert attributes.stated("a dirge at 30 bpm in E minor") == "30 bpm (read as 40: the stages know 40-250), E minor"
    ids = attributes.from_texts(["rock at 160 bpm in E minor", "no tempo, no key"])
    assert ids.tolist() == [[1 + round(np.log(4) / np.log(1.03)), attributes.TEMPO_VOCAB + 1 + 16],
                            list(attributes.NULL)]
    raw = torch.tensor([[40, 0], [1000, 23], [0, -1]])
    assert attributes.ids(raw).tolist() == [[1, attributes.TEMPO_VOCAB + 1], [attributes.TEMPO_BINS, attributes.VOCAB - 1],
                                            list(attributes.NULL)]
    dropped = attributes.drop(attributes.ids(raw), torch.tensor([[True, False], [False, False], [False, True]]))
    assert dropped[0, 0] == 0 and dropped[0, 1] == attributes.TEMPO_VOCAB + 1 and dropped[1].tolist() == [63, 88]


def test_semantic_stage_learns_the_tempo_it_is_told(tmp_path):
    cache = TokenCache(attribute_cache(tmp_path / "cache"))
    over = [f"cache={cache.root}", f"out={tmp_path / 's'}", "steps=150", "eval_every=150", "ckpt_every=150", "lr=0.01",
            "warmup=5", "attribute_input=true", "attribute_dropout=0.2"]
    stage = load_stage(train(load_config(StageConfig, ROOT / "configs/debug/semantic.yaml", over)))
    mulan = torch.as_tensor(cache.arrays["mulan"][:6].astype(np.int64))
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731

    def step_share(ids, step):   # how often consecutive ids advance by `step`
        return float(((ids[:, 1:] - ids[:, :-1]) % 16 == step).float().mean())
    for step, bpm in zip((1, 3), (60, 120)):
        told = attributes.ids(torch.tensor([[bpm, 0]] * 6))
        ids = stage.generate(mulan, 20, Sampling(temperature=0.5), generator=g(), attributes=told)
        assert step_share(ids, step) > 0.8, (bpm, ids)
    # guidance: the null rows have no attributes, so guidance strengthens them (runs, and still follows)
    ids = stage.generate(mulan, 20, Sampling(temperature=0.5, guidance=3.0), generator=g(),
                         attributes=attributes.ids(torch.tensor([[120, 0]] * 6)))
    assert step_share(ids, 3) > 0.8
    # attribute guidance (the delay test below replays its arithmetic) acts where a tempo is stated, also without
    # text guidance (g = 1: three row groups), and a prompt that states nothing gets the same ids as without it
    told = attributes.ids(torch.tensor([[60, 0]] * 6))
    plain, pushed = (stage.generate(mulan, 20, Sampling(temperature=0.5, attribute_guidance=a), generator=g(),
                                    attributes=told) for a in (0.0, 2.0))
    assert not torch.equal(plain, pushed)
    plain, pushed = (stage.generate(mulan, 20, Sampling(temperature=0.5, guidance=2.0, attribute_guidance=a),
                                    generator=g()) for a in (0.0, 3.0))
    assert torch.equal(plain, pushed)
    # the conditioning signal: the true attributes carry the step, alone and on top of the MuLan tokens
    from evaluation.conditioning import signal
    res = signal(stage, cache, np.arange(24), 0.2, batch=12)
    assert res["null-none+true"] > 0.2 and res["loss/audio+true"] < res["loss/audio"] - 0.2, res
    assert "loss/text+stated" not in res   # no text tokens in this cache


def delay_config(tmp_path, out, *extra):
    return stage_helpers.delay_config(tmp_path, out, *extra, make=attribute_cache)


def warm_started_delay(tmp_path, out, *extra):
    """A delay stage with new modules (`extra`), warm-started from a plain one trained here, and a held-out batch
    with attribute ids; checked to begin exactly as the plain stage (the new tables start at zero)."""
    plain = load_stage(train(delay_config(tmp_path, "plain")), "coarse")
    cfg = delay_config(tmp_path, out, *extra, f"init={tmp_path / 'plain/model'}")
    stage = DelayStage(cfg)
    warm_start(stage.model, check_init(cfg), cfg.init)
    stage.model.eval()
    cache = TokenCache(tmp_path / "cache")
    b = cache.window(cache.rows("valid")[:2], np.zeros(2, dtype=int), 25, 2)
    b["attrs"] = attributes.ids(b.pop("attributes"))
    with torch.no_grad():
        assert torch.allclose(stage.loss(b, None)["loss"], plain.loss(b, None)["loss"], atol=1e-5)
    return stage, plain, b


def test_delay_warm_start_begins_as_the_old_model_and_guidance_nulls_the_attributes(tmp_path):
    stage, plain, b = warm_started_delay(tmp_path, "attr", "attribute_input=true")   # the new table starts at zero
    torch.nn.init.normal_(stage.model.attributes.weight, std=0.5)   # make the attributes matter
    mulan, semantic = b["mulan"], b["semantic"][:, :10]
    told = attributes.ids(torch.tensor([[90, 3], [150, 20]]))
    codes = stage.generate(mulan, semantic, 20, Sampling(top_k=1, guidance=3.0), attributes=told)
    target, inputs = stage.teacher_forced(codes)
    sem = torch.cat([b["semantic"][:, :10].repeat_interleave(2, 1)] * 1 + [b["semantic"][:, 9:10]], 1)
    with torch.no_grad():   # replay: conditional rows with the attributes, null rows without, mixed
        cond = stage.model(mulan, inputs, sem, attrs=told)
        null = stage.model(stage.cond(mulan, torch.ones(2, dtype=torch.bool)), inputs, sem,
                           attrs=attributes.null_like(told))
    picked = cfg_mix(cond, null, 3.0).argmax(-1).permute(0, 2, 1)
    valid = target != stage.model.empty
    assert (picked[valid] == target[valid]).all()
    # attribute guidance: a third group, the conditional rows with null attributes, pushed away from
    pushed = stage.generate(mulan, semantic, 20, Sampling(top_k=1, guidance=3.0, attribute_guidance=2.0), attributes=told)
    target, inputs = stage.teacher_forced(pushed)
    with torch.no_grad():
        cond, null, bare = (stage.model(c, inputs, sem, attrs=a) for c, a in (
            (mulan, told), (stage.cond(mulan, torch.ones(2, dtype=torch.bool)), attributes.null_like(told)),
            (mulan, attributes.null_like(told))))
    picked = (cfg_mix(cond, null, 3.0) + 2.0 * (cond - bare)).argmax(-1).permute(0, 2, 1)
    assert (picked[valid] == target[valid]).all() and not torch.equal(pushed, codes)
    other = stage.generate(mulan, semantic, 20, Sampling(top_k=1, guidance=3.0), attributes=told.flip(0))
    assert not torch.equal(other, codes)
    none = stage.generate(mulan, semantic, 20, Sampling(top_k=1, guidance=3.0))
    nulls = stage.generate(mulan, semantic, 20, Sampling(top_k=1, guidance=3.0), attributes=attributes.null_like(told))
    assert torch.equal(none, nulls)   # no attributes = the null ids a training row without them gets


def test_attribute_errors_name_the_fix(tmp_path):
    with pytest.raises(UserError, match="attribute_input is an option"):
        train(delay_config(tmp_path, "f", "role=fine", "attribute_input=true"))
    make_cache(tmp_path / "plain_cache")
    over = [f"cache={tmp_path / 'plain_cache'}", f"out={tmp_path / 'x'}", "steps=2", "attribute_input=true"]
    with pytest.raises(UserError, match="--attributes-only"):
        train(load_config(StageConfig, ROOT / "configs/debug/semantic.yaml", over))
    with pytest.raises(UserError, match="attribute_input is an option"):
        train(load_config(StageConfig, ROOT / "configs/debug/masked.yaml", over))
    assert not (tmp_path / "f").exists() and not (tmp_path / "x").exists()


def test_attributes_only_writes_each_clips_tempo_and_key(tmp_path):
    root = make_cache(tmp_path / "cache", clips=3)
    index = json.loads((root / "index.json").read_text())
    for c in index["clips"]:   # as a real cache records them: the manifest's resolved paths
        c["audio"] = str(tmp_path / c["audio"])
    (root / "index.json").write_text(json.dumps(index))
    rows = [{"audio": c["audio"], "caption": "x", "tempo": 100 + i, "key": "Eb minor"} for i, c in enumerate(index["clips"])]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    assert_clean_error(run_module("data.tokenize", "--attributes-only", "--manifest", str(tmp_path / "m.jsonl"),
                                  "--out", str(root)), "in none of the manifests")
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_module("data.tokenize", "--attributes-only", "--manifest", str(tmp_path / "m.jsonl"), "--out", str(root))
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = TokenCache(root).arrays["attributes"]
    assert got.tolist() == [[100, 15], [101, 15], [102, 15]]


def test_the_pipeline_hands_a_stage_the_attributes_its_prompt_states(tmp_path, monkeypatch):
    from pipeline import GenerationOptions, Pipeline, load_parts
    from tests.helpers import save_debug_parts
    parts = save_debug_parts(tmp_path / "parts")
    cfg = load_config(StageConfig, ROOT / "configs/debug/semantic.yaml", ["attribute_input=true"])
    save_stage(build_stage(cfg), parts / "semantic")
    pipe = Pipeline(load_parts({n: str(parts / n) for n in ("mulan", "semantic_tokenizer", "acoustic", "semantic",
                                                             "coarse", "fine")}))
    seen = []
    real = pipe.parts["semantic"].generate
    monkeypatch.setattr(pipe.parts["semantic"], "generate", lambda *a, **k: seen.append(k.get("attributes")) or real(*a, **k))
    wav = pipe.generate(["a waltz at 90 bpm in F minor", "no numbers here"], 1.0, options=GenerationOptions(seed=0))
    assert wav.shape[0] == 2 and seen and seen[0].tolist() == attributes.from_texts(
        ["a waltz at 90 bpm in F minor", "no numbers here"]).tolist()
    assert seen[0][1].tolist() == list(attributes.NULL)
    # a story: a tempo stated once holds until restated, a key likewise
    seen.clear()
    pipe.generate(story=[("a waltz at 90 bpm", 0.0), ("now in F minor", 0.5)], duration=3.0,
                  options=GenerationOptions(seed=0))
    held = attributes.from_texts(["a waltz at 90 bpm in F minor"])
    assert any(a is not None and a.tolist() == held.tolist() for a in seen), seen


def test_the_command_line_says_what_the_prompt_states(parts, tmp_path, monkeypatch, capsys):
    from tests.test_pipeline import cli, stage_args
    cfg = load_config(StageConfig, ROOT / "configs/debug/semantic.yaml", ["attribute_input=true"])
    save_stage(build_stage(cfg), tmp_path / "sem_attr")
    code, out, err = cli(monkeypatch, capsys, "--text", "a waltz at 90 bpm in F minor", "--duration", "1", "--out",
                         tmp_path / "a.wav", "--quiet", *stage_args(parts, semantic=tmp_path / "sem_attr"))
    assert code == 0, err
    assert "the prompt states: 90 bpm, F minor" in out
    code, out, _ = cli(monkeypatch, capsys, "--text", "a waltz", "--duration", "1", "--out", tmp_path / "b.wav",
                       "--quiet", *stage_args(parts))   # stages without attribute_input: nothing to say
    assert code == 0 and "the prompt states" not in out


def test_a_semantic_stage_with_the_beat_clock_keeps_time(tmp_path):
    """beat_input: a clock at the row's tempo summed into every frame. On ids that ARE the clock (each clip's beat
    phase at its own tempo), a tiny stage learns to keep it at each tempo it is told; no tempo, no clock."""
    root = tmp_path / "cache"
    make_cache(root, seconds=1.0)   # one window per clip: the clock starts with the clip
    n = np.load(root / "semantic.npy").shape[0]
    raw = torch.tensor([[TEMPOS[i % 3], 0] for i in range(n)])
    np.save(root / "semantic.npy", attributes.beat_grid(attributes.ids(raw), 25, 25.0).numpy().astype(np.int16))
    np.save(root / "attributes.npy", raw.numpy().astype(np.int16))
    over = [f"cache={root}", f"out={tmp_path / 's'}", "steps=120", "eval_every=120", "ckpt_every=120", "lr=0.01",
            "warmup=5", "attribute_input=true", "attribute_dropout=0.1", "beat_input=true"]
    stage = load_stage(train(load_config(StageConfig, ROOT / "configs/debug/semantic.yaml", over)))
    mulan = torch.as_tensor(np.load(root / "mulan.npy")[:4].astype(np.int64))
    for bpm in (60, 120):
        told = attributes.ids(torch.tensor([[bpm, 0]] * 4))
        # plain, and guided (its rows without attributes run without the clock: extrapolating past them costs a
        # few frames on this toy)
        for s, share in ((Sampling(temperature=0.5), 0.95), (Sampling(temperature=0.5, guidance=2.0,
                                                                      attribute_guidance=1.0), 0.75)):
            ids = stage.generate(mulan, 25, s, generator=torch.Generator().manual_seed(0), attributes=told)
            assert float((ids == attributes.beat_grid(told, 25, 25.0)).float().mean()) > share, (bpm, s, ids)
    side = stage.side_positions(None, attributes.null_like(mulan), 4, 3, 25)
    assert side.shape == (4, 28, 2) and (side[..., 1] == 0).all()
    with pytest.raises(ConfigError, match="beat_input"):
        load_config(StageConfig, ROOT / "configs/debug/semantic.yaml", ["beat_input=true"])


def test_beat_copy_pulls_the_id_one_beat_back():
    """Sampling.beat_copy: a logit bonus for the id one beat back, a fractional beat split between the two frames
    around it; rows with no tempo, and frames with less than a beat of history, are left alone."""
    logits, history = torch.zeros(3, 6), torch.tensor([[0, 1, 2, 3, 4], [5, 4, 3, 2, 1], [0, 1, 2, 3, 4]])
    out = beat_bias(logits, history, torch.tensor([2.25, 0.0, 7.0]), 2.0)
    assert out[0].tolist() == [0, 0, 0.5, 1.5, 0, 0] and (out[1:] == 0).all()
    assert beat_bias(logits, history[:, :0], torch.tensor([2.0, 2.0, 2.0]), 2.0).eq(0).all()
    # an untrained stage told 150 bpm (10 frames a beat at 25 Hz) repeats its ids at the beat when pushed hard;
    # told no tempo, or with the bonus off, it does not
    stage = build_stage(load_config(StageConfig, ROOT / "configs/debug/semantic.yaml", ["attribute_input=true"]))
    mulan = torch.zeros(2, stage.cfg.mulan_levels, dtype=torch.long)
    told = attributes.ids(torch.tensor([[150, 0], [0, -1]]))
    lag = attributes.beat_frames(told, 25.0)
    assert abs(float(lag[0]) - 10.0) < 0.2 and float(lag[1]) == 0.0

    def at_beat(bonus):
        ids = stage.generate(mulan, 100, Sampling(beat_copy=bonus), generator=torch.Generator().manual_seed(0),
                             attributes=told)
        lo, hi = int(lag[0].floor()), int(lag[0].ceil())
        return [float(((r[hi:] == r[hi - lo:-lo] if lo != hi else r[lo:] == r[:-lo]) |
                       (r[hi:] == r[:-hi])).float().mean()) for r in ids]
    pushed, plain = at_beat(12.0), at_beat(0.0)
    assert pushed[0] > 0.9 and plain[0] < 0.5 and pushed[1] < 0.5, (pushed, plain)
    blind = build_stage(load_config(StageConfig, ROOT / "configs/debug/semantic.yaml", []))
    with pytest.raises(UserError, match="attribute_input"):
        blind.generate(mulan, 5, Sampling(beat_copy=1.0))
    from pipeline_cli import parse_knobs
    assert parse_knobs(["semantic.beat_copy=4"]) == [("semantic", "beat_copy", 4)]
    with pytest.raises(UserError, match="semantic.beat_copy"):
        parse_knobs(["coarse.beat_copy=4"])


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """The six debug parts, shared by the tests that only read them."""
    from tests.helpers import save_debug_parts
    return save_debug_parts(tmp_path_factory.mktemp("parts"))


def test_beat_pick_keeps_the_candidate_whose_ids_pulse_at_the_stated_beat(parts, monkeypatch):
    """Sampling.beat_pick: k semantic candidates per prompt in one batch; a prompt stating a bpm keeps the one whose
    ids repeat at its beat (data.attributes.id_pulse) or, with beat_pick_by=onsets, whose ids change on it
    (onset_pulse), one stating none its first; no bpm anywhere: one each."""
    from pipeline import PARTS, GenerationOptions, Pipeline, load_parts
    from pipeline_cli import parse_knobs
    pipe = Pipeline(load_parts({n: str(parts / n) for n in PARTS}))
    rate, k = pipe.parts["semantic_tokenizer"].frame_rate, 3
    beat, T = rate * 60 / 150, math.ceil(2.5 * rate)   # the frames of a 2.5 s clip
    g = torch.Generator().manual_seed(0)
    cands = torch.randint(0, 16, (2 * k, T), generator=g)
    bar = torch.randperm(16, generator=g)[: int(round(beat))]
    cands[1] = bar.repeat(T // len(bar) + 1)[:T]   # prompt 0's second candidate repeats with the beat
    cands[k + 2] = cands[1]                        # so does prompt 1's third, but that prompt states no bpm
    held = torch.randint(0, 16, (T // int(beat) + 1,), generator=g).repeat_interleave(int(beat))[:T]
    cands[2] = torch.where(held == torch.roll(held, int(beat)), (held + 1) % 16, held)   # a new id on every beat
    assert attributes.id_pulse(cands[1], beat) > 0.9 and abs(attributes.id_pulse(cands[0], beat)) < 0.2
    assert attributes.id_pulse(cands[2], beat) < 0 < 0.5 < attributes.onset_pulse(cands[2], beat)
    assert abs(attributes.onset_pulse(cands[0], beat)) < 0.2 and math.isnan(attributes.onset_pulse(cands[1], beat))
    calls = []

    def fake(m, new, s, prompt=None, generator=None, **kw):
        done = sum(calls) // len(m) if calls else 0
        calls.append(len(m) * new)
        return cands[: len(m), done: done + new]
    monkeypatch.setattr(pipe.parts["semantic"], "generate", fake)
    pipe.generate(["a jig at 150 bpm", "a jig"], 2.5, options=GenerationOptions(semantic={"beat_pick": k}))
    sem = pipe.last_codes["semantic"]
    assert sem[0].tolist() == cands[1].tolist() and sem[1].tolist() == cands[k].tolist()
    calls.clear()
    pipe.generate(["a jig at 150 bpm", "a jig"], 2.5,
                  options=GenerationOptions(semantic={"beat_pick": k, "beat_pick_by": "onsets"}))
    sem = pipe.last_codes["semantic"]
    assert sem[0].tolist() == cands[2].tolist() and sem[1].tolist() == cands[k].tolist()
    calls.clear()
    pipe.generate(["a jig", "a reel"], 2.5, options=GenerationOptions(semantic={"beat_pick": k}))
    assert sum(calls) == 2 * T   # nothing to pick by: one candidate a prompt
    with pytest.raises(UserError, match="repeats, onsets"):   # a bad measure stored in a checkpoint's defaults
        pipe.generate(["a jig at 150 bpm"], 2.5, options=GenerationOptions(semantic={"beat_pick": k, "beat_pick_by": "x"}))
    assert parse_knobs(["semantic.beat_pick=8"]) == [("semantic", "beat_pick", 8)]
    for bad, says in (("coarse.beat_pick=8", "semantic.beat_pick"), ("semantic.beat_pick=0", "at least 1"),
                      ("semantic.beat_pick=2.5", "whole number"), ("semantic.beat_pick_by=beats", "repeats, onsets"),
                      ("fine.beat_pick_by=onsets", "semantic.beat_pick_by")):
        with pytest.raises(UserError, match=says):
            parse_knobs([bad])


def test_a_delay_stage_takes_the_beat_clock_too(tmp_path):
    """beat_input on a delay stage: a zero-initialised clock (a warm start begins as the old model) at the acoustic
    frame rate, in the frames of rows that state a tempo only."""
    stage, plain, b = warm_started_delay(tmp_path, "beat", "attribute_input=true", "beat_input=true")
    torch.nn.init.normal_(stage.model.beats.weight, std=1.0)
    sem = b["semantic"][:, :10]
    with torch.no_grad():
        feats = {bpm: stage.model.semantic_features(sem, attrs=attributes.ids(torch.tensor([[bpm, 0]] * 2)))
                 for bpm in (60, 150, 0)}
    assert not torch.allclose(feats[60], feats[150])
    clock = attributes.beat_grid(attributes.ids(torch.tensor([[150, 0]] * 2)), 10, stage.cfg.acoustic_rate)
    assert clock[0].tolist() == [1, 1, 1, 2, 2, 3, 3, 3, 4, 4]   # ~150 bpm at 50 Hz: 20 frames a beat, in eighths
    with torch.no_grad():   # a row without a tempo gets the clock's "none" row in every frame
        none = stage.model.beats(torch.zeros_like(clock))
        assert torch.allclose(feats[150] - feats[0], stage.model.beats(clock) - none, atol=1e-5)


def test_the_beat_clock_counts_from_the_clips_start_in_every_window(tmp_path):
    """A window cut from the middle of a clip (a training window, or one of the pipeline's sliding windows) gets the
    phase its frames have in the clip, not a clock restarted at its first frame: the same ids as the whole clip's
    clock there, per row in training (batch_at hands each window's start), and in a delay stage's frame inputs."""
    told = attributes.ids(torch.tensor([[96, 0], [131, 3], [0, 2]]))
    whole = attributes.beat_grid(told, 60, 25.0)
    assert torch.equal(attributes.beat_grid(told, 20, 25.0, 0.84), whole[:, 21:41])   # 0.84 s = 21 frames
    starts = torch.tensor([0.2, 1.0, 0.4])
    per_row = attributes.beat_grid(told, 10, 25.0, starts)
    for r, f in enumerate([5, 25, 10]):
        assert torch.equal(per_row[r], whole[r, f: f + 10])
    assert (whole[2] == 0).all()                                   # no tempo, no clock
    cfg = delay_config(tmp_path, "beat", "attribute_input=true", "beat_input=true", "window_seconds=0.4")
    from stages.train import batch_at
    b, _ = batch_at(TokenCache(tmp_path / "cache"), TokenCache(tmp_path / "cache").rows("train"), cfg, 3, 6)
    assert b["beat_start"].shape == (6,) and len(set(b["beat_start"].tolist())) > 1   # windows start anywhere
    stage = DelayStage(cfg)
    torch.nn.init.normal_(stage.model.beats.weight, std=1.0)
    sem = torch.randint(0, cfg.semantic_codebook, (3, 60))
    with torch.no_grad():
        full = stage.model.semantic_features(sem, attrs=told)
        part = stage.model.semantic_features(sem[:, 30:50], attrs=told, beat_start=30 / cfg.acoustic_rate)
    assert torch.allclose(part, full[:, 30:50]) and not torch.allclose(part, full[:, :20])
    with pytest.raises(ConfigError, match="semantic_input=true"):
        delay_config(tmp_path, "bad", "attribute_input=true", "beat_input=true", "semantic_input=false")


def test_attribute_guidance_runs_its_third_row_group_only_where_a_prompt_states_something():
    from stages.sampling import guided_rows
    s = Sampling(guidance=3.0, attribute_guidance=2.0)
    stated = attributes.from_texts(["a waltz at 90 bpm", "no tempo, no key"])
    assert guided_rows(s, True, stated) == 3
    assert guided_rows(s, True, attributes.from_texts(["no tempo, no key"] * 2)) == 2   # that group = the cond one
    assert guided_rows(Sampling(guidance=1.0, attribute_guidance=2.0), True, stated) == 3
    assert guided_rows(Sampling(guidance=1.0), True, stated) == 1 and guided_rows(s, False, stated) == 1
