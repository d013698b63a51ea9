"""`seektrain bench` end to end on CPU at toy size: it runs real steps and reports honest figures."""

import json

import pytest

from seektrain import cli
from seektrain.bench import BenchConfig, bench_model_config


def test_bench_json_reports_a_training_step(capsys):
    code = cli.main(["bench", "--seq", "16", "--batch", "2", "--steps", "2", "--warmup", "1", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    assert result["preset"] == "tiny" and result["device"] == "cpu" and result["precision"] == "fp32"
    assert result["tokens_per_s"] == pytest.approx(2 * 16 / (result["step_ms"] / 1e3), rel=0.01)
    assert result["mfu"] is None  # no known peak on CPU
    assert 0 < result["loss"] < 20


def test_dense_variant_has_no_moe_layers_and_keeps_the_layer_override():
    cfg = bench_model_config(BenchConfig(preset="tiny", dense=True, layers=6, seq=4096))
    assert cfg.num_hidden_layers == 6 and cfg.num_moe_layers == 0
    assert cfg.num_mtp_layers == 0 and cfg.max_position_embeddings >= 4096


@pytest.mark.parametrize("argv", [["--preset", "nope"], ["--steps", "0"], ["--layers", "-1"]])
def test_bad_input_is_one_error_line(argv, capsys):
    assert cli.main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
