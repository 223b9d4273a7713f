import json
import shutil

import pytest
import soundfile as sf
import torch

from audio_tokenizers.semantic import SemanticTokenizer, SemanticTokenizerConfig, build_conformer, load_semantic
from audio_tokenizers.semantic_train import BestRQ, augment, fit_kmeans, span_mask
from common.config import load_config
from common.errors import AudioError, CheckpointError
from tests.helpers import ROOT, assert_clean_error, run_module, run_modules, sine


def debug_cfg(**kw) -> SemanticTokenizerConfig:
    return load_config(SemanticTokenizerConfig, ROOT / "configs/debug/semantic_tokenizer.yaml",
                       [f"{k}={v}" for k, v in kw.items()])


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    d = tmp_path_factory.mktemp("sem")
    rows = []
    for i, f in enumerate([220, 330, 440, 550, 660, 880]):
        sf.write(d / f"{i}.wav", sine(f, 2.0, 24000), 24000)
        rows.append(json.dumps({"audio": f"{i}.wav", "caption": ""}))
    (d / "m.jsonl").write_text("\n".join(rows) + "\n")
    return d / "m.jsonl"


def published_w2vbert(tmp_path):
    """A tiny random Wav2Vec2Bert + its feature extractor, saved like facebook/w2v-bert-2.0."""
    from transformers import SeamlessM4TFeatureExtractor, Wav2Vec2BertConfig, Wav2Vec2BertModel
    torch.manual_seed(0)
    Wav2Vec2BertModel(Wav2Vec2BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, add_adapter=False)).save_pretrained(tmp_path / "w2v")
    SeamlessM4TFeatureExtractor().save_pretrained(tmp_path / "w2v")
    return tmp_path / "w2v"


def tokenizer(backend: str, manifest, tmp_path) -> SemanticTokenizer:
    torch.manual_seed(0)
    extra = {"pretrained_path": str(published_w2vbert(tmp_path)), "layer": 1} if backend == "pretrained" else {}
    cfg = debug_cfg(backend=backend, train_manifest=str(manifest), **extra)
    return fit_kmeans(cfg, build_conformer(cfg) if backend == "w2vbert" else None)


