"""`seektrain generate` end to end: output, --verbose cache report, and bad input."""

from __future__ import annotations

import shutil

import pytest
import torch
from tokenizers import Tokenizer

from seektrain.commands.generate import tokenizer_eos
from seektrain.errors import UserError
from seektrain.infer.generate import SamplingConfig, generate, sample_next, stream_text
from seektrain.infer.runs import load_run

from .conftest import one_thread, sentencepiece_style_tokenizer


def test_generate_prints_prompt_and_greedy_continuation(trained_run, data_dir, seektrain):
    prompt = "import json\n"
    code, out, err = seektrain("generate", "--run", trained_run, "--prompt", prompt, "--temperature", "0",
                               "--max-new-tokens", "20", "--verbose")  # fmt: skip
    assert code == 0, err
    tok = Tokenizer.from_file(str(data_dir / "tokenizer.json"))
    model = load_run(trained_run).model
    with one_thread():
        ids = list(
            generate(model, tok.encode(prompt).ids, SamplingConfig(20, temperature=0), model.cfg.eos_token_id)
        )
    assert out == prompt + tok.decode(ids) + "\n"
    # tiny: 4 layers x (64 + 16) fp32 values = 1280 B/token vs 4 layers x 4 heads x (48 + 32) x 4 B = 5120
    assert "1,280 bytes/token" in err and "5,120 for a per-head K/V cache (0.250x)" in err
    assert f"generated {len(ids)} tokens" in err


def test_seeded_sampling_from_the_cli_is_reproducible(trained_run, seektrain):
    args = ["generate", "--run", trained_run, "--prompt", "def ", "--max-new-tokens", "16", "--seed", "3",
            "--temperature", "0.8", "--top-k", "40", "--top-p", "0.9"]  # fmt: skip
    first, second = seektrain(*args), seektrain(*args)
    assert first[0] == 0 and first == second
    assert seektrain(*args, "--no-cache") == first  # the full-forward reference path samples the same


def test_a_tiny_temperature_generates_the_greedy_text(trained_run, seektrain):
    """--temperature 1e-40 is valid and in effect greedy (it used to end in a RuntimeError about inf/nan
    probabilities after the prompt was printed)."""
    args = ["generate", "--run", trained_run, "--prompt", "def ", "--max-new-tokens", "12", "--seed", "0"]
    greedy = seektrain(*args, "--temperature", "0")
    assert greedy[0] == 0 and seektrain(*args, "--temperature", "1e-40") == greedy


def test_bad_input_gives_one_error_line(trained_run, tmp_path, seektrain):
    truncated = tmp_path / "truncated" / "checkpoints" / "step_00000001"
    shutil.copytree(next((trained_run / "checkpoints").iterdir()), truncated)
    state = truncated / "state.pt"
    state.write_bytes(state.read_bytes()[:4096])
    cases = {
        "has no complete checkpoint (step_00000001 lacks all of state.pt (4,096 of": [
            "--run", tmp_path / "truncated", "--prompt", "x"
        ],
        "has no checkpoints": ["--run", tmp_path, "--prompt", "x"],
        "exceeds the model's context of 2048 tokens": ["--run", trained_run, "--prompt", "word " * 3000],
        "--temperature must be >= 0": ["--run", trained_run, "--prompt", "x", "--temperature", "-1"],
        "--seed must be in [-2**63, 2**64)": ["--run", trained_run, "--prompt", "x", "--seed", str(2**64)],
        "the prompt is empty": ["--run", trained_run, "--prompt", ""],
        # bytes that are not UTF-8 (`--prompt $'abc\xff'`) reach argv as a lone surrogate
        "--prompt is not valid UTF-8 text": ["--run", trained_run, "--prompt", "abc\udcff"],
    }
    for message, args in cases.items():
        code, out, err = seektrain("generate", *args)
        assert code == 2 and out == "", message
        assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err


def test_a_closed_stdout_ends_generate_quietly(trained_run):
    """`seektrain generate … | head -c 5`: the reader goes away mid-stream; generate ends with 141
    (128 + SIGPIPE) and no traceback, as Unix tools do."""
    import subprocess
    import sys

    argv = ["generate", "--run", trained_run, "--prompt", "def", "--max-new-tokens", "500"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "seektrain", *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    proc.stdout.read(3)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err


def test_streamed_text_keeps_the_space_a_sentencepiece_decoder_strips_from_a_texts_start():
    """"x =" then "▁f" must print "x = f", not "x =f": each piece is decoded after the prompt's last
    tokens, where the decoder's strip of the text's start does not reach it; a multi-byte character
    split over byte-fallback tokens comes out whole."""
    tok = sentencepiece_style_tokenizer()
    prompt = tok.encode("x =").ids
    for continuation in [" f(a)    if x", "    re é→x"]:
        new = tok.encode("x =" + continuation).ids[len(prompt) :]
        assert tok.decode(new).startswith(continuation[1:])  # alone, the first space is lost
        pieces = list(stream_text(tok, prompt, iter(new)))
        assert "".join(pieces) == continuation
        assert "\ufffd" not in "".join(pieces[:-1])


def test_nan_logits_stop_generation_with_one_error():
    """A diverged checkpoint's logits: sampling (multinomial of NaN) and greedy (argmax of NaN) both end
    in the UserError the CLI prints as one line, instead of a traceback or garbage."""
    logits = torch.full((1, 8), float("nan"))
    for temperature in (0.0, 1.0):
        with pytest.raises(UserError, match="logits are NaN"):
            sample_next(logits, SamplingConfig(temperature=temperature), None)


def test_an_infinite_temperature_is_refused():
    with pytest.raises(UserError, match="--temperature must be >= 0 and finite"):
        SamplingConfig(temperature=float("inf"))


def test_a_model_without_an_eos_id_stops_at_the_tokenizers_eos(data_dir):
    """A transformers config.json may lack eos_token_id: generation then stops at the tokenizer's
    end-of-document token, found by name."""
    tok = Tokenizer.from_file(str(data_dir / "tokenizer.json"))
    assert tokenizer_eos(tok) == tok.token_to_id("<|eos|>")
