from evaluation.bench import bench_stages


def test_stage_benchmark_runs_and_kv_cache_matches(monkeypatch):
    import evaluation.bench as bench
    monkeypatch.setitem(bench.B1, "dim", 32)
    monkeypatch.setitem(bench.B1, "depth", 1)
    res = bench_stages(repeats=1, gen_tokens=12)
    assert res["kv_equals_no_cache"] and res["generated_tokens"] == 12
    assert res["sequence_tokens"] == 12 + 125 + 750
    assert res["train_tokens_per_s"] > 0 and res["kv_speedup"] > 0
