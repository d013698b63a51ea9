"""Each cleaning step and filter on crafted documents: a bad one dropped for its reason, a good one kept."""

import random

import pytest
from data_helpers import make_doc

from seektrain.data.clean import CleanConfig, clean_document, decode, normalize
from seektrain.errors import UserError

GOOD = make_doc(random.Random(7), 200)


def test_good_document_passes_every_filter():
    r = clean_document(GOOD.encode(), CleanConfig())
    assert r.reason is None and r.text == GOOD


def test_invalid_utf8_policy():
    # A few bad bytes in a long text: kept, each replaced by U+FFFD. Mostly binary: dropped.
    few = GOOD.encode()[:1000] + b"\xff" + GOOD.encode()[1000:]
    assert decode(few, 0.01).count("\ufffd") == 1
    binary = bytes(range(128, 256)) * 20
    assert clean_document(binary, CleanConfig()).reason == "invalid_utf8"
    assert decode(b"\xef\xbb\xbfhello", 0.01) == "hello"  # BOM removed


def test_the_invalid_share_counts_bytes_not_replacement_characters():
    """A cut 4-byte sequence is 3 invalid bytes but one U+FFFD: counted by characters, 18 such bytes
    (1.2% of the text) were 6 (0.4%) and the text was kept, while 18 lone invalid bytes were dropped."""
    text = GOOD.encode()[:1500]
    cut_emoji, lone = text + b"\xf0\x9f\x98 " * 6, text + b"\xe9 " * 18  # 18 invalid bytes each
    assert decode(cut_emoji, 0.01) is None and decode(lone, 0.01) is None
    assert decode(text + b"\xf0\x9f\x98 " * 4, 0.01).count("\ufffd") == 4  # 12 bytes (0.8%): kept


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32", "utf-32-be"])
def test_utf16_and_utf32_files_with_a_bom_are_decoded(encoding):
    """Windows "Unicode" text: read as UTF-8 its NULs are valid bytes that normalization removed, and the
    BOM's 2 invalid bytes stayed under the 1% limit, so the file was kept as "\ufffd\ufffdFirst line\n\n…".
    With its BOM it is decoded in its own encoding; a stray bad unit still counts as invalid."""
    text = "First line\r\nSecond line é→日本\r\nThird " + GOOD
    raw = text.encode(encoding)
    if not raw.startswith((b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")):  # the -be codecs write none
        raw = ("\ufeff" + text).encode(encoding)
    assert decode(raw, 0.01) == text
    r = clean_document(raw, CleanConfig())
    assert r.reason is None and r.text == normalize(text, "NFC")
    assert decode(raw[:-1], 0.01).endswith("\ufffd")  # a truncated last code unit


def test_normalization_forms_and_control_characters():
    decomposed = "Cafe\u0301 \x00\x07bad\x1b ctrl\r\nline\u2028next   \n\n\n\n\n\nend\x0c"
    out = normalize(decomposed, "NFC")
    assert out == "Caf\u00e9 bad ctrl\nline\nnext\n\n\nend"
    assert normalize("\ufb01", "NFKC") == "fi" and normalize("\ufb01", "NFC") == "\ufb01"
    assert normalize("Cafe\u0301", "none") == "Cafe\u0301"
    with pytest.raises(UserError):
        CleanConfig(unicode_form="NFX")


def test_length_filters():
    cfg = CleanConfig(min_chars=100, max_chars=1000)
    assert clean_document("short text", cfg).reason == "too_short"
    assert clean_document(GOOD * 2, cfg).reason == "too_long"
    assert clean_document(GOOD[:500], cfg).reason is None
    # min_chars 0 keeps any length but an empty one, which would enter the stream as a lone EOS
    assert clean_document("", CleanConfig(min_chars=0)).reason == "too_short"
    assert clean_document("x", CleanConfig(min_chars=0)).reason is None


@pytest.mark.parametrize(
    "text, reason",
    [
        # 7 of 12 lines repeat an earlier one
        ("\n".join(["the same line again"] * 8 + [f"line {w} unique words" for w in "abcd"]), "dup_lines"),
        # few repeated lines, but they are long and hold most characters
        (
            "\n".join(["x" * 300, "x" * 300, "y" * 300, "y" * 300, *(f"u{i}" for i in range(8))]),
            "dup_line_chars",
        ),
        # one word bigram dominates the text ("na na" spam inside varied lines)
        ("\n".join(f"w{i} na na na na na na na na na na na na" for i in range(20)), "top_2gram"),
    ],
)
def test_repetition_filters(text, reason):
    assert clean_document(text, CleanConfig(min_chars=0)).reason == reason
    assert clean_document(text, CleanConfig(min_chars=0, repetition_filters=False)).reason is None


def test_duplicated_ngram_filter():
    # A 60-word passage repeated with distinct line numbers: no duplicate lines, all 5-grams repeated.
    rng = random.Random(3)
    passage = make_doc(rng, 60).replace("\n", " ")
    text = "\n".join(f"{i}: {passage}" for i in range(3))
    cfg = CleanConfig(min_chars=0, max_top_ngram_frac={})
    assert clean_document(text, cfg).reason == "dup_5gram"
    off = CleanConfig(min_chars=0, max_top_ngram_frac={}, max_dup_ngram_frac={})
    assert clean_document(text, off).reason is None


def test_exact_key_ignores_whitespace_but_not_words():
    a = clean_document(GOOD, CleanConfig())
    b = clean_document(GOOD.replace("\n", "\n   ").replace(" ", "  "), CleanConfig())
    c = clean_document(GOOD.replace(".", "!", 1), CleanConfig())
    assert a.key_hash == b.key_hash != c.key_hash


def test_filters_do_not_depend_on_the_hash_salt():
    # Two bigrams tie for most frequent; only the longer one crosses the threshold. Word ids come from
    # Python's salted str hash, so a tie broken by id order would flip between processes.
    import os
    import subprocess
    import sys

    code = (
        "from seektrain.data.clean import CleanConfig, clean_document\n"
        "filler = ' '.join(f'w{i}' for i in range(300))\n"
        "text = filler + ' ' + ' '.join(['a b'] * 12 + ['longwordnumberone longwordnumbertwo'] * 12)\n"
        "cfg = CleanConfig(min_chars=0, max_top_ngram_frac={2: 0.2}, max_dup_ngram_frac={})\n"
        "print(clean_document(text, cfg).reason)\n"
    )
    reasons = set()
    for salt in range(6):
        env = {**os.environ, "PYTHONHASHSEED": str(salt)}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        reasons.add(out.stdout.strip())
    assert reasons == {"top_2gram"}


def test_lone_surrogates_count_as_invalid_characters():
    # JSON text can hold half of a surrogate pair (a truncated emoji): U+FFFD, under the invalid-UTF-8 policy.
    assert decode(GOOD[:500] + "\ud83d" + GOOD[500:], 0.01) == GOOD[:500] + "\ufffd" + GOOD[500:]
    assert decode("\udc00 " * 50, 0.01) is None
    assert clean_document("\udc00 " * 50, CleanConfig(min_chars=0)).reason == "invalid_utf8"
    assert decode("\U0001f600 paired", 0.0) == "\U0001f600 paired"


def test_ngram_sizes_must_be_positive():
    with pytest.raises(UserError, match="max_top_ngram_frac: n-gram sizes must be at least 1"):
        CleanConfig(max_top_ngram_frac={0: 0.5})
    with pytest.raises(UserError, match="max_dup_ngram_frac: n-gram sizes must be at least 1"):
        CleanConfig(max_dup_ngram_frac={-1: 0.5, 5: 0.5})
    assert clean_document(GOOD, CleanConfig(max_top_ngram_frac={1: 0.9})).reason is None
