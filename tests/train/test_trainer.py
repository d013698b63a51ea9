"""The loop on the real Transformer and real prepared data (toy sizes): accumulation, precision and loss
scaling, NaN skipping, spike rollback, activation checkpointing, schedules end to end."""

import ast
import enum
import inspect
import json
import math
import re

import pytest
import torch

from seektrain.config import load_config
from seektrain.train.metrics import read_metrics
from seektrain.train.trainer import Trainer


@pytest.fixture
def make(toy):
    def build(run_dir, *overrides, resume="auto"):
        return Trainer(load_config(overrides=[*toy, *overrides]), run_dir, resume=resume)

    return build


def prepare_other_sources(out, data_dir, val_fraction: float):
    """A data dir of other sources than the session's, with its tokenizer."""
    from seektrain.data.prepare import PrepareConfig, prepare

    sources = [inspect.getsourcefile(m) for m in (ast, enum, inspect)]
    tok = str(data_dir / "tokenizer.json")
    prepare(PrepareConfig(sources, str(out), tokenizer=tok, val_fraction=val_fraction, progress=False))
    return out


def grads(model):
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def train_lines(run_dir):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def test_accumulation_equals_one_big_batch(make, tmp_path):
    """4 micro-batches of 4 give the gradient of one batch of 16: the loss is normalized by the step's
    token counts, not averaged per micro-batch. MTP and the sequence-wise balance loss are on.
    Tolerance: fp32, rtol 1e-5 / atol 1e-7 — only the summation order differs (4 partial sums vs 1)."""
    tr = make(tmp_path / "run", "model.seq_aux_loss_alpha=0.01")
    batches = [next(tr.loader) for _ in range(4)]
    depth = tr.model_cfg.num_mtp_layers
    assert depth >= 1
    small = tr.stepper.forward_backward(batches, 0.3, depth)
    g_small = grads(tr.model)
    big_batch = [(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))]
    big = tr.stepper.forward_backward(big_batch, 0.3, depth)
    g_big = grads(tr.model)
    assert len(g_small) == len(g_big) > 10
    for a, b in zip(g_small, g_big, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert small.tokens == big.tokens == 16 * 32
    assert torch.equal(small.expert_counts, big.expert_counts)
    assert small.loss == pytest.approx(big.loss, rel=1e-6)
    assert small.balance_loss == pytest.approx(big.balance_loss, rel=1e-5) and big.balance_loss > 0


def test_fp16_scaler_backs_off_on_overflow_and_skips(make, tmp_path):
    tr = make(tmp_path / "run", "train.precision=fp16", "train.device=cpu")
    s = tr.stepper
    batches = [next(tr.loader) for _ in range(2)]
    scale = s.scaler.get_scale()
    p = next(tr.model.parameters())
    overflow = p.register_hook(lambda g: g.index_fill(0, torch.tensor([0]), math.inf))  # in the backward
    before = [q.detach().clone() for q in tr.model.parameters()]
    stats = s.forward_backward(batches, 0.3, 1)
    overflow.remove()
    assert not math.isfinite(stats.grad_norm)
    s.clip()
    assert s.apply(1e-3) is False  # skipped
    assert s.scaler.get_scale() == scale / 2  # backed off
    assert all(torch.equal(a, b) for a, b in zip(before, tr.model.parameters(), strict=True))
    stats = s.forward_backward(batches, 0.3, 1)
    assert math.isfinite(stats.grad_norm)
    s.clip()
    assert s.apply(1e-3) is True
    assert not all(torch.equal(a, b) for a, b in zip(before, tr.model.parameters(), strict=True))


def test_fp16_overflow_is_counted_in_a_run(make, tmp_path):
    tr = make(
        tmp_path / "run", "train.precision=fp16", "train.device=cpu", "train.steps=4", "train.log_every=1"
    )
    p = next(tr.model.parameters())
    p.register_hook(lambda g: g * math.inf if tr.counters.step == 1 else g)  # overflow during step 2
    assert tr.fit() == 0
    lines = train_lines(tmp_path / "run")
    assert [r["skipped_steps"] for r in lines] == [0, 1, 1, 1]
    assert lines[1]["loss_scale"] == lines[0]["loss_scale"] / 2


def test_nan_step_is_skipped_and_counted(make, tmp_path):
    run = tmp_path / "run"
    tr = make(run, "train.steps=6", "train.log_every=1")
    forward = tr.model.forward

    def patched(x, y=None, **kw):  # a NaN loss in step 3
        out = forward(x, y, **kw)
        if tr.model.training and tr.counters.step + 1 == 3:
            out.main_loss_sum = out.main_loss_sum * math.nan
        return out

    tr.model.forward = patched
    assert tr.fit() == 0
    records = read_metrics(run / "metrics.jsonl")
    skips = [r for r in records if r.get("event") == "skip"]
    assert [r["step"] for r in skips] == [3] and "non-finite" in skips[0]["reason"]
    lines = train_lines(run)
    assert [r["bad_steps"] for r in lines] == [0, 0, 1, 1, 1, 1]
    assert all(math.isfinite(r["loss"]) for r in lines if r["step"] != 3)
    assert lines[2]["loss"] is None  # strict JSON: the NaN is written as null (bare NaN breaks jq)
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda word: pytest.fail(f"non-JSON constant {word}"))
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_loss_spike_rolls_back_and_skips_the_data(make, tmp_path, precision):
    """fp16 too: the rolled-back step's unscaled gradients are discarded with the GradScaler's bookkeeping
    (an overflow would be the scaler's to skip, so the spike is added to the loss, not to its gradient)."""
    run = tmp_path / "run"
    tr = make(
        run,
        f"train.precision={precision}",
        "train.device=cpu",
        "train.steps=10",
        "train.log_every=1",
        "checkpoint.every=4",
        "train.spike_window=3",
        "train.spike_zscore=50",
        "train.eval_every=0",
    )
    fired = []
    forward = tr.model.forward

    def patched(x, y=None, **kw):
        out = forward(x, y, **kw)
        if tr.model.training and tr.counters.step + 1 == 7 and len(fired) < 2:  # both micro-batches, once
            fired.append(1)
            out.main_loss_sum = out.main_loss_sum + 1000.0  # a spike in the loss, not in the gradients
        return out

    tr.model.forward = patched
    assert tr.fit() == 0
    records = read_metrics(run / "metrics.jsonl")
    rollbacks = [r for r in records if r.get("event") == "rollback"]
    assert len(rollbacks) == 1
    rb = rollbacks[0]
    assert (rb["step"], rb["at_step"], rb["checkpoint"], rb["skipped_data_steps"]) == (
        4,
        7,
        "step_00000004",
        3,
    )
    assert "spike" in rb["reason"]
    steps = [r["step"] for r in train_lines(run)]
    assert steps == list(range(1, 11))  # steps 5 and 6 were logged again after the rollback, once
    assert train_lines(run)[-1]["rollbacks"] == 1
    # the loader went past the bad window: 10 steps trained + 3 skipped, in units of one micro-batch
    assert tr.loader.state_dict()["sequences_consumed"] == 13 * 8


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_changes_nothing(make, tmp_path, mode):
    """Same weights, same batches: gradients and expert counts (counted once, not per recompute) equal."""
    plain = make(tmp_path / "a")
    ac = make(tmp_path / "b", f"train.activation_checkpointing={mode}")
    batches = [next(plain.loader) for _ in range(2)]
    s1 = plain.stepper.forward_backward(batches, 0.3, 1)
    s2 = ac.stepper.forward_backward(batches, 0.3, 1)
    assert torch.equal(s1.expert_counts, s2.expert_counts)
    assert s1.expert_counts.sum() == 2 * 4 * 32 * 2 * 1  # micro-batches × mb × T × top-k × MoE layers
    assert torch.equal(s1.mtp_expert_counts, s2.mtp_expert_counts)
    assert s1.mtp_expert_counts.sum() == 2 * 4 * 32 * 2 * 1  # … × MTP depth 1
    for a, b in zip(grads(plain.model), grads(ac.model), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.precision=bf16", "optim.name=lamb", "optim.schedule=wsd"],
        [
            "train.precision=fp32",
            "optim.schedule=multistep",
            "train.batch_ramp_steps=3",
            "train.batch_ramp_start=4",
            "train.mtp_weight_schedule=[[0, 0.3], [0.5, 0.1]]",
        ],
    ],
)
def test_variants_run_and_log(make, tmp_path, overrides):
    run = tmp_path / "run"
    tr = make(run, "train.steps=4", "train.log_every=1", *overrides)
    assert tr.fit() == 0
    lines = train_lines(run)
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    for r in lines:
        for key in ("tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mem_gib", "expert_max_violation"):
            assert math.isfinite(r[key]), key
    if "train.batch_ramp_steps=3" in overrides:
        assert [r["global_batch"] for r in lines] == [4, 4, 4, 8]
        assert [r["mtp_weight"] for r in lines] == [0.3, 0.3, 0.1, 0.1]
    val = [r for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in val] == [0, 4]


