"""Export to a transformers directory, greedy parity with transformers' generate, import back, resume."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors import safe_open

from seektrain import cli
from seektrain.config import load_config
from seektrain.errors import UserError
from seektrain.export import export_run, import_hf
from seektrain.infer.generate import SamplingConfig, generate
from seektrain.infer.runs import load_run

from .conftest import one_thread

transformers = pytest.importorskip("transformers")

PROMPT = 'class JSONDecoder(object):\n    """'
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "hf"
    with one_thread():
        export_run(trained_run, out, dtype="fp32")
    return out


def test_export_layout(exported):
    names = sorted(p.name for p in exported.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
                     "tokenizer.json", "tokenizer_config.json"]  # fmt: skip
    gen = json.loads((exported / "generation_config.json").read_text())
    config = json.loads((exported / "config.json").read_text())
    assert gen["eos_token_id"] == config["eos_token_id"] == 1  # <|eos|>, the data's document separator
    assert not list(exported.parent.glob(".*"))  # no temporary directory left beside it


def test_greedy_generate_matches_transformers_token_for_token(trained_run, exported, seektrain):
    """64 greedy tokens from our latent-cache decoder equal transformers' `generate(do_sample=False)` on the
    exported directory. Greedy equality is only meaningful where the top-2 logits are not near-tied:
    we check that the two implementations' logits agree to far less than the smallest top-2 gap along
    the generated sequence, so a match is forced by the logits and not by luck (and a mismatch is a bug)."""
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(exported)
    ours = load_run(trained_run).model
    from tokenizers import Tokenizer

    prompt = Tokenizer.from_file(str(exported / "tokenizer.json")).encode(PROMPT).ids
    assert hf_tok(PROMPT)["input_ids"] == prompt  # the exported tokenizer encodes as ours does

    with one_thread(), torch.no_grad():
        new = list(
            generate(ours, prompt, SamplingConfig(NEW_TOKENS, temperature=0), eos_id=ours.cfg.eos_token_id)
        )
        hf_out = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS)
        hf_new = hf_out[0, len(prompt) :].tolist()
        seq = torch.tensor([prompt + new])
        ours_logits = ours(seq).logits[0, len(prompt) - 1 : -1]  # the logits each new token was chosen from
        hf_logits = hf_model(seq).logits[0, len(prompt) - 1 : -1]
    assert len(new) == NEW_TOKENS and len(set(new)) > 1  # not one repeated token
    top2 = ours_logits.topk(2, dim=-1).values
    min_gap = (top2[:, 0] - top2[:, 1]).min().item()
    max_diff = (ours_logits - hf_logits).abs().max().item()
    assert max_diff < 1e-4  # fp32 on both sides: only accumulation order differs
    assert min_gap > 2 * max_diff, f"near-tie (gap {min_gap:.2e}): this prompt cannot test greedy parity"
    assert new == hf_new

    code, out, err = seektrain("generate", "--run", trained_run, "--prompt", PROMPT, "--temperature", "0",
                               "--max-new-tokens", NEW_TOKENS)  # fmt: skip
    assert code == 0, err
    assert out == PROMPT + hf_tok.decode(hf_new, skip_special_tokens=True) + "\n"