@pytest.mark.parametrize("backend", ["w2vbert", "pretrained", "logmel"])
def test_backends_encode_at_25_hz_and_round_trip_through_a_checkpoint(backend, manifest, tmp_path):
    tok = tokenizer(backend, manifest, tmp_path)
    assert tok.frame_rate == 25.0 and tok.codebook_size == 16
    for n in (24000, 24001, 500):
        ids = tok.encode(torch.from_numpy(sine(440, n / 24000, 24000))[None, None])
        assert ids.shape == (1, max(1, -(-n // 960))) and ids.dtype == torch.int64
        assert 0 <= int(ids.min()) and int(ids.max()) < 16
    wav = torch.from_numpy(sine(330, 1.0, 24000) + sine(500, 1.0, 24000, 0.1))[None, None]
    tok.save(tmp_path / "tok")
    again = load_semantic(tmp_path / "tok")
    assert torch.equal(again.encode(wav), tok.encode(wav))
    assert again.fingerprint == tok.fingerprint and len(tok.fingerprint) == 16


def test_standardized_kmeans_assigns_in_z_space_and_round_trips(manifest, tmp_path):
    torch.manual_seed(0)
    cfg = debug_cfg(train_manifest=str(manifest), kmeans_standardize=True)
    tok = fit_kmeans(cfg, build_conformer(cfg))
    assert tok.mean.shape == tok.std.shape == (cfg.hidden_size,) and float(tok.std.min()) > 0
    wav = torch.from_numpy(sine(330, 1.0, 24000) + sine(500, 1.0, 24000, 0.1))[None, None]
    z = (tok.features(wav) - tok.mean) / tok.std
    assert torch.equal(tok.encode(wav)[0], torch.cdist(z[0], tok.centroids).argmin(1))
    tok.save(tmp_path / "tok")
    again = load_semantic(tmp_path / "tok")
    assert torch.equal(again.mean, tok.mean) and torch.equal(again.encode(wav), tok.encode(wav))
    tokenizer("logmel", manifest, tmp_path).save(tmp_path / "plain")   # no standardization: nothing stored
    assert load_semantic(tmp_path / "plain").mean is None
    assert load_semantic(tmp_path / "plain").fingerprint != tok.fingerprint   # another fit, another vocabulary


def test_bad_input(manifest, tmp_path):
    tok = tokenizer("w2vbert", manifest, tmp_path)
    assert tok.encode(torch.zeros(1, 1, 10)).shape == (1, 1)                 # shorter than a frame
    assert tok.encode(torch.zeros(1, 1, 24000)).shape == (1, 25)             # silence
    nan = torch.zeros(1, 1, 2400)
    nan[..., 3] = float("nan")
    with pytest.raises(AudioError, match="NaN"):
        tok.encode(nan)
    at16 = torch.from_numpy(sine(440, 1.0, 16000))[None, None]               # resampled
    at24 = torch.from_numpy(sine(440, 1.0, 24000))[None, None]
    a, b = tok.encode(at16, sample_rate=16000), tok.encode(at24)
    assert a.shape == b.shape and (a == b).float().mean() > 0.8


def test_span_mask_covers_about_40_percent():
    cfg = debug_cfg(mask_prob=0.1, mask_span=5)
    m = span_mask(64, 100, cfg, torch.Generator().manual_seed(0))
    assert 0.3 < m.float().mean() < 0.5 and m.any(1).all()
    runs = torch.diff(m[0].int())  # spans are at least mask_span long
    starts, ends = (runs == 1).nonzero().flatten(), (runs == -1).nonzero().flatten()
    if len(starts) and len(ends) and ends[0] > starts[0]:
        assert int(ends[0] - starts[0]) >= 5


def test_denoising_augmentation_and_clean_targets():
    from audio_tokenizers.semantic import log_mel_frames
    torch.manual_seed(0)
    wav = torch.from_numpy(sine(440, 1.0, 24000)).repeat(64, 1)
    assert torch.equal(augment(wav, 0.0), wav)
    out = augment(wav, 0.5)
    changed = (out != wav).any(1)
    assert 16 < int(changed.sum()) < 48
    # gain g in [-6, 6] dB and noise at 10-40 dB SNR: the residual after removing the scaled tone
    for row in out[changed]:
        g = float(row @ wav[0] / (wav[0] @ wav[0]))
        snr = 10 * torch.log10(wav[0].pow(2).mean() * g * g / (row - g * wav[0]).pow(2).mean())
        assert 10 ** (-6.2 / 20) < g < 10 ** (6.2 / 20) and 9 < float(snr) < 41
    # the targets of a denoising step are those of the clean input
    cfg = debug_cfg(ssl_targets="bestrq")
    net = BestRQ(cfg).eval()   # no dropout: two forwards agree
    clean, noisy = log_mel_frames(wav[:2], cfg), log_mel_frames(augment(wav[:2], 1.0), cfg)
    mask = span_mask(*clean.shape[:2], cfg, torch.Generator().manual_seed(1))
    loss_clean_targets, _, _ = net(noisy, mask, clean=clean)
    hidden = net.model(noisy, mask_time_indices=mask).last_hidden_state
    expect = torch.nn.functional.cross_entropy(net.head(hidden[mask]), net.targets(clean)[mask], reduction="sum")
    assert torch.allclose(loss_clean_targets, expect)
    assert not torch.equal(net.targets(clean)[mask], net.targets(noisy)[mask])


@pytest.mark.parametrize("targets", ["bestrq", "kmeans"])
def test_masked_prediction_learns_its_targets(targets, manifest):
    from audio_tokenizers.semantic import log_mel_frames
    torch.manual_seed(0)
    cfg = debug_cfg(ssl_targets=targets)
    net = BestRQ(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    wav = torch.stack([torch.from_numpy(sine(f, 1.0, 24000)) for f in (220, 440, 660, 880)])
    if targets == "kmeans":
        assert float(net.codebook.abs().sum()) == 0
        net.fit_targets(wav)
        # four steady tones: each tone's frames share one target, and the tones get different ones
        assert len(set(net.targets(log_mel_frames(wav, cfg))[:, 2:-2].flatten().tolist())) >= 4
    feats = log_mel_frames(wav, cfg)
    mask = span_mask(*feats.shape[:2], cfg, torch.Generator().manual_seed(1))
    first = None
    for _ in range(60):
        ce, correct, n = net(feats, mask)
        loss, acc = ce / n, correct / n
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.3 * first and float(acc) > 0.9


def test_second_iteration_targets_are_an_earlier_tokenizers_ids(manifest, tmp_path):
    from audio_tokenizers.semantic import log_mel_frames
    from common.errors import UserError
    teacher = tokenizer("w2vbert", manifest, tmp_path)
    teacher.save(tmp_path / "teacher")
    cfg = debug_cfg(ssl_targets="tokenizer", target_tokenizer=tmp_path / "teacher", rq_codebook_size=16,
                    init_from_target="true")
    net = BestRQ(cfg)
    wav = torch.stack([torch.from_numpy(sine(f, 1.0, 24000) + sine(2.5 * f, 1.0, 24000, 0.3))
                       for f in (220, 440, 660)])
    assert torch.equal(net.targets(log_mel_frames(wav, cfg)), teacher.encode(wav[:, None]))
    assert all(torch.equal(a, b) for a, b in zip(net.model.state_dict().values(),
                                                 teacher.model.state_dict().values()))
    assert not any(k.startswith("teacher") for k in net.state_dict())   # the teacher is not saved
    for kw, message in ((dict(target_tokenizer=""), "target_tokenizer=PATH"),
                        (dict(rq_codebook_size=32), "rq_codebook_size=16"),
                        (dict(mel_hop=120), "mel_hop 240 vs 120"),
                        (dict(hidden_size=64, init_from_target="true"), "another size")):
        base = dict(ssl_targets="tokenizer", target_tokenizer=tmp_path / "teacher", rq_codebook_size=16)
        with pytest.raises(UserError, match=message):
            BestRQ(debug_cfg(**{**base, **kw}))


def test_train_resume_and_encode_cli(manifest, tmp_path):
    args = ["audio_tokenizers.semantic", "train", "--config", "configs/debug/semantic_tokenizer.yaml",
            f"train_manifest={manifest}", f"valid_manifest={manifest}", f"out={tmp_path / 'run'}"]
    proc = run_module(*args, "steps=10")
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = [json.loads(l) for l in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert any("heldout_masked_acc" in r.get("valid", {}) for r in log)
    for name in ("tokenizer", "last"):     # copies for the encoders that run beside the resumed run
        shutil.copytree(tmp_path / "run" / name, tmp_path / name)
    wav = manifest.parent / "2.wav"
    encode = ["audio_tokenizers.semantic", "encode"]
    resumed, proc, unreadable, not_a_tokenizer = run_modules(
        [*args, "steps=20", "--resume"],
        [*encode, str(wav), str(wav), "--checkpoint", str(tmp_path / "tokenizer")],
        [*encode, str(tmp_path / "none.wav"), "--checkpoint", str(tmp_path / "tokenizer")],
        [*encode, str(wav), "--checkpoint", str(tmp_path / "last")])
    assert resumed.returncode == 0 and "at step 10" in resumed.stdout, resumed.stderr[-2000:]
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0] == lines[1] and lines[0].startswith(str(wav))
    assert len(lines[0].split()) == 1 + 50
    assert_clean_error(unreadable, "unreadable")
    assert_clean_error(not_a_tokenizer, "semantic_ssl")


def test_published_folder_errors(tmp_path):
    with pytest.raises(CheckpointError, match="cannot load a pretrained"):
        SemanticTokenizer(debug_cfg(backend="pretrained", pretrained_path=str(tmp_path)), torch.zeros(4, 8))


def test_features_skip_the_layers_above_the_clustered_one_exactly():
    from audio_tokenizers.semantic import log_mel_frames
    torch.manual_seed(0)
    cfg = debug_cfg()
    model = build_conformer(cfg).eval()
    tok = SemanticTokenizer(cfg, torch.zeros(4, cfg.hidden_size), model)
    x = torch.from_numpy(sine(330, 1.0, 24000))[None, None]
    with torch.no_grad():
        full = model(log_mel_frames(x[:, 0], cfg), output_hidden_states=True).hidden_states[cfg.layer]
    assert torch.equal(tok.features(x), full) and len(model.encoder.layers) == cfg.layers


def test_shipped_tokenizer_encodes_at_25_hz_and_is_the_one_the_shipped_stages_were_trained_on():
    from stages.base import load_stage
    tok = load_semantic(ROOT / "pretrained/semantic_tokenizer")
    assert (tok.cfg.layers, tok.cfg.layer, tok.codebook_size, tok.frame_rate) == (2, 1, 1024, 25.0)
    wav = torch.from_numpy(sine(330, 2.0, 24000) + sine(495, 2.0, 24000, 0.1))[None, None]
    wav = wav + 0.01 * torch.randn(wav.shape, generator=torch.Generator().manual_seed(0))   # a recording's noise floor
    ids = tok.encode(wav)
    assert ids.shape == (1, 50) and len(torch.unique(ids)) > 1
    assert (tok.encode(wav * 10 ** (-3 / 20)) == ids).float().mean() >= 0.95   # a 3 dB gain change moves few ids
    for kind in ("semantic", "coarse"):
        assert load_stage(ROOT / f"pretrained/{kind}", kind).cfg.semantic_tokens == tok.fingerprint