def test_mtp_expert_biases_are_balanced_too(make, tmp_path):
    """The MTP module's MoE routes tokens as well: its correction bias moves by ±γ per step like the main
    layers' (a bias that stayed at zero would leave MTP routing unbalanced)."""
    tr = make(tmp_path / "run", "train.steps=3", "train.bias_update_speed=0.01")
    assert tr.fit() == 0
    (mtp_moe,) = tr.model.mtp_moe_layers()
    bias = mtp_moe.e_score_correction_bias
    assert bias.abs().sum() > 0
    steps = bias / 0.01  # each entry is a sum of three ±1 (or 0) moves
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-4)
    assert steps.abs().max() <= 3


@pytest.mark.parametrize("setting", ["optim.state_dtype=bf16", "train.precision=bf16"])
def test_bf16_runs_resume_exactly(make, tmp_path, setting):
    """bf16 moments, or bf16 autocast (the main job's precision on CPUs with bf16 units): a run resumed
    from its step-2 checkpoint ends with the same weights and moments as the uninterrupted run (the
    checkpoint holds bf16 moments as bf16; autocast's casts are recomputed the same way)."""
    import shutil

    overrides = (setting, "train.steps=4", "checkpoint.every=2", "train.eval_every=0")
    straight = make(tmp_path / "a", *overrides)
    assert straight.fit() == 0
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_00000004")
    resumed = make(tmp_path / "b", *overrides)
    assert resumed.counters.step == 2
    assert resumed.fit() == 0
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    states = list(zip(straight.optimizer.state.values(), resumed.optimizer.state.values(), strict=True))
    moments = torch.bfloat16 if setting.startswith("optim") else torch.float32
    assert {s["exp_avg_sq"].dtype for s, _ in states} == {moments}
    for s, r in states:
        assert torch.equal(s["exp_avg"], r["exp_avg"]) and torch.equal(s["exp_avg_sq"], r["exp_avg_sq"])


def test_auto_precision_trains_and_records_what_it_stands_for(make, tmp_path, capsys):
    """train.precision=auto runs in the precision it resolves to on this CPU, announces it, and the run's
    config.toml and checkpoint record that precision rather than "auto" (a later reader learns what ran)."""
    import tomllib

    from seektrain.checkpoint.manager import load_checkpoint
    from seektrain.train.precision import native_bf16
    from seektrain.train.step import AUTOCAST_DTYPES

    run = tmp_path / "run"
    expected = "bf16" if native_bf16(torch.device("cpu")) else "fp32"
    tr = make(run, "train.precision=auto", "train.steps=2", "checkpoint.every=2", "train.eval_every=0")
    assert tr.cfg.train.precision == expected
    assert tr.stepper.autocast_dtype == AUTOCAST_DTYPES[expected]
    assert tr.fit() == 0
    assert re.search(rf"cpu \(\d+ threads?\), {expected} \(auto\),", capsys.readouterr().out)
    assert tomllib.loads((run / "config.toml").read_text())["train"]["precision"] == expected
    (checkpoint,) = (run / "checkpoints").iterdir()
    assert load_checkpoint(checkpoint)["config"]["train"]["precision"] == expected
    assert all(math.isfinite(r["loss"]) for r in train_lines(run))


