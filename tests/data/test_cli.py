"""`seektrain prepare` through the real CLI dispatcher: a summary on success, one `error:` line and exit 2
on bad input."""

import gzip
import json
import os
import pathlib
import shutil
import sys
import tempfile

import pytest
from data_helpers import make_docs, write_corpus

from file_limits import file_size_limit
from seektrain import cli


@pytest.fixture
def run(monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", {"prepare": "prepare"})  # only this verb: others may not exist yet

    def _run(*argv):
        rc = cli.main(["prepare", *map(str, argv), "--no-progress", "--workers", "1"])
        out, err = capsys.readouterr()
        return rc, out, err

    return _run


def _assert_one_error(result, pattern):
    rc, _, err = result
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and pattern in lines[0], err


def test_prepare_prints_summary(run, tmp_path):
    src = write_corpus(tmp_path / "src", make_docs(30, seed=4))
    rc, out, _ = run("--input", src, "--out", tmp_path / "d", "--vocab-size", 300, "--dedup", "minhash")
    assert rc == 0
    assert f"prepared {tmp_path / 'd'}" in out and "tokens    train" in out and len(out.splitlines()) <= 20
    assert json.loads((tmp_path / "d/manifest.json").read_text())["options"]["dedup"] == "minhash"


def test_bad_inputs_give_one_error_line(run, tmp_path):
    out = tmp_path / "d"
    _assert_one_error(run("--input", tmp_path / "missing", "--out", out), "input not found")
    write_corpus(tmp_path / "short", ["a", "b"])
    _assert_one_error(run("--input", tmp_path / "short", "--out", out), "empty corpus after filtering")
    (tmp_path / "x.parquet").write_bytes(b"PAR1 this is not parquet")
    _assert_one_error(run("--input", tmp_path / "x.parquet", "--out", out), "cannot read Parquet")
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\nnot json\n')
    _assert_one_error(run("--input", tmp_path / "x.jsonl", "--out", out), "x.jsonl:2")
    write_corpus(tmp_path / "good", make_docs(3))
    (tmp_path / "tok.json").write_text("{ broken")
    _assert_one_error(
        run("--input", tmp_path / "good", "--tokenizer", tmp_path / "tok.json", "--out", out),
        "does not parse",
    )
    _assert_one_error(
        run("--input", tmp_path / "good", "--tokenizer", tmp_path / "nope.json", "--out", out),
        f"tokenizer file not found: {tmp_path / 'nope.json'}",
    )
    _assert_one_error(
        run("--input", tmp_path / "good", "--tokenizer", tmp_path, "--out", out),
        f"tokenizer file is a directory: {tmp_path}",
    )
    _assert_one_error(
        run("--input", tmp_path / "good", "--val-fraction", 1.5, "--out", out), "--val-fraction"
    )
    assert not out.exists()


def test_a_failed_prepare_removes_the_folders_it_created_for_out(run, tmp_path):
    """An interrupted first `seektrain train` left an empty ./data behind: the folders made to hold --out
    go when the build fails, those that were there stay."""
    write_corpus(tmp_path / "short", ["a", "b"])  # fails after the folders are made: nothing survives
    _assert_one_error(run("--input", tmp_path / "short", "--out", tmp_path / "x/y/out"), "empty corpus")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short"]
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    _assert_one_error(run("--input", tmp_path / "short", "--out", tmp_path / "x/y/out"), "empty corpus")
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["notes.txt"]


def test_empty_paths_are_refused(run, tmp_path, monkeypatch):
    """An empty path is the current folder to pathlib, and the CLI took an empty --out for a missing one:
    `--out "$UNSET"` replaced ./data/stdlib, `--input ""` read the current folder, `--tokenizer ""`
    trained a tokenizer its summary called given, and `--merge` took "" for the current folder."""
    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path / "good", make_docs(3))
    rc, _, err = run("--input", "good", "--vocab-size", 300)  # into the default data/stdlib
    assert rc == 0, err
    before = (tmp_path / "data/stdlib/manifest.json").read_bytes()
    _assert_one_error(run("--input", "good", "--out", ""), "--out is empty: name a path")
    _assert_one_error(run("--input", "", "--out", "d"), "--input is empty")
    _assert_one_error(run("--input", "good", "--tokenizer", "", "--out", "d"), "--tokenizer is empty")
    _assert_one_error(run("--merge", "data/stdlib", "", "--out", "d"), "1 given empty")
    assert (tmp_path / "data/stdlib/manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "good"]


def test_slices_and_merge_from_the_cli(run, tmp_path):
    src = write_corpus(tmp_path / "src", make_docs(12, seed=8))
    assert run("--input", src, "--out", tmp_path / "whole", "--vocab-size", 300)[0] == 0
    tok = tmp_path / "whole/tokenizer.json"
    for i in range(2):
        rc, _, _ = run(
            "--input",
            src,
            "--tokenizer",
            tok,
            "--num-slices",
            2,
            "--slice-index",
            i,
            "--out",
            tmp_path / f"p{i}",
        )
        assert rc == 0
    rc, out, _ = run("--merge", tmp_path / "p0", tmp_path / "p1", "--out", tmp_path / "merged")
    assert rc == 0 and "merged 2 slices" in out and "kept      12 documents" in out
    assert "uint16 ids" in out  # as prepare prints it (was the manifest's `<u2`)
    whole = json.loads((tmp_path / "whole/manifest.json").read_text())["splits"]
    merged = json.loads((tmp_path / "merged/manifest.json").read_text())["splits"]
    assert {s: v["tokens"] for s, v in merged.items()} == {s: v["tokens"] for s, v in whole.items()}
    _assert_one_error(run("--input", src, "--num-slices", 2, "--out", tmp_path / "x"), "share one tokenizer")
    # a merge takes the slices as they are: options that would change the data are refused, not ignored
    merge_with = run("--merge", tmp_path / "p0", tmp_path / "p1", "--out", tmp_path / "m2", "--input", src)
    _assert_one_error(merge_with, "--merge joins slices as they were prepared: drop --input")
    _assert_one_error(
        run("--merge", tmp_path / "p0", "--out", tmp_path / "m2", "--vocab-size", 300, "--dedup", "none"),
        "drop --vocab-size, --dedup",
    )
    assert not (tmp_path / "m2").exists()


def test_cleaning_thresholds_and_special_tokens_from_the_cli(run, tmp_path):
    docs = make_docs(12, seed=3)
    src = write_corpus(tmp_path / "src", [*docs, "\n".join(["repeated line here"] * 3 + ["a b c d e"] * 7)])
    out = tmp_path / "d"
    argv = ["--input", src, "--out", out, "--vocab-size", 300, "--min-chars", 0]
    assert run(*argv)[0] == 0
    assert json.loads((out / "manifest.json").read_text())["sources"]["dropped"]["dup_lines"] == 1
    loose = [
        "max_dup_line_frac=0.9",
        "max_dup_line_char_frac=1",
        "max_top_ngram_frac=",
        "max_dup_ngram_frac=",
    ]
    rc, _, _ = run(
        *argv, *(a for o in loose for a in ("--clean-option", o)), "--special-tokens", "<s>,</s>,<pad>"
    )
    m = json.loads((out / "manifest.json").read_text())
    assert rc == 0 and m["sources"]["documents_kept"] == 13
    assert m["options"]["clean"]["max_top_ngram_frac"] == {}
    assert m["special_tokens"]["eos"] == {"token": "</s>", "id": 1}
    _assert_one_error(run(*argv, "--clean-option", "max_dup=0.3"), "expected KEY=VALUE with KEY one of")
    _assert_one_error(run(*argv, "--clean-option", "min_chars=many"), "bad value for min_chars")
    conflicts = [
        ("--min-chars=10", "min_chars=3000"),
        ("--min-chars=64", "min_chars=3000"),  # also where the flag repeats its default
        ("--unicode=NFD", "unicode_form=NFKC"),
    ]
    for flag, option in conflicts:
        field = option.split("=")[0]
        _assert_one_error(
            run(*argv, flag, "--clean-option", option), f"{flag.split('=')[0]} and --clean-option {field}=…"
        )
    _assert_one_error(run(*argv, "--special-tokens", "<s>,<s>,<pad>"), "three distinct special tokens")
    # plain words or letters: BPE could form them from text, putting special ids inside documents
    _assert_one_error(run(*argv, "--special-tokens", "BOS,EOS,PAD"), "special token 'BOS' is a piece")
    _assert_one_error(run(*argv, "--special-tokens", "<s>,b,<pad>"), "special token 'b' is a piece")


def test_damaged_gzip_inputs_give_one_error_line(run, tmp_path):
    docs = make_docs(8, seed=6)
    jsonl = gzip.compress(("\n".join(json.dumps({"text": d}) for d in docs) + "\n").encode(), mtime=0)
    text = gzip.compress(docs[0].encode(), mtime=0)
    damaged = {
        "truncated.jsonl.gz": jsonl[: len(jsonl) // 2],  # EOFError while reading
        "corrupt.jsonl.gz": jsonl[:10] + b"\xff" * 40 + jsonl[50:],  # zlib.error while reading
        "corrupt.txt.gz": text[:10] + b"\x00" * 20 + text[30:],
        "plain.jsonl.gz": json.dumps({"text": docs[0]}).encode(),  # not gzip at all: BadGzipFile
    }
    for name, data in damaged.items():
        (tmp_path / name).write_bytes(data)
        _assert_one_error(
            run("--input", tmp_path / name, "--out", tmp_path / "d"), f"cannot read {tmp_path / name}"
        )
    assert not (tmp_path / "d").exists()


def test_a_folder_that_cannot_be_listed_fails_instead_of_being_skipped(run):
    """os.walk skips such a folder silently, which would leave part of a corpus out unnoticed. As root
    (CI's containers) permissions do not apply, so the check runs with the effective uid of `nobody`, in a
    folder it may enter (pytest's tmp_path is private to root)."""
    root = pathlib.Path(tempfile.mkdtemp(prefix="seektrain-walk-"))
    try:
        src = write_corpus(root / "src", make_docs(6, seed=9))
        write_corpus(src / "locked", make_docs(2, seed=10))
        for p in (root, src):
            p.chmod(0o777)
        (src / "locked").chmod(0)
        as_root = os.geteuid() == 0
        if as_root:
            os.seteuid(65534)
        try:
            _assert_one_error(run("--input", src, "--out", root / "d"), f"cannot read {src / 'locked'}")
        finally:
            if as_root:
                os.seteuid(0)
        assert not (root / "d").exists()
    finally:
        (src / "locked").chmod(0o755)
        shutil.rmtree(root)


def test_unusable_out_paths_and_inputs_give_one_error_line(run, tmp_path, monkeypatch):
    src = write_corpus(tmp_path / "src", make_docs(12, seed=7))
    (tmp_path / "afile").write_text("mine")
    _assert_one_error(run("--input", src, "--out", tmp_path / "afile/sub"), "afile is not a directory")
    assert (tmp_path / "afile").read_text() == "mine"
    here = write_corpus(tmp_path / "here", make_docs(2, seed=8))
    monkeypatch.chdir(here)
    _assert_one_error(run("--input", src, "--out", "."), "is or holds the current folder")
    _assert_one_error(run("--input", src, "--out", ".."), "is or holds the current folder")
    assert sorted(p.name for p in here.iterdir()) == ["doc0000.txt", "doc0001.txt"]
    (src / "gone.txt").symlink_to(tmp_path / "missing.txt")  # a broken link among the inputs
    _assert_one_error(run("--input", src, "--out", tmp_path / "d"), "gone.txt: a broken symbolic link")
    _assert_one_error(run("--input", src / "gone.txt", "--out", tmp_path / "d"), "gone.txt: a broken symbol")
    (src / "gone.txt").unlink()
    # a threshold out of range is refused with any --dedup, not ignored where it does not apply
    _assert_one_error(run("--input", src, "--out", tmp_path / "d", "--minhash-threshold", "1.5"), "(0, 1)")
    for option in ("max_top_ngram_frac=0:0.5", "max_dup_ngram_frac=-1:0.5"):
        _assert_one_error(
            run("--input", src, "--out", tmp_path / "d", "--clean-option", option), "must be at least 1"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "here", "src"]


def test_sigterm_ends_prepare_like_ctrl_c(tmp_path):
    """SIGTERM (kill, a timeout, a scheduler) used to end prepare on the spot: its temp dir stayed until a
    later run, and each pool worker printed a traceback. Now: `terminated`, exit 143, nothing left."""
    import signal
    import subprocess
    import sys
    import time

    argv = ["prepare", "--input", "stdlib", "--out", tmp_path / "out", "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "seektrain", *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(1.0)  # into the cleaning pass, with both workers busy
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    err = proc.stderr.read().decode()
    assert code == 128 + signal.SIGTERM and err.endswith("terminated\n") and "Traceback" not in err, err
    assert not list(tmp_path.iterdir())


def test_a_tokenizer_that_cannot_encode_the_corpus_is_one_error_line(run, tmp_path):
    """A given WordPiece tokenizer without its [UNK] token fails on the first unknown word: that was the
    library's traceback (from a pool worker too, with --workers 2: the error travels back pickled)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordPiece(vocab={"<|eos|>": 0, "a": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|eos|>"])
    tok.save(str(tmp_path / "wordpiece.json"))
    src = write_corpus(tmp_path / "src", make_docs(6, seed=12))
    result = run("--input", src, "--out", tmp_path / "d", "--tokenizer", tmp_path / "wordpiece.json")
    _assert_one_error(result, "the tokenizer cannot encode the corpus: WordPiece error: Missing [UNK]")
    assert not (tmp_path / "d").exists()


def _worker_signals(_task):
    import signal

    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    return (
        signal.getsignal(signal.SIGINT),
        signal.getsignal(signal.SIGTERM),
        signal.SIGINT in mask,
        signal.SIGTERM in mask,
    )


def test_pool_workers_ignore_ctrl_c_and_sigterm_even_under_the_clis_handler():
    """Ctrl-C and SIGTERM reach every process of the job; a worker they ended could die in the middle of
    a message on the pool's pipes, and the pool waited for the rest forever. Workers run with both
    ignored (and unblocked): the parent stops them. The parent keeps its handler and its signal mask."""
    import signal

    from seektrain import cli
    from seektrain.data.workers import ordered_map

    previous = cli._handle_signals()
    try:
        seen = set(ordered_map(_worker_signals, range(8), 2, print, ()))
        assert seen == {(signal.SIG_IGN, signal.SIG_IGN, False, False)}
        assert signal.getsignal(signal.SIGTERM) is cli._raise_terminated
        assert not {signal.SIGINT, signal.SIGTERM} & signal.pthread_sigmask(signal.SIG_BLOCK, [])
    finally:
        cli._release_signals(previous)


def test_a_worker_that_dies_ends_prepare_with_one_error_instead_of_a_hang():
    """A worker killed mid-task (the OOM killer; a SIGTERM to the whole process group) left
    multiprocessing.Pool waiting forever: for its result, and in terminate() for the queue lock a worker
    killed while idle held. The pool now notices and `ordered_map` raises one UserError; the other
    worker is stopped. Run in a subprocess, so that a regression fails here instead of hanging."""

    code = """
import os, signal
from seektrain.data.workers import ordered_map
from seektrain.errors import UserError

def die_on_task_3(task):
    if task == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return task

try:
    print(list(ordered_map(die_on_task_3, range(40), 2, print, ())))
except UserError as e:
    print("UserError:", e)
"""
    assert _output_of(code).startswith("UserError: a worker process ended unexpectedly (killed by a signal")


def test_workers_that_cannot_all_start_are_one_error_and_the_started_ones_stop():
    """A process limit (EAGAIN from fork) met by the third of four workers: one UserError, and the two
    already running are stopped (the pool would not stop them yet, and the process hung at exit)."""

    code = """
import errno, os
from seektrain.data.workers import ordered_map
from seektrain.errors import UserError

real_fork, calls = os.fork, [0]
def fork():
    calls[0] += 1
    if calls[0] == 3:
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
    return real_fork()
os.fork = fork
try:
    list(ordered_map(abs, range(100), 4, print, ()))
except UserError as e:
    print("UserError:", e)
"""
    expected = "UserError: cannot start 4 worker processes (Resource temporarily unavailable): try fewer"
    assert _output_of(code).startswith(expected)


def _output_of(code: str) -> str:
    """What a Python program prints, run on its own within a minute (a hang fails instead of waiting)."""
    import subprocess

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _prepare_with_two_workers(out):
    """`seektrain prepare` of the stdlib into `out` in a session of its own (a shell job's process group),
    returned once both its workers run, with their pids."""
    import signal
    import subprocess
    import time

    argv = ["prepare", "--input", "stdlib", "--out", out, "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "seektrain", *map(str, argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        # Ctrl-C as a terminal's foreground job takes it: a test run started in the background (`cmd &`
        # in a script, as CI runners may) passes SIGINT on ignored, and Python keeps it so.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    children = pathlib.Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    deadline = time.monotonic() + 60
    while len(children.read_text().split()) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return proc, children.read_text().split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_sigterm_to_the_process_group_ends_prepare_with_one_line(tmp_path):
    """`timeout`, Slurm's scancel and systemd signal every process of the job: the parent ends as on its
    own SIGTERM (143, temp dir removed). Workers that died of it mid-message on the pool's pipes hung
    prepare, in one of three tries (and in multiprocessing.Pool, on a queue lock a dead worker held)."""
    import os
    import signal
    import time

    for attempt in range(3):
        proc, _ = _prepare_with_two_workers(tmp_path / "out")
        time.sleep(0.1 + 0.2 * attempt)  # into the cleaning pass, at a few points
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        err = proc.stderr.read().decode()
        assert code == 128 + signal.SIGTERM and err.endswith("terminated\n") and "Traceback" not in err, err
        assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and PR_SET_PDEATHSIG")
def test_workers_do_not_outlive_a_parent_killed_alone(tmp_path):
    """kill -9 of prepare's process alone: its workers, which ignore SIGTERM and wait on the pool's
    pipes, are killed with it (PR_SET_PDEATHSIG) instead of living on."""
    import os
    import signal
    import time

    proc, workers = _prepare_with_two_workers(tmp_path / "out")
    assert len(workers) == 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while any(pathlib.Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(pathlib.Path(f"/proc/{pid}").exists() for pid in workers)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_ctrl_c_to_the_process_group_ends_prepare_with_one_line(tmp_path):
    """A terminal's Ctrl-C signals every process of the foreground group, the workers too."""
    import os
    import signal
    import time

    proc, _ = _prepare_with_two_workers(tmp_path / "out")
    time.sleep(0.5)  # into the cleaning pass, with both workers busy
    os.killpg(proc.pid, signal.SIGINT)
    code = proc.wait(timeout=60)
    err = proc.stderr.read().decode()
    assert code == 130 and err == "interrupted\n", err
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_a_write_that_fails_is_one_error_line_and_keeps_the_data_dir(run, tmp_path):
    """A full disk (here: files limited to 16 KiB, so the cleaned text cannot be written) and an --out
    where nothing can be created (/proc) end in one line; the data dir already there stays as it was and
    no temp dir is left."""
    import subprocess
    import sys

    src = write_corpus(tmp_path / "src", make_docs(60, seed=8))
    out = tmp_path / "d"
    assert run("--input", src, "--out", out, "--vocab-size", 300)[0] == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    argv = ["prepare", "--input", src, "--out", out, "--vocab-size", 300, "--no-progress", "--workers", "2"]
    proc = subprocess.run(
        [sys.executable, "-m", "seektrain", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=file_size_limit(16 * 1024),
    )
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert err == [f"error: cannot build {out}: File too large; it keeps what it held before"], proc.stderr
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "src"]
    proc_out = "/proc/seektrain_test_out"
    _assert_one_error(run("--input", src, "--out", proc_out), f"cannot build {proc_out}: ")


def test_an_empty_split_is_warned_about(run, tmp_path):
    """All documents in val (a large --val-fraction on a small corpus) leaves nothing to train on; none in
    val, nothing to evaluate: the summary says which and what to change."""
    src = write_corpus(tmp_path / "src", make_docs(4, seed=3))
    rc, out, _ = run("--input", src, "--out", tmp_path / "a", "--vocab-size", 300, "--val-fraction", "0.999")
    assert rc == 0 and "tokens    train 0 (0 docs" in out, out
    assert "warning   the train split is empty: lower --val-fraction" in out
    rc, out, _ = run("--input", src, "--out", tmp_path / "b", "--vocab-size", 300, "--val-fraction", "0")
    assert rc == 0 and "warning   the val split is empty: raise --val-fraction" in out
    assert "train split is empty" not in out
