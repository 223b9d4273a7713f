from tests.helpers import assert_clean_error, run_module


def test_pipeline_reports_missing_models_and_bad_input(tmp_path):
    assert_clean_error(run_module("pipeline", "--text", "   "), "--text is empty")
    assert_clean_error(run_module("pipeline", "--text", "piano", "--stage", "bogus=x"), "bogus", "NAME one of")
    proc = run_module("pipeline", "--text", "piano", "--stage", f"acoustic={tmp_path / 'none'}")
    assert_clean_error(proc, "models not found", "acoustic (")
