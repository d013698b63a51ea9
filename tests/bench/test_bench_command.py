"""`seektrain bench` end to end on CPU at toy size: it runs real steps and reports honest figures."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from seektrain import cli
from seektrain.bench import BenchConfig, bench_model_config, busy_time, device_intervals, profile_table
from seektrain.commands import bench as bench_command
from seektrain.errors import UserError
from seektrain.train.precision import native_bf16

gpu_absent = pytest.mark.skipif(torch.cuda.is_available(), reason="refused only where no GPU is present")


def test_bench_json_reports_a_training_step(capsys):
    code = cli.main(["bench", "--seq", "16", "--batch", "2", "--steps", "3", "--warmup", "1", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    assert result["preset"] == "tiny" and result["device"] == "cpu"
    assert result["precision"] == ("bf16" if native_bf16(torch.device("cpu")) else "fp32")  # auto
    # tokens_per_s is rounded to an integer (±0.5) and step_ms to 0.1 ms (±0.05)
    assert result["tokens_per_s"] == pytest.approx(2 * 16 / (result["step_ms"] / 1e3), rel=0.01, abs=0.5)
    assert result["mfu"] is None  # no known peak on CPU
    assert result["peak_mem_gib"] >= 0.05  # the process's peak RSS: torch alone takes more than 50 MiB
    assert 0 < result["loss"] < 20


def test_one_slow_step_does_not_move_the_figures(capsys, monkeypatch):
    """Another process taking the machine for one step (a shared box) made the mean, and so tokens/s, swing
    by 10x between runs: the median step is reported, with the spread that shows the noise."""
    import seektrain.bench as bench_module

    clock = iter([0.0, 0.1, 0.2, 2.2, 2.3, 2.4])  # the third of five steps takes 2 s, the others 0.1 s
    monkeypatch.setattr(bench_module, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    argv = ["bench", "--seq", "16", "--batch", "2", "--steps", "5", "--warmup", "0", "--json"]
    assert cli.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["step_ms"], result["tokens_per_s"], result["spread"]) == (100.0, 320, 19.0)


def test_profile_table_goes_to_stderr_and_json_stays_parseable(capsys):
    argv = ["bench", "--seq", "16", "--batch", "2", "--steps", "1", "--warmup", "1", "--profile", "5"]
    argv += ["--precision", "fp32"]  # the same profile on every CPU
    argv.append("--json")
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert "profile" not in result and result["graph_breaks"] is None  # not compiled
    assert "aten::mm" in captured.err and "Self CPU" in captured.err


def test_trace_writes_the_profiled_step_as_a_chrome_trace(tmp_path, capsys):
    trace = tmp_path / "step.json"
    argv = ["bench", "--seq", "16", "--batch", "2", "--steps", "1", "--warmup", "1", "--profile", "3"]
    argv += ["--precision", "fp32"]
    assert cli.main([*argv, "--trace", str(trace), "--json"]) == 0
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name") == "aten::mm" for e in events)


def test_a_trace_that_cannot_be_written_is_one_error_and_leaves_no_partial_file(tmp_path):
    """Should the target go bad during the benchmark (here: a directory where the trace should go), the
    failure is a UserError and the temp files are removed."""
    target = tmp_path / "step.json"
    target.mkdir()
    with pytest.raises(UserError, match=f"cannot write the trace {target}"):
        profile_table(lambda: torch.ones(4) @ torch.ones(4), torch.device("cpu"), 3, str(target))
    assert [p.name for p in tmp_path.iterdir()] == ["step.json"]


def test_a_trace_folder_removed_during_the_run_is_one_error(tmp_path):
    folder = tmp_path / "gone"
    folder.mkdir()
    with pytest.raises(UserError, match=f"cannot write the trace {folder / 't.json'}: No such file"):
        profile_table(lambda: folder.rmdir(), torch.device("cpu"), 3, str(folder / "t.json"))


def test_a_trace_leaves_the_users_files_alone_and_writes_through_a_symlink(tmp_path):
    """The temp name is the writer's own: a file or folder the user keeps at `TRACE.partial` (the fixed
    temp name once used, which the trace deleted or failed on) stays; a symlink keeps pointing at its
    target, which gets the trace."""
    (tmp_path / "out").mkdir()
    link = tmp_path / "step.json"
    link.symlink_to(tmp_path / "out" / "real.json")
    (tmp_path / "step.json.partial").write_text("precious")
    (tmp_path / "out" / "real.json.partial").mkdir()
    profile_table(lambda: torch.ones(4) @ torch.ones(4), torch.device("cpu"), 3, str(link))
    assert link.is_symlink() and "traceEvents" in json.loads((tmp_path / "out" / "real.json").read_text())
    assert (tmp_path / "step.json.partial").read_text() == "precious"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["real.json", "real.json.partial"]


def test_busy_time_is_the_union_of_kernel_intervals():
    # overlapping, nested, touching and disjoint intervals, unsorted
    assert busy_time([(5, 7), (0, 2), (1, 3), (1.5, 2.5), (3, 4), (10, 10)]) == 4 + 2
    assert busy_time([]) == 0


def test_device_intervals_are_kernels_and_copies_not_annotations():
    """inductor's `## Call CompiledFxGraph ##` ranges are CUDA-side annotations spanning the gaps between
    kernels: counting them would call an idle device busy."""

    def event(kind, start, end, annotation=False):
        device = SimpleNamespace(name=kind)
        return SimpleNamespace(
            device_type=device,
            time_range=SimpleNamespace(start=start, end=end),
            is_user_annotation=annotation,
        )

    events = [
        event("CUDA", 0, 100, annotation=True),
        event("CUDA", 10, 20),
        event("CPU", 0, 90),
        event("CUDA", 50, 60),
    ]
    assert device_intervals(events) == [(10, 20), (50, 60)]
    assert busy_time(device_intervals(events)) == 20


def test_dense_variant_has_no_moe_layers_and_keeps_the_layer_override():
    cfg = bench_model_config(BenchConfig(preset="tiny", dense=True, layers=6, seq=4096))
    assert cfg.num_hidden_layers == 6 and cfg.num_moe_layers == 0
    assert cfg.num_mtp_layers == 0 and cfg.max_position_embeddings >= 4096


@pytest.mark.parametrize(
    "argv",
    [
        ["--preset", "nope"],
        ["--steps", "0"],
        ["--layers", "-1"],
        ["--warmup", "-1"],
        ["--mtp", "-2"],
        ["--warmup"],  # argparse's own usage errors are one line too
        ["--trace", "t.json"],
        ["--profile", "3", "--trace", "/nonexistent/dir/t.json"],
        ["--profile", "3", "--trace", "."],  # a directory: found before the benchmark, not after it
        ["--profile", "3", "--trace", "/proc/seektrain_test_trace.json"],  # unwritable, even for root
        ["--trace", ""],
        ["--profile", "3", "--trace", ""],
        ["--cuda-graphs", "--activation-checkpointing"],
        ["--cuda-graphs", "--no-compile"],
        pytest.param(["--cuda-graphs"], marks=gpu_absent),  # GPU only: no misleading figures on a CPU
    ],
)
def test_bad_input_is_one_error_line(argv, capsys):
    try:
        code = cli.main(["bench", *argv])
    except SystemExit as e:  # argparse exits itself
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_a_trace_under_a_file_or_a_missing_folder_says_which(tmp_path):
    """The folder of --trace is missing, or a file: said as such (a file was 'no such directory')."""
    from seektrain.commands.bench import check_trace_target
    from seektrain.errors import UserError

    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match=rf"--trace .*afile/t\.json: {tmp_path}/afile is not a directory$"):
        check_trace_target(str(tmp_path / "afile" / "t.json"))
    with pytest.raises(UserError, match=rf"{tmp_path}/missing does not exist$"):
        check_trace_target(str(tmp_path / "missing" / "t.json"))


def test_a_model_whose_training_state_cannot_fit_in_host_memory_is_one_error_line(monkeypatch, capsys):
    """Linux would not refuse the allocation (overcommit) but grow until the OOM killer ends the process:
    on a machine with 64 MiB available, `tiny`'s 7.8 M parameters (16 B each) are refused up front."""
    from seektrain.train import host_memory

    monkeypatch.setattr(host_memory, "available_host_memory", lambda: 64 << 20)
    assert cli.main(["bench", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("error: --preset tiny: 7.8 M parameters need 118 MiB of host memory")
    assert "64 MiB is available (lower --layers or use a smaller --preset)" in err


def test_an_unknown_flag_points_to_the_verbs_help(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["bench", "--frob"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == "error: unrecognized arguments: --frob (see `seektrain bench --help`)\n"


def _cuda_out_of_memory():
    # what the CUDA caching allocator raises (torch.OutOfMemoryError); no GPU here to run out of
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB.\nGPU 0 has …")


def _cublas_out_of_memory():
    # a CUDA library's own allocation failing (no caching-allocator OutOfMemoryError)
    raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")


@pytest.mark.parametrize(
    "allocate, expected",
    [
        (
            lambda: torch.empty(2**50, dtype=torch.uint8),
            "error: out of host memory: could not allocate 1,048,576.0 GiB",
        ),
        (lambda: np.empty(2**50, dtype=np.uint8), "error: out of host memory: Unable to allocate 1.00 PiB"),
        (_cuda_out_of_memory, "error: out of GPU memory: CUDA out of memory. Tried to allocate 20.00 GiB."),
        (_cublas_out_of_memory, "error: out of GPU memory: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when"),
    ],
    ids=["torch-cpu", "numpy", "cuda", "cublas"],
)
def test_running_out_of_memory_is_one_error_line_with_what_to_change(allocate, expected, monkeypatch, capsys):
    monkeypatch.setattr(bench_command, "run", lambda args: allocate())  # a real allocation that fails
    assert cli.main(["bench"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1
    assert "lower --batch or --seq" in err


def test_a_file_a_command_cannot_use_is_one_error_line_naming_it(tmp_path, monkeypatch, capsys):
    """An OSError with a path (permission denied on a checkpoints folder or a data shard, a folder where a
    file goes): the path and the system's reason, where a traceback was printed."""
    monkeypatch.setattr(bench_command, "run", lambda args: tmp_path.read_bytes())  # a real failing read
    assert cli.main(["bench"]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path}: Is a directory\n"


def test_other_runtime_errors_still_raise(monkeypatch):
    monkeypatch.setattr(bench_command, "run", lambda args: torch.zeros(2) @ torch.zeros(3))
    with pytest.raises(RuntimeError, match="size mismatch|shapes cannot be multiplied|inconsistent"):
        cli.main(["bench"])