def test_auto_precision_on_resume_keeps_the_checkpoints(make, tmp_path, capsys):
    """A run resumed with train.precision=auto continues in the precision its checkpoint trained in, even
    where auto would pick the other one on this host (a run moved between machines, or one started
    before the preset said auto), so it continues exactly and its record stays true."""
    import tomllib

    from seektrain.train.precision import native_bf16

    run = tmp_path / "run"
    other = "fp32" if native_bf16(torch.device("cpu")) else "bf16"  # not what auto gives here
    first = make(run, f"train.precision={other}", "train.steps=2", "checkpoint.every=2", "train.eval_every=0")
    assert first.fit() == 0
    resumed = make(run, "train.precision=auto", "train.steps=3", "train.eval_every=0")
    assert resumed.counters.step == 2 and resumed.cfg.train.precision == other
    assert resumed.fit() == 0
    assert re.search(rf"cpu \(\d+ threads?\), {other} \(auto: the checkpoint's\),", capsys.readouterr().out)
    assert tomllib.loads((run / "config.toml").read_text())["train"]["precision"] == other


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside(make, tmp_path, capsys):
    """--resume with an older checkpoint of the same run: the checkpoints after it belong to the
    abandoned trajectory. They move to checkpoints/abandoned/N/ (kept, not deleted, under their own
    names), so that neither `--resume auto` nor retention mixes them with the new one."""
    from seektrain.checkpoint.manager import CheckpointManager
    from seektrain.infer.runs import load_run

    run = tmp_path / "run"
    overrides = (
        "train.steps=4",
        "checkpoint.every=1",
        "checkpoint.keep=3",
        "train.eval_every=0",
        "train.log_every=1",
    )
    assert make(run, *overrides).fit() == 0
    ckpts = run / "checkpoints"
    old_meta = {n: (ckpts / n / "meta.json").read_text() for n in ("step_00000003", "step_00000004")}
    resumed = make(run, *overrides[1:], "train.steps=3", resume=str(ckpts / "step_00000002"))
    assert resumed.counters.step == 2
    assert resumed.fit() == 0
    out = capsys.readouterr().out
    assert "note: step_00000003 is newer than the checkpoint resumed from" in out
    aside = ckpts / "abandoned" / "1"
    assert sorted(p.name for p in aside.iterdir()) == ["step_00000003", "step_00000004"]
    for name, meta in old_meta.items():
        assert (aside / name / "meta.json").read_text() == meta
    kept = CheckpointManager(ckpts, keep=3).list()
    assert [p.name for p in kept] == ["step_00000002", "step_00000003"]
    assert [r["step"] for r in train_lines(run)] == [1, 2, 3]  # metrics cut back the same way
    # Going back again abandons the new step 3 beside the first one; each still loads where it lies.
    assert make(run, *overrides[1:], "train.steps=3", resume=str(ckpts / "step_00000002")).fit() == 0
    assert sorted(p.name for p in (ckpts / "abandoned").iterdir()) == ["1", "2"]
    assert load_run(run, checkpoint=ckpts / "abandoned" / "2" / "step_00000003").step == 3


def test_a_damaged_checkpoint_is_named_and_kept_not_replaced(make, tmp_path, capsys):
    """A checkpoint directory that lost a file (saves only rename complete ones, so something else took
    it) cannot be resumed from: `--resume auto` continues from the one before, says why in a note, and
    moves the damaged one to abandoned/N/ untouched, where the run's own save of that step would have
    replaced it. With no complete checkpoint left the run starts over and keeps it the same way."""
    from seektrain.checkpoint.manager import CheckpointManager
    from seektrain.errors import UserError
    from seektrain.infer.runs import load_run

    run = tmp_path / "run"
    overrides = ("train.steps=3", "checkpoint.every=1", "checkpoint.keep=3", "train.eval_every=0")
    assert make(run, *overrides).fit() == 0
    ckpts = run / "checkpoints"
    (ckpts / "step_00000003" / "meta.json").unlink()
    state = (ckpts / "step_00000003" / "state.pt").read_bytes()
    with pytest.raises(UserError, match=r"step_00000003 is not a complete checkpoint: it lacks meta.json"):
        load_run(run, checkpoint=ckpts / "step_00000003")
    assert load_run(run).step == 2  # eval, generate and export use the one before, and say so
    assert f"note: {ckpts / 'step_00000003'} lacks meta.json: using step_00000002" in capsys.readouterr().err
    resumed = make(run, *overrides)
    assert resumed.counters.step == 2
    assert resumed.fit() == 0
    aside = ckpts / "abandoned" / "1" / "step_00000003"
    why = "lacks meta.json: not a complete checkpoint, so not resumed from"
    assert f"note: step_00000003 {why}: moved to {aside}" in capsys.readouterr().out
    assert (aside / "state.pt").read_bytes() == state and not (aside / "meta.json").exists()
    assert [p.name for p in CheckpointManager(ckpts, keep=3).list()][-1] == "step_00000003"  # the new one

    for step in ("step_00000001", "step_00000002", "step_00000003"):  # none complete: a fresh start
        (ckpts / step / "config.toml").unlink()
    assert make(run, *overrides).fit() == 0
    assert "note: step_00000001 lacks config.toml" in capsys.readouterr().out
    assert sorted(p.name for p in (ckpts / "abandoned" / "2").iterdir()) == [
        "step_00000001", "step_00000002", "step_00000003"
    ]