def test_sharded_bf16_export_loads_in_transformers(trained_run, tmp_path):
    out = tmp_path / "hf_bf16"
    with one_thread():
        export_run(trained_run, out, dtype="bf16", max_shard_bytes=1 << 20)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    with safe_open(out / shards[0], "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys() if not k.endswith("e_score_correction_bias")}  # noqa: SIM118
    assert dtypes == {"BF16"}
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto").eval()
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    ours = load_run(trained_run).model
    torch.testing.assert_close(hf.lm_head.weight.float(), ours.lm_head.weight.to(torch.bfloat16).float())


def test_export_refuses_a_non_empty_target_and_leaves_it_alone(trained_run, tmp_path, seektrain):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    code, out, err = seektrain("export", "--run", trained_run, "--out", target)
    assert code == 2 and err.startswith("error: ") and "not empty" in err and len(err.splitlines()) == 1
    assert [p.name for p in target.iterdir()] == ["notes.txt"] and (
        target / "notes.txt"
    ).read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no temp dir either
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = seektrain("export", "--run", trained_run, "--out", empty, "--dtype", "fp32")
    assert code == 0, err
    assert (empty / "config.json").is_file()


def test_export_and_import_refuse_the_current_folder_at_once(trained_run, tmp_path, seektrain, monkeypatch):
    """`--out .` in an empty folder did the whole job in a temp dir inside `.` itself, which then was not
    empty, and ended in a misleading "not empty"; the rename would have replaced the shell's folder."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for argv in (["export", "--run", trained_run, "--out", "."], ["import", "--hf", here, "--out", "."]):
        code, _, err = seektrain(*argv)
        assert code == 2 and err.startswith("error: ") and "is the current folder" in err, err
        assert len(err.splitlines()) == 1 and not any(here.iterdir())


def test_eval_on_a_folder_that_is_no_data_dir_says_what_to_run(trained_run, tmp_path, seektrain):
    """`eval --data` with a missing path or a folder of raw text said "no tokenizer.json; pass --data DIR",
    which the user had: now what the path is, and what to give instead (never to replace the folder)."""
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.py").write_text("print(1)\n")
    for folder, what in [("missing", "does not exist"), ("raw", "is not a prepared data dir (no manifest")]:
        code, _, err = seektrain("eval", "--run", trained_run, "--data", tmp_path / folder)
        assert code == 2 and err.startswith(f"error: {tmp_path / folder} {what}"), err
        assert "give a data dir that `seektrain prepare` made" in err and len(err.splitlines()) == 1


def test_eval_generate_and_export_cap_cpu_threads_as_the_trainer_does(trained_run, tmp_path, monkeypatch):
    """torch's default is a thread per core of the affinity; under a cgroup quota of fewer CPUs the extra
    threads wait at every op (here: a quota of one CPU's time, and two threads before each command)."""
    from seektrain import host_limits

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(host_limits, "usable_cpus", lambda *where: 1)
    before = torch.get_num_threads()
    try:
        for argv in (["eval", "--run", trained_run, "--max-batches", "1"],
                     ["generate", "--run", trained_run, "--prompt", "x", "--max-new-tokens", "1"],
                     ["export", "--run", trained_run, "--out", tmp_path / "hf"]):  # fmt: skip
            torch.set_num_threads(2)
            assert cli.main([str(a) for a in argv]) == 0
            assert torch.get_num_threads() == 1, argv[0]
        torch.set_num_threads(2)  # a library call leaves its caller's threads alone
        load_run(trained_run, device="cpu")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_export_of_a_run_without_checkpoints_is_a_user_error(tmp_path, seektrain):
    run = tmp_path / "runs" / "fresh"
    run.mkdir(parents=True)
    (run / "config.toml").write_text("")
    code, _, err = seektrain("export", "--run", run, "--out", tmp_path / "out")
    assert code == 2 and "has no checkpoints" in err
    assert not (tmp_path / "out").exists()
    code, _, err = seektrain("eval", "--run", tmp_path / "missing")
    assert code == 2 and "does not exist" in err
    (tmp_path / "afile").write_text("")
    code, _, err = seektrain("eval", "--run", tmp_path / "afile")
    assert code == 2 and "is not a directory" in err


def test_import_round_trip_keeps_every_weight(trained_run, exported, data_dir, tmp_path, seektrain):
    run = tmp_path / "imported"
    code, out, err = seektrain("import", "--hf", exported, "--out", run)
    assert code == 0, err
    original = load_run(trained_run).model.state_dict()
    imported = load_run(run)
    assert imported.step == 0 and (run / "tokenizer.json").is_file() and (run / "config.toml").is_file()
    state = imported.model.state_dict()
    assert state.keys() == original.keys()  # MTP modules included: the export carries them
    for name, t in original.items():
        assert torch.equal(state[name], t), name
    code, out, err = seektrain("generate", "--run", run, "--prompt", PROMPT, "--temperature", "0",
                               "--max-new-tokens", "8")  # fmt: skip
    assert code == 0, err
    code, _, err = seektrain("import", "--hf", exported, "--out", run)  # now non-empty
    assert code == 2 and "not empty" in err
    checkpoint = run / "checkpoints" / "step_00000000"  # another run's eval of it names it, not that run
    code, _, err = seektrain("eval", "--run", trained_run, "--checkpoint", checkpoint)
    assert code == 2 and err == f"error: checkpoint {checkpoint} was imported without data: pass --data DIR\n"
    # weights only: training from it is refused with one clear line, not a traceback
    code, _, err = seektrain("train", "--config", run / "config.toml", "--run-dir", run,
                             "--set", f'data.path="{data_dir}"', "--set", "log.progress=false")  # fmt: skip
    assert code == 2 and "re-import with `seektrain import --data DIR`" in err and len(err.splitlines()) == 1
    assert load_run(run).step == 0 and len(list((run / "checkpoints").iterdir())) == 1


def test_import_with_data_gives_a_run_that_train_resumes(exported, data_dir, tmp_path):
    from seektrain.train.trainer import Trainer

    run = tmp_path / "finetune"
    overrides = [
        "data.seq_len=64",
        "train.steps=2",
        "train.micro_batch_size=4",
        "train.global_batch_size=4",
        "train.eval_every=0",
        "train.eval_batches=1",
        "train.precision=fp32",  # the preset's auto would depend on this CPU
        "log.progress=false",
        "log.tensorboard=false",
    ]
    with one_thread():
        import_hf(exported, run, data=data_dir, overrides=overrides)
        trainer = Trainer(load_config(config=run / "config.toml"), run, resume="auto")
        assert trainer.resume_from is not None and trainer.counters.step == 0
        hf_weights = load_run(run).model.state_dict()
        for name, t in trainer.model.state_dict().items():
            assert torch.equal(t.cpu(), hf_weights[name]), name
        assert trainer.fit() == 0
    assert load_run(run).step == 2


def test_import_errors(exported, tmp_path, other_data_dir):
    with pytest.raises(UserError, match="no config.json"):
        import_hf(tmp_path, tmp_path / "r1")
    with pytest.raises(UserError, match="cannot be overridden"):
        import_hf(exported, tmp_path / "r2", overrides=["model.hidden_size=8"])
    with pytest.raises(UserError, match="another tokenizer"):
        import_hf(exported, tmp_path / "r3", data=other_data_dir)
    assert not any((tmp_path / name).exists() for name in ("r1", "r2", "r3"))


def oversized_tokenizer(data_dir, where):
    """The data's tokenizer with 100 tokens added: more than the model trained on it can embed."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(data_dir / "tokenizer.json"))
    tok.add_tokens([f"<extra_{i}>" for i in range(100)])
    tok.save(str(where))
    return where, tok.get_vocab_size(with_added_tokens=True)


def test_generate_and_export_refuse_a_tokenizer_larger_than_the_model(
    trained_run, data_dir, tmp_path, seektrain
):
    """A tokenizer with more tokens than the model's vocabulary is not the one it was trained with: its
    extra ids would index past the embedding (generate used to end in an IndexError traceback, export
    wrote a directory transformers cannot use)."""
    big, size = oversized_tokenizer(data_dir, tmp_path / "big.json")
    want = f"has {size} tokens, more than the model's vocab_size 512"
    for argv in (
        ("generate", "--run", trained_run, "--prompt", "def", "--tokenizer", big),
        ("export", "--run", trained_run, "--out", tmp_path / "hf", "--tokenizer", big),
    ):
        code, out, err = seektrain(*argv)
        assert code == 2 and out == "" and len(err.splitlines()) == 1 and want in err, err
    assert not (tmp_path / "hf").exists()


def test_a_run_imported_without_tokenizer_evaluates_and_exports_with_one_given(
    exported, data_dir, tmp_path, seektrain
):
    """The import's note says how to use such a run: eval takes the data's tokenizer, export and
    generate take --tokenizer."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in exported.iterdir():
        if f.name != "tokenizer.json":
            (bare / f.name).write_bytes(f.read_bytes())
    run = tmp_path / "run"
    code, out, err = seektrain("import", "--hf", bare, "--out", run)
    assert code == 0 and "give generate and export `--tokenizer FILE`, and eval `--data DIR`" in out, err
    code, out, err = seektrain("eval", "--run", run, "--data", data_dir, "--max-batches", "1")
    assert code == 0 and math.isfinite(json.loads(out)["val_loss"]), err
    code, out, err = seektrain(
        "export", "--run", run, "--out", tmp_path / "hf", "--tokenizer", data_dir / "tokenizer.json"
    )
    assert code == 0, err
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (data_dir / "tokenizer.json").read_bytes()
    code, out, err = seektrain("export", "--run", run, "--out", tmp_path / "hf2")
    assert code == 2 and "no tokenizer for" in err and not (tmp_path / "hf2").exists()


def test_import_of_damaged_weights_is_one_error_line(exported, tmp_path, seektrain):
    """A truncated safetensors file or an index that is not JSON: one error line, no run directory."""
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for f in exported.iterdir():
        data = f.read_bytes()
        (truncated / f.name).write_bytes(data[:100] if f.name == "model.safetensors" else data)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for f in exported.iterdir():
        if f.name != "model.safetensors":
            (sharded / f.name).write_bytes(f.read_bytes())
    (sharded / "model.safetensors.index.json").write_text('{"weight_map": ')
    cases = {truncated: "cannot be read as safetensors", sharded: "is not a safetensors index"}
    for src, words in cases.items():
        code, out, err = seektrain("import", "--hf", src, "--out", tmp_path / f"run_{src.name}")
        assert code == 2 and len(err.splitlines()) == 1 and words in err, err
        assert not (tmp_path / f"run_{src.name}").exists()


def test_export_and_import_into_a_folder_that_cannot_be_written_are_one_error_line(
    trained_run, exported, seektrain
):
    """A folder without write permission (or, as here, where the tests run as root, a special filesystem)
    used to end in a traceback from the temp directory's mkdir."""
    for argv in (
        ("export", "--run", trained_run, "--out", "/proc/seektrain_test_export"),
        ("import", "--hf", exported, "--out", "/proc/seektrain_test_import"),
    ):
        code, out, err = seektrain(*argv)
        assert code == 2 and out == "" and len(err.splitlines()) == 1, err
        assert err.startswith(f"error: cannot write {argv[-1]}: "), err


@pytest.mark.parametrize("size", ["inf", "nan", "0", "-1"])
def test_max_shard_gb_must_be_a_finite_positive_number(trained_run, tmp_path, seektrain, size):
    argv = ["export", "--run", trained_run, "--out", tmp_path / "hf", "--max-shard-gb", size]
    code, out, err = seektrain(*argv)
    assert code == 2 and len(err.splitlines()) == 1 and "--max-shard-gb must be a finite positive" in err, err
    assert not list(tmp_path.iterdir())


def test_import_of_a_config_that_is_not_a_json_object_is_one_error_line(exported, tmp_path, seektrain):
    src = tmp_path / "listed"
    src.mkdir()
    for f in exported.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    (src / "config.json").write_text("[1, 2]\n")
    code, out, err = seektrain("import", "--hf", src, "--out", tmp_path / "run")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"{src / 'config.json'} is not a JSON object" in err
    assert not (tmp_path / "run").exists()


def test_sigterm_during_export_removes_the_temp_directory(trained_run, tmp_path):
    """SIGTERM (kill, a scheduler) is handled as Ctrl-C is: the hidden temp directory goes, exit 143.
    One shard per tensor keeps the export writing for about a second after its temp directory appears."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "hf"
    argv = ["export", "--run", trained_run, "--out", out, "--max-shard-gb", "1e-9", "--dtype", "fp32"]
    for _ in range(3):  # on a loaded machine this process may not look again before the export is done
        command = [sys.executable, "-m", "seektrain", *map(str, argv)]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".hf.tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        if not out.exists():
            break
        shutil.rmtree(out)  # finished before the signal came: again
    err = proc.stderr.read().decode()
    assert code == 128 + signal.SIGTERM and err == "terminated\n", (code, err)
    assert not list(tmp_path.iterdir())  # neither the target nor a temp directory


def test_export_removes_what_a_killed_one_left(trained_run, tmp_path, seektrain):
    """A SIGKILLed export cannot clean up: the next export to that target removes its temp directory
    (as prepare does), and leaves one of a live process alone."""
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    stale = tmp_path / f".hf.tmp-{int(dead.stdout)}"
    (stale / "checkpoints").mkdir(parents=True)
    live = tmp_path / f".hf.tmp-{os.getppid()}"
    live.mkdir()
    swapped = tmp_path / f".hf.old-{int(dead.stdout)}"  # a killed prepare's previous data: not export's
    swapped.mkdir()
    (swapped / "manifest.json").write_text("{}")
    code, out, err = seektrain("export", "--run", trained_run, "--out", tmp_path / "hf", "--dtype", "fp32")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["hf", live.name, swapped.name])


def test_a_write_that_fails_halfway_is_one_error_line_and_leaves_nothing(trained_run, tmp_path):
    """A full disk, simulated by a 1 MiB limit on file size (RLIMIT_FSIZE, with SIGXFSZ ignored so the
    write fails with EFBIG instead of killing the process): one error line, no temp directory left."""
    import subprocess
    import sys

    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
        "from seektrain.cli import main\n"
        f"sys.exit(main(['export', '--run', {str(trained_run)!r}, '--out', {str(tmp_path / 'hf')!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"error: cannot write {tmp_path / 'hf'}: ") and "too large" in proc.stderr
    assert not list(tmp_path.iterdir())
