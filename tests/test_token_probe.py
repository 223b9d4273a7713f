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
