"""Bad input under `torchrun --nproc-per-node 2 -m seektrain train …` (real CLI, 2 gloo ranks): one
`error: …` line per launch, not one per rank, and exit code 2 (torchrun itself exits 1 and names the
rank that failed first); a rank that fails alone is still reported, with its rank."""

from __future__ import annotations

import os
import re
import signal
import subprocess

import pytest
from dist_helpers import HERE, exit_codes, launch

from file_limits import file_size_limit
from seektrain.distributed.env import merge_by_rank


def train(run_dir, overrides: list[str], *extra: str, cli: list[str] | None = None) -> list[str]:
    sets = [a for o in overrides for a in ("--set", o)]
    return [*(cli or ["-m", "seektrain"]), "train", "--run-dir", str(run_dir), *sets, *extra]


def the_error(proc: subprocess.CompletedProcess, reporter: int = 0) -> str:
    """The one `error:` line of a failed launch, after checking that `reporter` printed it and exited 2
    and that no rank died of anything but that error (the others exit 2 too, or torchrun stops them)."""
    output = f"{proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    assert "[rank" not in proc.stderr, output  # no rank died of an uncaught exception (a traceback)
    codes = exit_codes(proc.stderr)
    assert proc.returncode != 0 and codes.get(reporter) == 2, output
    assert set(codes.values()) <= {2, -signal.SIGTERM}, output
    return lines[0]


def test_a_config_mistake_is_reported_once(toy, tmp_path):
    line = the_error(launch(train(tmp_path / "run", [*toy, "train.stpes=5"]), check=False))
    assert line == "error: unknown config key 'train.stpes'; did you mean train.steps?"
    assert not (tmp_path / "run").exists()


def test_cuda_graphs_under_torchrun_are_refused_before_anything_is_written(toy, tmp_path):
    overrides = [*toy, "train.compile=true", "train.cuda_graphs=true"]
    line = the_error(launch(train(tmp_path / "run", overrides), check=False))
    assert line == "error: train.cuda_graphs is single-process for now (not under torchrun)"
    assert not (tmp_path / "run").exists()


def test_a_missing_data_dir_is_reported_once(toy, tmp_path):
    line = the_error(launch(train(tmp_path / "run", [*toy, "data.path=/nonexistent/data"]), check=False))
    assert line.startswith("error: no prepared data at /nonexistent/data") and "seektrain prepare" in line
    assert not (tmp_path / "run").exists()


def test_data_missing_on_one_rank_is_reported_once_with_its_rank(toy, data_dir, tmp_path):
    """After the ranks joined their group: they agree, and rank 0 reports rank 1's error at once."""
    (tmp_path / "data0").symlink_to(data_dir)
    rank_cli = [str(HERE / "rank_cli.py")]
    args = train(tmp_path / "run", [*toy, f"data.path={tmp_path}/data{{rank}}"], cli=rank_cli)
    line = the_error(launch(args, check=False))
    assert line.startswith(f"error: rank 1: no prepared data at {tmp_path}/data1"), line
    assert not (tmp_path / "run").exists()


def test_a_config_missing_on_one_rank_is_reported_by_that_rank(toy, tmp_path):
    """Before any process group: rank 0 waits in the rendezvous, rank 1 reports after ERROR_GRACE_S."""
    (tmp_path / "run0.toml").write_text("[train]\nsteps = 4\n")
    rank_cli = [str(HERE / "rank_cli.py")]
    args = train(tmp_path / "run", toy, "--config", f"{tmp_path}/run{{rank}}.toml", cli=rank_cli)
    line = the_error(launch(args, check=False), reporter=1)
    assert line == f"error: rank 1: config file {tmp_path}/run1.toml does not exist"


def test_ranks_that_see_different_checkpoints_stop_instead_of_diverging(toy, tmp_path):
    """No shared filesystem: rank 0's run dir holds a checkpoint, rank 1's none. Resuming on one rank
    and starting fresh on the other would train two different models; the ranks compare and stop."""
    from seektrain import cli

    assert cli.main(train(tmp_path / "run0", [*toy, "train.steps=4"])[2:]) == 0  # one process, step 4 saved
    rank_cli = [str(HERE / "rank_cli.py")]
    line = the_error(launch(train(f"{tmp_path}/run{{rank}}", toy, cli=rank_cli), check=False))
    checkpoint = tmp_path / "run0" / "checkpoints" / "step_00000004"
    want = f"error: the ranks disagree on the checkpoint to resume from: rank 0: {checkpoint} | rank 1: none"
    assert line == want, line
    assert not (tmp_path / "run1").exists()


@pytest.mark.parametrize(
    "errors, message",
    [
        (["bad", "bad", "bad"], "bad"),
        ([None, "bad"], "rank 1: bad"),
        (["bad", "bad", None, "bad", "other"], "ranks 0-1, 3: bad | rank 4: other"),
    ],
)
def test_merged_errors_name_the_ranks_unless_all_agree(errors, message):
    assert merge_by_rank(errors) == message


def test_auto_precision_that_resumes_fp16_is_refused_under_fsdp(toy, tmp_path):
    """`auto` keeps a checkpoint's precision; fp16 from a one-process run must then meet the same check
    as an explicit fp16 (the loss scaler would see only one rank's gradient shards)."""
    from seektrain.config import load_config
    from seektrain.train.trainer import Trainer

    fp16 = [*toy, "train.precision=fp16", "train.steps=2", "checkpoint.every=2", "train.eval_every=0"]
    assert Trainer(load_config(None, "tiny", fp16), tmp_path / "one").fit() == 0
    step2 = tmp_path / "one" / "checkpoints" / "step_00000002"
    overrides = [*toy, "train.precision=auto", "parallel.dp_mode=fsdp"]
    line = the_error(launch(train(tmp_path / "run", overrides, "--resume", str(step2)), check=False))
    assert line.startswith("error: the checkpoint's train.precision=fp16 with parallel.dp_mode=fsdp"), line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_a_sharded_checkpoint_that_cannot_be_written_is_one_line_on_every_rank(toy, tmp_path, mode):
    """Step 4's sharded checkpoint is written; the run resumes with files limited to half its largest
    shard (RLIMIT_FSIZE, as on a full disk), so DCP fails to write step 8's shards. DCP raises its
    CheckpointException (a BaseException) on every rank: once a traceback per rank. Now one line, exit 2,
    no partial copy left, step 4 intact."""
    run = tmp_path / "run"
    overrides = [*toy, f"parallel.dp_mode={mode}", "train.eval_every=0"]
    launch(train(run, [*overrides, "train.steps=4"]))
    step4 = run / "checkpoints" / "step_00000004"
    limit = max(f.stat().st_size for f in (step4 / "dcp").iterdir()) // 2
    line = the_error(launch(train(run, overrides), check=False, preexec_fn=file_size_limit(limit)))
    assert line.startswith(f"error: cannot write checkpoint {run / 'checkpoints' / 'step_00000008'} ("), line
    assert line.endswith("MiB free there); the checkpoints before it are intact"), line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004"]


def test_a_save_that_fails_on_rank_0_alone_ends_every_rank_with_its_error(tmp_path):
    """Rank 0 writes state.pt alone, after the shards: when that fails, the other ranks learn of it and
    raise the same error, naming rank 0; the temp dir is gone (save_agreement.py). Before, rank 0 died of a
    traceback while the others waited at a bare barrier until torchrun stopped them."""
    root = tmp_path / "checkpoints"
    proc = launch([str(HERE / "save_agreement.py"), str(root)])
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("rank "))
    message = f"rank 0: cannot write checkpoint {root / 'step_00000008'} ("  # the rank that failed, named
    assert [line.split(": ", 1)[0] for line in lines] == ["rank 0", "rank 1"], proc.stdout
    assert all(line.split(": ", 1)[1].startswith(message) for line in lines), proc.stdout
    assert len({line.split(": ", 1)[1] for line in lines}) == 1  # the same message on every rank
    assert list(root.iterdir()) == []


