from evaluation.bench import bench_stages


def test_stage_benchmark_runs_and_kv_cache_matches(monkeypatch):
    import evaluation.bench as bench
    monkeypatch.setitem(bench.B1, "dim", 32)
    monkeypatch.setitem(bench.B1, "depth", 1)
    res = bench_stages(repeats=1, gen_tokens=12)
    assert res["kv_equals_no_cache"] and res["generated_tokens"] == 12
    assert res["sequence_tokens"] == 12 + 125 + 750
    assert res["train_tokens_per_s"] > 0 and res["kv_speedup"] > 0


def test_evaluation_commands_take_their_threads_from_omp_num_threads(monkeypatch):
    import torch

    from evaluation import use_threads
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        use_threads()
        assert torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        use_threads()
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "many")
        use_threads()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
