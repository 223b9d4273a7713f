import json

import numpy as np
import pytest
import torch

from audio_tokenizers.mulan import ClapConditioner, MuLan, MuLanConfig, load_conditioner
from audio_tokenizers.mulan import retrieval
from audio_tokenizers.mulan_train import train_sentencepiece
from common.config import load_config
from common.errors import UserError
from data.corpus import build_corpus
from data.manifest import read_manifest
from evaluation.metrics import cycle_consistency
from tests.helpers import ROOT, assert_clean_error, run_module, run_modules, sine


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("mulan")
    build_corpus(d / "corpus", clips=16, seed=7, workers=1, seconds=2.0)
    manifest = d / "corpus" / "metadata.jsonl"
    proc = run_module("audio_tokenizers.mulan", "train", "--config", "configs/debug/mulan.yaml",
                      f"train_manifest={manifest}", f"valid_manifest={manifest}", f"out={d / 'run'}", "steps=40")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d, manifest


def test_training_logs_retrieval_and_matched_pairs_beat_shuffled(trained):
    d, manifest = trained
    log = [json.loads(l) for l in (d / "run/metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < losses[0]
    assert any("valid" in r and "recall@10" in r["valid"] for r in log)
    model = load_conditioner(d / "run/model")
    rows = read_manifest(manifest)
    with torch.no_grad():
        res = retrieval(model, rows)
        a = torch.cat([model.embed_audio(torch.from_numpy(
            __import__("data.audio", fromlist=["load_audio"]).load_audio(r["audio"], 24000))[None, None]) for r in rows])
        t = model.embed_text([r["caption"] for r in rows])
    matched = (a * t).sum(1).mean()
    shuffled = (a * t.roll(3, 0)).sum(1).mean()
    assert matched > shuffled
    mcc = cycle_consistency(t, a)    # the evaluation's MuLan cycle consistency on the same pairs
    assert mcc["mcc"] == pytest.approx(float(matched), abs=1e-5) and mcc["mcc"] > mcc["mcc_shuffled"]
    assert res["recall@10"] > 10 / len(rows)  # above chance on its own training clips


def test_embeddings_tokens_and_bad_input(trained, capfd):
    d, _ = trained
    model = load_conditioner(d / "run/model")
    with torch.no_grad():
        t = model.embed_text(["calm solo piano", "Ünïcödé — 音楽 ♪", "a " * 200])
        assert "truncated" in capfd.readouterr().err
        assert t.shape == (3, 16) and torch.allclose(t.norm(dim=1), torch.ones(3), atol=1e-5)
        a = model.embed_audio(torch.zeros(2, 1, 24000 * 3))          # silence, longer than a crop
        assert a.shape == (2, 16) and torch.isfinite(a).all()
        short = model.embed_audio(torch.from_numpy(sine(440, 0.2, 16000))[None, None], sample_rate=16000)
        assert short.shape == (1, 16)
        tok = model.tokens(torch.cat([t, a]))
        assert tok.shape == (5, 3) and int(tok.max()) < 8 and int(tok.min()) >= 0
    for bad in ([""], ["   \n"], []):
        with pytest.raises(UserError, match="empty|no text"):
            model.embed_text(bad)


def test_score_command(trained):
    d, manifest = trained
    wavs = [r["audio"] for r in read_manifest(manifest)[:2]]
    score = ["audio_tokenizers.mulan", "score", "--audio", *wavs, "--checkpoint", str(d / "run/model"), "--text"]
    proc, empty = run_modules([*score, "drums", "piano", "organ"], [*score, " "])
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["audio"] == wavs and out["text"] == ["drums", "piano", "organ"]
    assert np.array(out["cosine"]).shape == (3, 2) and np.all(np.abs(out["cosine"]) <= 1.0001)
    assert_clean_error(empty, "empty")


def test_pretrained_text_encoder_replaces_the_text_tower(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizer
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "calm", "piano", "fast", "drums"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "bert")
    BertModel(BertConfig(vocab_size=len(words), hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")
    cfg = load_config(MuLanConfig, ROOT / "configs/debug/mulan.yaml", [f"text_pretrained_path={tmp_path / 'bert'}"])
    model = MuLan(cfg)
    assert model.embed_text(["calm piano", "fast drums"]).shape == (2, 16)


def test_clap_loads_from_a_local_folder_as_a_conditioner(tmp_path):
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor, RobertaTokenizer
    chars = [chr(c) for c in range(33, 127)] + ["Ġ"]
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", "<mask>"] + chars)}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = RobertaTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    ClapProcessor(feature_extractor=ClapFeatureExtractor(), tokenizer=tok).save_pretrained(tmp_path / "clap")
    cfg = ClapConfig(text_config={"vocab_size": len(vocab), "hidden_size": 32, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "intermediate_size": 32},
                     audio_config={"depths": [1, 1, 1, 1], "num_attention_heads": [1, 1, 1, 1],
                                   "hidden_size": 128, "patch_embeds_hidden_size": 16, "window_size": 8},
                     projection_dim=16)
    torch.manual_seed(0)
    ClapModel(cfg).save_pretrained(tmp_path / "clap")
    cond = load_conditioner(tmp_path / "clap")
    assert isinstance(cond, ClapConditioner)
    t = cond.embed_text(["calm piano"])
    a = cond.embed_audio(torch.from_numpy(sine(440, 1.0, 24000))[None, None], sample_rate=24000)
    assert t.shape == (1, 16) and a.shape == (1, 16)
    cond.rvq.fit(torch.randn(64, 16))
    assert cond.tokens(torch.cat([t, a])).shape == (2, 12)
    # the same folder as the FAD embedding backend `clap:PATH`
    from evaluation.embeddings import embedder
    emb = embedder(f"clap:{tmp_path / 'clap'}")([sine(440, 1.0, 24000), sine(220, 1.0, 24000)], 24000)
    assert emb.shape == (2, 16) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)


def test_sentencepiece_keeps_unseen_characters():
    import sentencepiece as spm
    proto = train_sentencepiece(["a calm piano piece in C major", "fast drums and bass"] * 20, 400)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    assert sp.decode(sp.encode("calm 音楽")) == "calm 音楽"  # byte fallback, no <unk>


def test_held_out_evaluation_rephrases_with_unseen_templates(trained, tmp_path):
    from evaluation.mulan import HELD_OUT_TEMPLATES, first_level_agreement, rephrase
    d, manifest = trained
    # the held-out templates' distinctive words never occur in the corpus builder's captions
    source = (ROOT / "data/captions.py").read_text()
    assert all(w not in source for w in ("Instrumentation", "Tonality", "arrangement", "performs"))
    row = read_manifest(manifest)[0]
    texts = [rephrase(row, i) for i in range(len(HELD_OUT_TEMPLATES))]
    assert len(set(texts)) == len(texts) and all(row["style"].lower() in t.lower() for t in texts)
    agree = first_level_agreement(torch.tensor([[1], [2], [3], [3]]), torch.tensor([[1], [2], [0], [3]]), 4)
    assert agree["agreement"] == 0.75 and agree["chance"] == pytest.approx(0.25 * 0.25 + 0.25 * 0.25 + 0.5 * 0.25)
    corpus = d / "corpus"
    (corpus / "test.jsonl").write_text(manifest.read_text())  # the tiny corpus's own clips stand in
    proc, no_test = run_modules(["evaluation.mulan", "--corpus", str(corpus), "--checkpoint", str(d / "run/model"),
                                 "--clips", "16", "--out", str(tmp_path / "m.json")],
                                ["evaluation.mulan", "--corpus", str(tmp_path), "--checkpoint", str(d / "run/model")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "m.json").read_text())
    assert res["clips"] == 16 and 0 <= res["rephrased"]["recall@10"] <= 1
    assert res["captions"]["recall@10"] >= res["captions"]["recall@1"]
    assert 0 <= res["tokens"]["agreement"] <= 1 and res["tokens"]["uniform_chance"] == 1 / 8
    assert_clean_error(no_test, "test.jsonl", "not found")


def test_locked_audio_retrains_only_the_text_tower(trained):
    """lock_audio (LiT): the audio tower and the RVQ stay bit-identical, so the audio tokens are the locked MuLan's
    (and caches made by it accept the new one); the text tower moves and learns; a mismatched config is refused."""
    from common.checkpoint import load_checkpoint
    from data.tokenize import checkpoint_hash, mulan_audio_hashes
    d, manifest = trained
    base = d / "run/model"
    dev = d / "dev.jsonl"    # dev prompts: the tiny corpus's own captions and labels stand in
    dev.write_text("".join(json.dumps({"caption": r["caption"], "instrument_label": r["instrument_label"]}) + "\n"
                           for r in read_manifest(manifest)[:6]))
    theremin = d / "dev_theremin.jsonl"
    theremin.write_text('{"caption": "a theremin", "instrument_label": "theremin"}\n')
    lit = ["audio_tokenizers.mulan", "train", "--config", "configs/debug/mulan.yaml", f"lock_audio={base}",
           f"train_manifest={manifest}"]
    proc, bad_dim, bad_dev = run_modules(    # the two refusals beside the run, each into a folder of its own
        [*lit, f"valid_manifest={manifest}", f"out={d / 'lit'}", "steps=25", "batch_size=16", "lr=0.003",
         f"dev_prompts={dev}", "filler_words=0.5"],
        [*lit, "text_dim=64", f"out={d / 'lit_bad_dim'}", "steps=2"],
        [*lit, f"out={d / 'lit_bad_dev'}", "steps=2", f"dev_prompts={theremin}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [json.loads(l)["valid"] for l in (d / "lit/metrics.jsonl").read_text().splitlines() if '"valid"' in l]
    best = load_checkpoint(d / "lit/best", kind="mulan").meta    # the start or the best evaluated step
    assert all(0 <= e["dev_instrument"] <= 1 for e in evals) and best["dev_instrument"] >= max(e["dev_instrument"]
                                                                                                for e in evals)
    assert best["step"] in (0, 15, 25)
    old, new = load_checkpoint(base, kind="mulan").state_dict, load_checkpoint(d / "lit/model", kind="mulan").state_dict
    assert old.keys() == new.keys()
    locked = [k for k in old if not k.startswith("text.") and k != "logit_scale"]
    assert any(k.startswith("audio.") for k in locked) and any(k.startswith("rvq.") for k in locked)
    assert all(torch.equal(old[k].float(), new[k].float()) for k in locked)
    assert not torch.equal(old["text.proj.weight"].float(), new["text.proj.weight"].float())
    assert mulan_audio_hashes(d / "lit/model") == {checkpoint_hash(d / "lit/model"), checkpoint_hash(base)}
    again = run_module(*lit[:4], f"lock_audio={d / 'lit/model'}", *lit[5:], f"valid_manifest={manifest}",
                       f"out={d / 'lit2'}", "steps=2")
    assert again.returncode == 0, again.stderr[-3000:]    # a LiT of a LiT: caches made by either parent accept it
    assert mulan_audio_hashes(d / "lit2/model") == {checkpoint_hash(d / "lit2/model"), checkpoint_hash(base),
                                                    checkpoint_hash(d / "lit/model")}
    log = [json.loads(l) for l in (d / "lit/metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < losses[0]
    assert_clean_error(bad_dim, "text_dim")
    assert not (d / "lit_bad_dim/model").exists()
    assert_clean_error(bad_dev, "theremin")
    assert not (d / "lit_bad_dev/audio_bank.pt").exists()     # refused before the bank is computed


def test_filler_words_salt_a_caption_and_name_nothing():
    """add_filler: p=0 leaves the caption (and the random stream) as it was; p=1 puts 1-3 list words between the
    caption's words, which keep their order; the shipped list shares no word with what captions can say."""
    from data.captions import add_filler, describe, filler_words
    words = filler_words()
    assert len(words) > 1000 and len(set(words)) == len(words)
    meta = {"style": "jig", "players": "fiddle", "instruments": ["fiddle"], "tempo": 120, "key": "D major",
            "mode": "major", "meter": "6/8", "source": "score"}
    spoken = set()
    for seed in range(200):
        spoken |= set(describe(meta, np.random.default_rng(seed)).lower().replace(",", " ").split())
    assert not spoken & set(words)
    assert not {"note", "keys", "band", "scale", "sound"} & set(words)
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    assert add_filler("a fiddle jig", words, a, 0.0) == "a fiddle jig" and a.random() == b.random()
    for seed in range(20):
        out = add_filler("a fiddle jig at 120 bpm", words, np.random.default_rng(seed), 1.0).split()
        extra = [w for w in out if w not in "a fiddle jig at 120 bpm".split()]
        assert 1 <= len(extra) <= 3 and all(w in words for w in extra)
        assert [w for w in out if w not in extra] == "a fiddle jig at 120 bpm".split()


def test_filler_words_refused_outside_text_tower_runs(tmp_path):
    proc = run_module("audio_tokenizers.mulan", "train", "--config", "configs/debug/mulan.yaml", "filler_words=0.5",
                      f"out={tmp_path / 'run'}")
    assert_clean_error(proc, "filler_words")
    assert not (tmp_path / "run").exists()