def test_host_memory_counts_every_rank_of_the_node_and_what_each_holds(toy, tmp_path, monkeypatch):
    """On CPU the training state is checked against the host's memory for all of its ranks: under ddp
    each holds all of it and DDP's gradient buckets (20 bytes a parameter with AdamW), under fsdp and
    hsdp its shard of the 16 bytes. A model that cannot fit is one error line on every rank, before
    anything is built or written; the needs scale as the ranks' shares say."""
    monkeypatch.setenv("HOST_MEMORY_BYTES", str(1 << 20))
    big = [*toy, "model.hidden_size=2048", "model.moe_intermediate_size=2048", "model.intermediate_size=4096"]
    cli = [str(HERE / "host_memory_cli.py")]
    cases = [  # mode and its settings, ranks, what each holds, bytes a parameter on the host, advice
        (["parallel.dp_mode=ddp"], 2, "each holding all of it, and DDP's gradient buckets", 40,
         ", fewer ranks on this node, parallel.dp_mode=fsdp"),
        (["parallel.dp_mode=fsdp"], 2, "each holding 1/2 of it", 16, ", more nodes"),
        (["parallel.dp_mode=fsdp"], 1, "holding all of it", 16, ", more nodes"),
        (["parallel.dp_mode=hsdp", "parallel.dp_shard=1"], 2, "each holding all of it", 32,
         ", a larger parallel.dp_shard"),
        (["parallel.dp_mode=hsdp"], 2, "each holding 1/2 of it", 16,
         ", parallel.dp_mode=fsdp over more nodes"),
    ]  # fmt: skip
    needs = []
    for i, (mode, nproc, holding, _, advice) in enumerate(cases):
        args = train(tmp_path / f"run{i}", [*big, *mode], cli=cli)
        line = the_error(launch(args, nproc=nproc, check=False))
        ranks = f"{nproc} rank{'s' if nproc > 1 else ''} on this node under {mode[0].split('=')[1]}"
        match = re.fullmatch(
            r"error: the model: [\d.]+ M parameters need ([\d.]+) GiB of host memory for weights, gradients "
            rf"and optimizer state alone \({ranks}, {re.escape(holding)}\); 1 MiB is available \(use a "
            r"smaller model \(model\.\* settings\)(.*), or a machine with more memory\)",
            line,
        )
        assert match and match[2] == advice, line
        needs.append(float(match[1]))
        assert not (tmp_path / f"run{i}").exists()
    for need, (_, _, _, per_param, _) in zip(needs, cases, strict=True):
        assert need / needs[1] == pytest.approx(per_param / 16, rel=0.05)  # GiB printed to 0.1


