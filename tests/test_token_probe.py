"""evaluation.token_probe: a linear probe reads an attribute from MuLan tokens when (and only when) they carry it."""
import json

import numpy as np

from data.tokenize import checkpoint_hash
from tests.helpers import assert_clean_error, run_module
from tests.stage_helpers import make_cache
from tests.test_mulan_vectors import CODES, LEVELS, fake_mulan


def labelled_cache(tmp_path):
    """A cache whose clips' instrument is their first MuLan token mod 3 (what fake_mulan's level 0 points at) and
    whose key is drawn at random (nothing in the tokens says it)."""
    mulan = fake_mulan(tmp_path / "mulan")
    root = make_cache(tmp_path / "cache", clips=120, mulan=(LEVELS, CODES), text=True)
    index = json.loads((root / "index.json").read_text())
    index["tokenizer_hashes"]["mulan"] = checkpoint_hash(mulan)
    for c in index["clips"]:
        c["audio"] = str(tmp_path / c["audio"])
    (root / "index.json").write_text(json.dumps(index))
    m = np.load(root / "mulan.npy")
    rng = np.random.default_rng(1)
    rows = [{"audio": c["audio"], "instrument_label": ["harp", "oboe", "tuba"][m[i, 0] % 3],
             "key": ["C major", "A minor", "G major"][rng.integers(3)], "tempo": 100}
            for i, c in enumerate(index["clips"])]
    (tmp_path / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return mulan, root


def test_probe_reads_what_the_tokens_carry_and_not_what_they_do_not(tmp_path):
    mulan, cache = labelled_cache(tmp_path)
    out = tmp_path / "probe.json"
    proc = run_module("evaluation.token_probe", "--cache", str(cache), "--labels", str(tmp_path / "all.jsonl"),
                      "--mulan", str(mulan), "--levels", "1", "3", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    inst, key = r["instrument"], r["key"]
    assert inst["held_out"] == 20 and inst["classes"] == 3
    assert inst["levels_1"]["audio"] >= 0.9 and inst["levels_1"]["text"] >= 0.9   # text tokens share level 0
    assert key["levels_3"]["audio"] < 0.7                                          # random keys: near chance
    assert "skipped" in r["tempo_band"]                                            # one tempo: nothing to probe


def test_probe_errors_name_the_fix(tmp_path):
    mulan, cache = labelled_cache(tmp_path)
    assert_clean_error(run_module("evaluation.token_probe", "--cache", str(cache), "--labels",
                                  str(tmp_path / "none.jsonl"), "--mulan", str(mulan)), "no such manifest")
    other = fake_mulan(tmp_path / "other", seed=1)
    assert_clean_error(run_module("evaluation.token_probe", "--cache", str(cache), "--labels",
                                  str(tmp_path / "all.jsonl"), "--mulan", str(other)), "not the MuLan that made")


def test_probe_scores_prompt_tokens_by_the_attribute_they_state(tmp_path):
    """--prompts: the probe fitted on clips' audio tokens reads prompts' text tokens; prompts that do not state the
    attribute are left out, and tokens that point at the wrong instrument score as misses."""
    from common.checkpoint import load_checkpoint
    from evaluation.token_probe import probe
    state = load_checkpoint(fake_mulan(tmp_path / "m"), kind="mulan").state_dict
    books = np.stack([state[f"rvq.levels.{q}.codebook"].numpy() for q in range(LEVELS)])
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CODES, (90, LEVELS))
    names = ["harp", "oboe", "tuba"]
    labels = [names[t % 3] for t in tokens[:, 0]]
    prompts = np.array([[0, 1, 2], [4, 0, 0], [2, 5, 5], [3, 3, 3]])       # level 0 -> harp, oboe, tuba, harp
    said = ["harp", "oboe", "harp", None]                                   # the third is a miss, the fourth silent
    out = probe(tokens, None, books, labels, np.arange(80), np.arange(80, 90), [1], prompts, said)
    assert out["prompts"] == 3
    assert out["levels_1"]["audio"] >= 0.9 and abs(out["levels_1"]["prompts"] - 2 / 3) < 1e-3
    assert "prompts" not in probe(tokens, None, books, labels, np.arange(80), np.arange(80, 90), [1])["levels_1"]