def test_a_run_dir_in_use_is_refused_and_a_killed_runs_leftovers_are_cleaned_up(make, tmp_path):
    """A trainer holds a lock on its run dir while it trains (fit): a second process that would write the
    same run (another start, ranks that a killed torchrun left running) is refused in one line naming the
    holder, before it writes anything; the kernel drops the lock with its holder, a kill -9 included. A
    start cleans up after a killed run: the checkpoint a save was replacing is put back, atomic writes'
    temporary files go."""
    import os
    import subprocess
    import sys

    from seektrain.errors import UserError
    run = tmp_path / "run"
    base = ("checkpoint.every=1", "train.eval_every=0")
    assert make(run, *base, "train.steps=2").fit() == 0
    holder = subprocess.Popen(  # another process's trainer there, as far as the lock goes
        [sys.executable, "-c", f"from seektrain.paths import DirLock; DirLock({str(run)!r}, '').acquire(); "
         "print('held', flush=True); input()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline() == "held\n"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    in_use = rf"is in use by another seektrain process \(pid {holder.pid}\): "
    with pytest.raises(UserError, match=rf"^--run-dir {re.escape(str(run))} {in_use}"):
        make(run, *base, "train.steps=3")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    holder.communicate("")  # it ends, and the kernel drops its lock
    side_by_side = make(run, *base, "train.steps=3")  # in one process, trainers share it
    assert make(run, *base, "train.steps=3").fit() == 0 and side_by_side.counters.step == 2

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ckpts = run / "checkpoints"
    os.replace(ckpts / "step_00000003", ckpts / f".replaced-step_00000003-{dead.pid}")
    temp = run / f".config.toml.{dead.pid}-0123abcd.tmp"
    temp.write_text("cut short")
    resumed = make(run, *base, "train.steps=4")
    assert resumed.counters.step == 3 and not temp.exists()
    assert resumed.fit() == 0


def test_a_checkpoints_path_that_is_a_file_is_refused_before_any_work(make, tmp_path):
    """A run dir whose checkpoints/ is a file (or a folder that takes no files) is refused at the start,
    with the run's files untouched; it was found at the first save, after the run had started over and
    rewritten metrics.jsonl."""
    import shutil

    from seektrain.errors import UserError

    run = tmp_path / "run"
    assert make(run, "train.steps=2", "checkpoint.every=1", "train.eval_every=0").fit() == 0
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").write_text("x")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    refused = rf"^checkpoint directory {re.escape(str(run))}/checkpoints exists and is not a directory$"
    with pytest.raises(UserError, match=refused):
        make(run, "train.steps=3", "checkpoint.every=1", "train.eval_every=0")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_context_too_short_is_refused_before_the_default_corpus_is_prepared(tmp_path, monkeypatch):
    """A mistake in the config alone is found before `seektrain train` prepares the stdlib (~10-45 s)."""
    from seektrain.errors import UserError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"^data.seq_len=4096 is longer than the model's context, model.max_"):
        Trainer(load_config(overrides=["data.seq_len=4096"]), tmp_path / "run")
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


def test_only_a_second_ctrl_c_of_its_own_stops_a_process_at_once():
    """A repeated SIGTERM aborted the stop without its checkpoint, and so did a rank's own first Ctrl-C
    once the ranks' agreement had set the flag (torchrun: the terminal's Ctrl-C reaches every rank)."""
    import os
    import signal

    from seektrain.train.trainer import _SignalFlag

    def send(signum) -> bool:
        """Whether the signal stopped this process at once (KeyboardInterrupt, caught: not pytest's)."""
        try:
            os.kill(os.getpid(), signum)
        except KeyboardInterrupt:
            return True
        return False

    stop = _SignalFlag(announce=False)
    try:
        assert not send(signal.SIGTERM) and not send(signal.SIGTERM)  # a scheduler's repeat: nothing more
        assert stop.signum == signal.SIGTERM
        assert not send(signal.SIGINT)  # this process's first Ctrl-C: the stop under way goes on
        assert send(signal.SIGINT)  # Ctrl-C again: at once
    finally:
        stop.restore()
    agreed = _SignalFlag(announce=False)
    try:
        agreed.signum = signal.SIGINT  # set by the agreement: another rank got the signal
        assert not send(signal.SIGINT)  # this rank's own, a moment later
    finally:
        agreed.restore()


def test_a_sequence_too_short_for_multi_token_prediction_is_refused(make, tmp_path):
    """seq_len 1 with one MTP depth trained it on nothing and logged mtp_loss 0.0, a perfect-looking loss."""
    from seektrain.errors import UserError

    with pytest.raises(UserError, match=r"^data.seq_len=2 leaves multi-token prediction depth 2 no token"):
        make(tmp_path / "run", "data.seq_len=2", "model.num_mtp_layers=2")
    assert not (tmp_path / "run").exists()
    make(tmp_path / "run", "data.seq_len=2", "model.num_mtp_layers=1")  # one position to predict: trains


def test_a_model_too_big_for_host_memory_is_refused_before_the_default_corpus_is_prepared(
    tmp_path, monkeypatch
):
    """Was refused only once the stdlib was prepared for it (~10-45 s); the check counts the vocabulary
    the default corpus will have."""
    from seektrain.errors import UserError
    from seektrain.train import host_memory

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(host_memory, "available_host_memory", lambda: 8 << 20)  # tiny needs 135 MiB
    with pytest.raises(UserError, match=r"^the model: 8\.8 M parameters need 135 MiB of host memory"):
        Trainer(load_config(), tmp_path / "run")
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


def test_a_run_this_config_cannot_continue_is_refused_before_the_default_corpus_is_prepared(
    make, toy, tmp_path, monkeypatch
):
    """`seektrain train --run-dir RUN` of a run made with another config took the default config: it
    prepared the stdlib (~10-45 s, left in ./data) and only then said that the model differs."""
    from seektrain.errors import UserError

    run = tmp_path / "run"
    make(run, "train.steps=2", "checkpoint.every=2", "train.eval_every=0").fit()
    monkeypatch.chdir(tmp_path)
    defaults = [o for o in toy if not o.startswith("data.path=")]  # the toy model on the default corpus
    refused = r"^cannot resume from .*step_00000002: the model differs \(model.num_hidden_layers: checkpoint"
    with pytest.raises(UserError, match=refused):
        Trainer(load_config(overrides=[*defaults, "model.num_hidden_layers=3"]), run)
    with pytest.raises(UserError, match=r"^cannot resume from .*: optim.name was 'adamw', now 'lamb'"):
        Trainer(load_config(overrides=[*defaults, "optim.name=lamb"]), run)
    with pytest.raises(UserError, match=r"^cannot resume from .*: train.seed was 0, now 5 \(the run would"):
        Trainer(load_config(overrides=[*defaults, "train.seed=5"]), run)
    with pytest.raises(UserError, match=r"^cannot resume from .*: data.seq_len was 32, now 16 \(the run"):
        Trainer(load_config(overrides=[*defaults, "data.seq_len=16"]), run)
    assert not (tmp_path / "data").exists()
    # a checkpoint from before model.mtp_input reads as "unnormed" (with MTP), as the full check has it
    from seektrain.train.resume import check_before_data

    checkpoint = run / "checkpoints/step_00000002"
    config = checkpoint / "config.toml"
    lines = config.read_text().splitlines(keepends=True)
    config.write_text("".join(line for line in lines if "mtp_input" not in line))
    check_before_data(checkpoint, load_config(overrides=[*toy, "model.mtp_input=unnormed"]))
    with pytest.raises(UserError, match=r"model.mtp_input: checkpoint 'unnormed', now 'normed'"):
        check_before_data(checkpoint, load_config(overrides=toy))


def test_resume_accepts_model_fields_no_weight_depends_on(make, tmp_path):
    """An export then import fills in the BOS/PAD ids from the tokenizer; a resume with such a config (or
    another initializer_range, or other loss weights: MTP's λ, which train.mtp_weight_schedule changed on
    resume while model.mtp_loss_weight was refused, and the balance loss's α) continues, while a shape
    change is still refused."""
    import tomllib

    from seektrain.errors import UserError

    run = tmp_path / "run"
    base = ("train.steps=2", "checkpoint.every=2", "train.eval_every=0")
    assert make(run, *base).fit() == 0
    changed = ("model.bos_token_id=0", "model.pad_token_id=2", "model.initializer_range=0.5",
               "model.mtp_loss_weight=0.1", "model.seq_aux_loss_alpha=0.001")  # fmt: skip
    resumed = make(run, *base, "train.steps=3", *changed)
    assert resumed.counters.step == 2 and resumed.fit() == 0
    model = tomllib.loads((run / "config.toml").read_text())["model"]
    assert (model["bos_token_id"], model["pad_token_id"], model["initializer_range"]) == (0, 2, 0.5)
    assert (model["mtp_loss_weight"], model["seq_aux_loss_alpha"]) == (0.1, 0.001)
    assert train_lines(run)[-1]["mtp_weight"] == 0.1
    with pytest.raises(UserError, match="the model differs .*moe_intermediate_size"):
        make(run, *base, "train.steps=4", "model.moe_intermediate_size=16")


def test_a_checkpoint_from_before_mtp_input_resumes_only_as_it_was_trained(make, tmp_path):
    """Checkpoints from before `model.mtp_input` trained MTP on the pre-norm hidden state: they read as
    "unnormed", a resume under today's default is refused with the setting that continues them, and
    with it the run goes on; the weights load as such for eval and export too."""
    from seektrain.checkpoint.manager import STATE_FILE
    from seektrain.errors import UserError
    from seektrain.infer.runs import load_run

    run = tmp_path / "run"
    base = ("train.steps=2", "checkpoint.every=2", "train.eval_every=0")
    assert make(run, *base).fit() == 0
    path = run / "checkpoints" / "step_00000002" / STATE_FILE
    state = torch.load(path, weights_only=True)
    assert state["config"]["model"]["mtp_input"] == "normed"
    del state["config"]["model"]["mtp_input"]  # as written before the field existed
    torch.save(state, path)
    meta = json.loads((path.parent / "meta.json").read_text())
    del meta["files"]  # nor did meta.json list the files then
    (path.parent / "meta.json").write_text(json.dumps(meta))
    assert load_run(run).config.model_config().mtp_input == "unnormed"
    with pytest.raises(UserError, match=r"model\.mtp_input: checkpoint 'unnormed', now 'normed'.*"
                       r"--set model\.mtp_input=unnormed continues it as trained"):
        make(run, *base, "train.steps=3")
    config = re.escape(str(path.parent / "config.toml"))
    advice = rf"; use the same model config \(--config {config} has it\) or a new"
    with pytest.raises(UserError, match=r"moe_intermediate_size.*" + advice):
        make(run, *base, "train.steps=3", "model.moe_intermediate_size=16")  # not only the MTP input differs
    resumed = make(run, *base, "train.steps=3", "model.mtp_input=unnormed")
    assert resumed.counters.step == 2 and resumed.fit() == 0
    # without MTP modules nothing reads the setting: either value resumes
    plain = tmp_path / "plain"
    assert make(plain, *base, "model.num_mtp_layers=0").fit() == 0
    again = make(plain, *base, "train.steps=3", "model.num_mtp_layers=0", "model.mtp_input=unnormed")
    assert again.counters.step == 2


def test_optimizer_settings_changed_on_resume_take_effect(make, tmp_path):
    """Weight decay, betas and eps set anew on resume are the ones the optimizer uses (loading the
    checkpoint's optimizer state brings the old ones along), in both optimizers and both AdamW forms;
    changing the optimizer itself is refused. The learning rate is set every step anyway."""
    from seektrain.errors import UserError

    base = ("train.steps=2", "checkpoint.every=2", "train.eval_every=0")
    changed = ("optim.weight_decay=0.0", "optim.beta1=0.8", "optim.beta2=0.5", "optim.eps=1e-5")
    for optimizer in ("optim.state_dtype=fp32", "optim.state_dtype=bf16", "optim.name=lamb"):
        run = tmp_path / optimizer.replace("=", "-")
        assert make(run, *base, optimizer).fit() == 0
        resumed = make(run, *base, optimizer, "train.steps=3", *changed)
        assert resumed.counters.step == 2
        groups = resumed.optimizer.param_groups
        assert [g["weight_decay"] for g in groups] == [0.0, 0.0]
        assert {(g["betas"], g["eps"]) for g in groups} == {((0.8, 0.5), 1e-5)}
        assert all(s["exp_avg"].abs().sum() > 0 for s in resumed.optimizer.state.values())  # state kept
        assert resumed.fit() == 0
    with pytest.raises(UserError, match="optim.name was 'adamw', now 'lamb'"):
        make(tmp_path / "optim.state_dtype-fp32", *base, "train.steps=4", "optim.name=lamb")


def test_resume_refuses_another_token_stream_naming_the_setting_and_the_way_back(make, tmp_path, data_dir):
    """The data, the sequence length and the seed fix the token stream: a resume that changes one is
    refused with the setting, the checkpoint and the config that continues it. Nothing is written."""
    from seektrain.errors import UserError

    run = tmp_path / "run"
    base = ("train.steps=2", "checkpoint.every=2", "train.eval_every=0")
    assert make(run, *base).fit() == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    config = re.escape(str(run / "checkpoints" / "step_00000002" / "config.toml"))
    advice = rf"; use the run's settings \(--config {config} has them\) or start a new run in a new --run-dir"
    with pytest.raises(UserError, match=r"step_00000002: train\.seed was 0, now 7 \(the run would not "
                       r"continue the same token stream\)" + advice):
        make(run, *base, "train.steps=3", "train.seed=7")
    with pytest.raises(UserError, match=r"data\.seq_len was 32, now 16 .*" + advice):
        make(run, *base, "train.steps=3", "data.seq_len=16")
    other = prepare_other_sources(tmp_path / "other", data_dir, val_fraction=0.25)
    with pytest.raises(UserError, match=rf"trained on other data than data\.path='{re.escape(str(other))}' "
                       r"holds now \(another data dir.*" + advice):
        make(run, *base, "train.steps=3", f"data.path={other}")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_run_keeps_the_tokenizer_its_data_was_made_with(make, tmp_path, data_dir, capsys):
    """A new run keeps a copy of its data's tokenizer, which generate, eval and export read first: the run
    stays usable after its data dir is prepared again with another tokenizer (of the same size, which no
    vocabulary check would catch) or removed. A resume keeps the run's own copy. A data dir without its
    tokenizer, or with one that is not the one in its manifest, trains with a note and leaves none."""
    import shutil

    from seektrain.infer.runs import find_tokenizer, load_run

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    made_with = (data / "tokenizer.json").read_bytes()
    run = tmp_path / "run"
    assert make(run, f"data.path={data}", "train.steps=2", "train.eval_every=0").fit() == 0
    assert (run / "tokenizer.json").read_bytes() == made_with
    assert find_tokenizer(load_run(run)) == run / "tokenizer.json"

    (data / "tokenizer.json").write_bytes(made_with.replace(b'"type": "BPE"', b'"type":"BPE"'))
    assert make(run, f"data.path={data}", "train.steps=3", "train.eval_every=0").fit() == 0
    assert (run / "tokenizer.json").read_bytes() == made_with
    assert "note:" not in capsys.readouterr().out

    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "tokenizer.json").write_bytes(b"{}")  # left by an earlier run there
    assert make(stale, f"data.path={data}", "train.steps=1", "train.eval_every=0").fit() == 0
    out = capsys.readouterr().out
    assert f"note: {data / 'tokenizer.json'} is not the tokenizer {data}'s shards were made with" in out
    assert not (stale / "tokenizer.json").exists()

    (data / "tokenizer.json").unlink()
    bare = tmp_path / "bare"
    assert make(bare, f"data.path={data}", "train.steps=1", "train.eval_every=0").fit() == 0
    assert f"note: {data} has no tokenizer.json: generate and export of this run will need --tokenizer" in (
        capsys.readouterr().out
    )
    assert not (bare / "tokenizer.json").exists()


