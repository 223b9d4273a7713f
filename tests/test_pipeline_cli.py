from tests.helpers import assert_clean_error, run_module, run_modules


def test_pipeline_reports_missing_models_and_bad_input(tmp_path):
    empty, bogus, proc = run_modules(["pipeline", "--text", "   "], ["pipeline", "--text", "piano", "--stage", "bogus=x"],
                                     ["pipeline", "--text", "piano", "--stage", f"acoustic={tmp_path / 'none'}"])
    assert_clean_error(empty, "--text is empty")
    assert_clean_error(bogus, "bogus", "NAME one of")
    assert_clean_error(proc, "models not found", "acoustic (")