def test_a_collective_that_fails_because_another_rank_died_is_one_line(tmp_path):
    """A rank killed (out of memory, kill -9) breaks the collective the others are in: their error is one
    line that points at the rank that died, not a traceback that buries its output. Two real gloo ranks,
    launched by hand so that no launcher stops rank 0 first: rank 1 exits, and once it has, rank 0 is told
    to go on into an all_reduce, which fails."""
    import socket
    import sys
    import textwrap

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent("""
        import os, sys, torch, torch.distributed as dist
        from seektrain.distributed.env import lost_rank
        dist.init_process_group("gloo")
        dist.barrier()
        if dist.get_rank() == 1:
            os._exit(1)
        sys.stdin.readline()  # rank 1 is gone
        try:
            dist.all_reduce(torch.ones(1))
        except RuntimeError as e:
            print(lost_rank(e))
    """))
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    pipes = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ranks = [{**os.environ, **env, "RANK": str(rank)} for rank in (0, 1)]
    procs = [subprocess.Popen([sys.executable, str(script)], env=e, **pipes) for e in ranks]
    assert procs[1].wait(timeout=120) == 1
    out, err = procs[0].communicate("go\n", timeout=120)
    # gloo's own words, less its source location: "Connection closed by peer [127.0.0.1]:PORT", or a reset
    why = r"[^\n]*Connection (closed|reset) by peer[^\n]*"
    line = rf"another rank stopped, so a collective failed \({why}\); that rank's output says why\n"
    assert re.fullmatch(line, out), (out, err)