def test_a_damaged_validation_split_is_an_error_and_a_missing_one_a_note(make, tmp_path, data_dir, capsys):
    """The val split's shards are checked at the start, as the train split's are: a truncated one is one
    error (a run that silently logged no val_loss before); a data dir prepared without a val split trains,
    and says once that there will be no val_loss."""
    import shutil

    from seektrain.data.shards import load_manifest
    from seektrain.errors import UserError

    damaged = tmp_path / "damaged"
    shutil.copytree(data_dir, damaged)
    shard = damaged / load_manifest(damaged)["splits"]["val"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(UserError, match=rf"shard {re.escape(str(shard))} has \d+ bytes, the manifest says"):
        make(tmp_path / "run", f"data.path={damaged}")
    assert not (tmp_path / "run").exists()

    no_val = prepare_other_sources(tmp_path / "no_val", data_dir, val_fraction=0.0)
    run = tmp_path / "run2"
    assert make(run, f"data.path={no_val}", "train.steps=2", "train.eval_every=1").fit() == 0
    out = capsys.readouterr().out
    assert out.count(f"note: {no_val} has 0 validation tokens, fewer than seq_len + 1 = 33: no val_loss") == 1
    assert not [r for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r]


def test_resume_with_another_micro_batch_says_the_validation_set_changes(make, tmp_path, capsys):
    """`train.eval_batches` counts micro-batches: resuming with a smaller micro batch (as after running
    out of memory) makes val_loss average over fewer sequences. The resume says so, with the setting that
    keeps them; with it, the validation loss of the same weights is the same."""
    run = tmp_path / "run"
    base = ("train.steps=2", "checkpoint.every=2", "train.eval_every=0", "train.eval_batches=2")
    assert make(run, *base).fit() == 0
    capsys.readouterr()
    smaller = make(run, *base, "train.steps=3", "train.micro_batch_size=2")
    assert smaller.fit() == 0
    note = (
        "note: val_loss now averages over the first 4 validation sequences (train.eval_batches=2 × micro "
        "batch 2), the checkpoint's evaluations over 8: its curve may step here; --set train.eval_batches=4 "
        "scores the same ones"
    )
    assert note in capsys.readouterr().out
    step2 = str(run / "checkpoints" / "step_00000002")
    same = make(run, *base, "train.steps=3", "train.micro_batch_size=2", "train.eval_batches=4", resume=step2)
    assert same.notes == []
    before = make(run, *base, "train.steps=3", resume=step2).evaluate()
    assert same.evaluate() == pytest.approx(before, rel=1e-6)


def test_fp16_resumes_a_bf16_or_fp32_run_with_a_fresh_loss_scale(make, tmp_path):
    """A run started in fp32 (its checkpoint holds the disabled scaler's empty state) continues in fp16:
    the loss scale starts afresh, as in a new fp16 run; and back to fp32 from fp16."""
    run = tmp_path / "run"
    base = ("train.steps=2", "checkpoint.every=1", "train.eval_every=0", "train.device=cpu")
    assert make(run, *base, "train.precision=fp32").fit() == 0
    resumed = make(run, *base, "train.steps=3", "train.precision=fp16")
    fresh = make(tmp_path / "new", *base, "train.precision=fp16")
    assert resumed.counters.step == 2
    assert resumed.stepper.scaler.get_scale() == fresh.stepper.scaler.get_scale()
    assert resumed.fit() == 0
    again = make(run, *base, "train.steps=4", "train.precision=fp32")
    assert again.counters.step == 3 and not again.stepper.scaler.is_enabled()
    assert again.fit() == 0


def test_a_failing_write_during_the_loop_is_one_error_but_a_closed_stdout_is_not(make, tmp_path, monkeypatch):
    """An OSError out of the loop (a full disk under metrics.jsonl) becomes the one-line UserError naming
    the file; a BrokenPipeError (stdout's reader gone) passes through for the CLI's quiet exit 141."""
    from seektrain.errors import UserError

    tr = make(tmp_path / "run", "train.steps=2", "train.eval_every=0")

    def loop_raising(error):
        def loop(stop):
            raise error

        return loop

    full = OSError(28, "No space left on device", str(tmp_path / "run" / "metrics.jsonl"))
    monkeypatch.setattr(tr, "_loop", loop_raising(full))
    with pytest.raises(UserError, match=r"run/metrics.jsonl: No space left on device \(checkpoints"):
        tr.fit()
    monkeypatch.setattr(tr, "_loop", loop_raising(BrokenPipeError(32, "Broken pipe")))
    with pytest.raises(BrokenPipeError):
        tr.fit()


def test_the_first_step_of_a_start_is_left_out_of_the_logged_throughput(make, tmp_path, monkeypatch):
    """The first step after a start compiles and warms up (17 s of a GPU run's first window): with log
    lines every 4 steps, the first line's tokens/s is that of steps 2-4. Here the clock jumps 1000 s
    during the first step (a clock, not a sleep: the test holds on a busy machine too); counted in, the
    line could not exceed 4 × 256 tokens / 1000 s ≈ 1 token/s. A step alone in its window (log_every=1)
    still reports its own speed."""
    import time

    tr = make(tmp_path / "run", "train.steps=4", "train.log_every=4", "train.eval_every=0")
    forward_backward, calls = tr.stepper.forward_backward, []
    clock, jump = time.perf_counter, []
    monkeypatch.setattr(time, "perf_counter", lambda: clock() + sum(jump))

    def slow_first(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            jump.append(1000.0)
        return forward_backward(*args, **kwargs)

    monkeypatch.setattr(tr.stepper, "forward_backward", slow_first)
    assert tr.fit() == 0
    (line,) = train_lines(tmp_path / "run")
    assert line["step"] == 4 and line["tokens"] == 4 * 256 and line["tokens_per_s"] > 10
    alone = make(tmp_path / "alone", "train.steps=1", "train.log_every=1", "train.eval_every=0")
    assert alone.fit() == 0 and train_lines(tmp_path / "alone")[0]["tokens_per_s"] > 0


def nan_from(tr, first_step, times=None):
    """Patch the model so that training steps from `first_step` on give a NaN loss (`times` steps at most,
    counted per forward call)."""
    forward, calls = tr.model.forward, []

    def patched(x, y=None, **kw):
        out = forward(x, y, **kw)
        if tr.model.training and tr.counters.step + 1 >= first_step and (times is None or len(calls) < times):
            calls.append(1)
            out.main_loss_sum = out.main_loss_sum * math.nan
        return out

    tr.model.forward = patched


def test_a_run_that_stays_non_finite_stops_instead_of_finishing(make, tmp_path):
    """NaN from step 5 on, checkpoints every 2 steps (closer than max_bad_steps=5): the checkpoints due
    during the bad streak are put off, so every rollback lands on step 4 and the run stops at the rollback
    limit. (Saving them let each rollback land on a new diverged checkpoint, and the run ended 'done'.)"""
    from seektrain.errors import UserError

    run = tmp_path / "run"
    tr = make(run, "train.steps=30", "checkpoint.every=2", "checkpoint.keep=5", "train.eval_every=0")
    nan_from(tr, 5)
    with pytest.raises(UserError, match="rolled back to step 4 3 times"):
        tr.fit()
    assert max(int(p.name[5:]) for p in (run / "checkpoints").iterdir()) == 4


@pytest.mark.parametrize("eval_every, scored", [(5, "val_loss"), (0, "loss")])
def test_weights_that_diverge_with_a_finite_loss_are_rolled_back_not_saved(
    make, tmp_path, eval_every, scored
):
    """The learning rate jumps to 1e20 at step 10, a checkpoint step: step 10's own loss, computed before
    its update, is finite, but the loss after it is not. Those weights used to be saved as step_00000010,
    which every rollback then reloaded into the same NaN, and so did a resume with a lower lr. Now the
    step rolls back to step 5 at once, told by val_loss where the step evaluates, else by the loss of its
    first micro-batch scored again; at the rollback limit the run stops with step 5 its newest checkpoint,
    and a resume with a sane lr trains on from there."""
    from seektrain.errors import UserError

    run = tmp_path / "run"
    jump = ("optim.lr=1e20", "optim.weight_decay=0", "optim.schedule=multistep",
            "optim.multistep_milestones=[[0, 3e-23], [0.45, 1]]")  # fmt: skip
    base = ("train.precision=fp32", "optim.warmup_steps=0", "train.spike_zscore=0", "train.max_bad_steps=2",
            "checkpoint.every=5", f"train.eval_every={eval_every}", "train.steps=20")  # fmt: skip
    limit = rf"rolled back to step 5 3 times .*\({scored} nan after the update\)"
    with pytest.raises(UserError, match=limit):
        make(run, *base, *jump).fit()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000005"]
    events = [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "rollback"]
    assert [(e["at_step"], e["checkpoint"]) for e in events] == [(10, "step_00000005")] * 3
    calmer = make(run, *base, "optim.lr=3e-3", "optim.schedule=constant", "train.steps=12")
    assert calmer.counters.step == 5 and calmer.fit() == 0
    assert math.isfinite(train_lines(run)[-1]["loss"])


def stop_at(tr, step):
    """Make the loop see a SIGTERM at the end of `step`, as its signal handler would set it."""
    import signal

    def stopping(stop):
        if tr.counters.step == step:
            stop.signum = signal.SIGTERM
        return stop.signum is not None

    tr._stopping = stopping


def test_a_stop_does_not_save_weights_that_diverged_behind_a_finite_loss(make, tmp_path):
    """A signal at a step without a scheduled checkpoint writes the resume point: where that step's update
    diverged the weights (its own loss, computed before, finite), it rolls back to the last checkpoint
    instead (the rollback writes one there), so the resume point is not a checkpoint no rollback gets
    past."""
    import signal

    run = tmp_path / "run"
    jump = ("optim.lr=1e20", "optim.weight_decay=0", "optim.schedule=multistep",
            "optim.multistep_milestones=[[0, 3e-23], [0.45, 1]]")  # fmt: skip
    tr = make(run, *jump, "train.precision=fp32", "optim.warmup_steps=0", "train.spike_zscore=0",
              "checkpoint.every=7", "train.eval_every=0", "train.steps=20")  # fmt: skip
    stop_at(tr, 10)
    assert tr.fit() == 128 + signal.SIGTERM
    events = [r for r in read_metrics(run / "metrics.jsonl") if "event" in r]
    assert [(e["event"], e["step"]) for e in events] == [("rollback", 7), ("stopped", 7)]
    assert events[0]["at_step"] == 10 and events[0]["reason"] == "loss nan after the update"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000007"]


def test_a_stop_during_a_bad_streak_rolls_back_rather_than_saving_its_weights(make, tmp_path):
    """Steps from 5 on are non-finite (skipped), and a signal comes at step 6: the resume point is the last
    checkpoint's weights with the data position, written by a rollback, not the weights that give NaN
    (with checkpoint.keep=1 those replaced the only good checkpoint)."""
    import signal

    run = tmp_path / "run"
    tr = make(run, "checkpoint.every=4", "checkpoint.keep=1", "train.eval_every=0", "train.max_bad_steps=10",
              "train.steps=20")  # fmt: skip
    nan_from(tr, 5)
    stop_at(tr, 6)
    assert tr.fit() == 128 + signal.SIGTERM
    events = [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") in ("rollback", "stopped")]
    assert [(e["event"], e["step"]) for e in events] == [("rollback", 4), ("stopped", 4)]
    assert events[0]["reason"] == "stopped after 2 non-finite steps"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004"]


def test_a_run_another_trainer_started_in_a_new_run_dir_meanwhile_is_not_started_over(make, tmp_path):
    """Two starts on a run dir that does not exist yet: the one that gets to `fit` second finds a run there
    that it did not see at its start, and is refused rather than starting a new run over it."""
    from seektrain.errors import UserError

    run = tmp_path / "run"
    late = make(run, "train.steps=2", "train.eval_every=0")
    assert make(run, "train.steps=2", "train.eval_every=0").fit() == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match=r"was not there when this run started, and another trainer has"):
        late.fit()
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_reader_takes_the_next_newest_checkpoint_when_retention_removes_the_one_it_reads(
    make, tmp_path, monkeypatch
):
    """generate/eval/export on a run in training: retention may delete the newest checkpoint while it is
    read (a sharded one takes a while); the reader then takes the newest again instead of failing."""
    import shutil

    import seektrain.infer.runs as runs

    run = tmp_path / "run"
    overrides = ("train.steps=3", "checkpoint.every=1", "checkpoint.keep=2", "train.eval_every=0")
    assert make(run, *overrides).fit() == 0
    read, reads = runs.load_checkpoint, []

    def retention_strikes_first(path, **kw):
        reads.append(path.name)
        if len(reads) == 1:
            shutil.rmtree(path)  # as the trainer's retention does, mid-read
        return read(path, **kw)

    monkeypatch.setattr(runs, "load_checkpoint", retention_strikes_first)
    assert runs.load_run(run).step == 2 and reads == ["step_00000003", "step_00000002"]


def test_the_rollback_limit_counts_across_a_resume(make, tmp_path):
    """The rollbacks to one checkpoint are counted in the checkpoints, so a run that stopped at the limit
    and is resumed (or one interrupted between rollbacks) does not get three more: resumed into the same
    divergence, it stops at its first rollback, as the uninterrupted run would have."""
    from seektrain.errors import UserError

    run = tmp_path / "run"
    overrides = ("train.steps=30", "checkpoint.every=2", "checkpoint.keep=5", "train.eval_every=0")
    tr = make(run, *overrides)
    nan_from(tr, 5)
    with pytest.raises(UserError, match="rolled back to step 4 3 times"):
        tr.fit()
    events = [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "rollback"]
    resumed = make(run, *overrides)
    assert resumed.counters.step == 4 and resumed.rollback_targets == {4: 3}
    nan_from(resumed, 5)
    with pytest.raises(UserError, match="rolled back to step 4 3 times"):
        resumed.fit()
    assert [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "rollback"] == events


def test_a_checkpoint_put_off_by_a_bad_streak_is_not_written_after_its_rollback(make, tmp_path):
    """Steps 5.. are non-finite until the guard rolls back to step 4 (which writes a checkpoint); the
    checkpoints put off during the streak are not owed any more: the run goes on saving on schedule."""
    run = tmp_path / "run"
    tr = make(run, "train.steps=10", "checkpoint.every=2", "checkpoint.keep=10", "train.eval_every=0")
    nan_from(tr, 5, times=2 * tr.cfg.train.max_bad_steps)  # two micro-batches per step
    assert tr.fit() == 0 and tr.counters.rollbacks == 1
    saved = sorted(int(p.name[5:]) for p in (run / "checkpoints").iterdir())
    assert saved == [2, 4, 6, 8, 10]


def test_a_non_finite_last_step_rolls_back_rather_than_ending_the_run(make, tmp_path):
    run = tmp_path / "run"
    tr = make(run, "train.steps=6", "checkpoint.every=4", "train.eval_every=0")
    nan_from(tr, 6, times=2)  # step 6's two micro-batches, once
    assert tr.fit() == 0
    rollbacks = [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "rollback"]
    assert len(rollbacks) == 1 and rollbacks[0]["at_step"] == 6 and "last step" in rollbacks[0]["reason"]
    assert tr.counters.step == 6 and all(torch.isfinite(p).all() for p in tr.model.parameters())


def test_a_resume_rewrites_older_bare_nan_lines_as_strict_json(tmp_path):
    """metrics.jsonl of a run from before the strict-JSON change holds bare NaN; the lines a resume keeps
    come back strict, and the lines past the checkpoint (and a line cut by a kill) go."""
    from seektrain.train.metrics import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    lines = ['{"step": 1, "loss": NaN}', '{"step": 2, "loss": 2.5}', '{"step": 3, "loss": 2.0}', '{"st']
    path.write_text("\n".join(lines))
    truncate_metrics(path, keep_through_step=2)
    assert path.read_text() == '{"step": 1, "loss": null}\n{"step": 2, "loss": 2.5}\n'


@pytest.mark.skipif(torch.cuda.is_available(), reason="refused only off a GPU")
def test_cuda_graphs_off_a_gpu_are_refused_before_anything_is_written(make, tmp_path):
    """inductor would only skip recording them (and say so in a log); the setting is refused instead."""
    from seektrain.errors import UserError

    with pytest.raises(UserError, match="train.cuda_graphs needs a CUDA GPU; this run is on cpu"):
        make(tmp_path / "run", "train.compile=true", "train.cuda_graphs=true")
    assert not (tmp_path / "run").exists()


def test_a_model_too_big_for_host_memory_is_refused_before_it_is_built(make, tmp_path, monkeypatch):
    from seektrain.errors import UserError
    from seektrain.train import host_memory

    monkeypatch.setattr(host_memory, "available_host_memory", lambda: 1 << 20)
    want = r"the model: .* M parameters need \d+ MiB of host memory .*1 MiB is available \(use a smaller"
    with pytest.raises(UserError, match=want):
        make(tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_special_token_ids_come_from_the_data_unless_set(make, tmp_path):
    """v2-lite's preset ids (BOS 100000, EOS 100001) belong to DeepSeek's tokenizer: trained on other data
    (here 512 tokens) the run takes BOS, EOS and PAD from the data's tokenizer (was: an invalid config,
    BOS outside the vocabulary); an explicit id is kept."""
    trainer = make(tmp_path / "v2", "model.preset=v2-lite", "model.n_routed_experts=8", "model.n_group=2")
    model = trainer.model_cfg
    assert (model.bos_token_id, model.eos_token_id, model.pad_token_id) == (0, 1, 2)
    explicit = make(tmp_path / "tiny", "model.pad_token_id=none").model_cfg
    assert (explicit.bos_token_id, explicit.pad_token_id) == (0, None)


def test_a_run_config_built_in_python_is_validated_like_a_loaded_one(tmp_path):
    from seektrain.config import RunConfig, TrainConfig
    from seektrain.errors import UserError

    cfg = RunConfig(train=TrainConfig(micro_batch_size=0))  # was a ZeroDivisionError deep in setup
    with pytest.raises(UserError, match="train.micro_batch_size"):
        Trainer(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_warmup_longer_than_the_run_is_warned_about(make, tmp_path, capsys):
    make(tmp_path / "run", "train.steps=3", "optim.warmup_steps=5", "train.eval_every=0").fit()
    out = capsys.readouterr().out
    assert "warning: optim.warmup_steps=5 > train.steps=3: the learning rate never reaches optim.lr" in out
    make(tmp_path / "other", "train.steps=3", "optim.warmup_steps=3", "train.eval_every=0").fit()
    assert "warning" not in capsys.readouterr().out


def test_a_model_vocabulary_smaller_than_the_datas_tokenizer_is_refused_with_the_way_out(make, tmp_path):
    """A config whose model has its own, smaller vocabulary (an import without --data keeps a preset's
    data.path) names both sizes, the data dir and what to change."""
    from seektrain.errors import UserError

    with pytest.raises(
        UserError,
        match=r"model\.vocab_size=100 is smaller than the tokenizer's 512 \(data\.path=.*\): train on data "
        r"prepared with the model's own tokenizer .* or raise or drop model\.vocab_size",
    ):
        make(tmp_path / "run", "model.vocab_size=100")
    assert not (tmp_path / "run").exists()


def tensorboard_losses(run_dir) -> dict[int, float]:
    """train/loss by step as TensorBoard shows it: every event file of RUN/tb read in order, purges
    applied (tensorboard's own reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), purge_orphaned_data=True)
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train/loss")}


def test_tensorboard_shows_each_step_once_even_after_a_resume_without_it(make, tmp_path):
    """A resume from an older checkpoint purges the later TensorBoard events; with `log.tensorboard=false`
    on that resume nothing was written, so the abandoned run's curves stayed in tb/ for good, and differed
    from metrics.jsonl once TensorBoard was turned on again."""
    run = tmp_path / "run"
    common = ("log.tensorboard=true", "train.eval_every=0", "train.log_every=1", "checkpoint.every=4",
              "checkpoint.keep=5", "train.precision=fp32")  # fmt: skip
    assert make(run, *common, "train.steps=8").fit() == 0
    branch = make(run, *common, "train.steps=8", "optim.lr=1e-3", "log.tensorboard=false",
                  resume=str(run / "checkpoints" / "step_00000004"))  # fmt: skip
    assert branch.fit() == 0
    assert make(run, *common, "train.steps=10", "optim.lr=1e-3").fit() == 0
    logged = {r["step"]: r["loss"] for r in train_lines(run)}
    shown = tensorboard_losses(run)  # steps 5-8 as the branch trained them went untracked
    assert sorted(logged) == list(range(1, 11)) and sorted(shown) == [1, 2, 3, 4, 9, 10]
    for step, loss in shown.items():
        assert loss == pytest.approx(logged[step], rel=1e-6), step
