"""Per-document cleaning: decode, normalize, clean up characters, filter by length and repetition, hash.

Everything here is a pure function of one document so that it runs in worker processes. Each dropped
document carries one reason (the first filter that rejected it), counted in `prepare_report.json`.

Decoding policy: bytes are decoded as UTF-8 (a leading BOM removed), or as UTF-16/UTF-32 where their BOM
opens the file (Windows editors save "Unicode" text so; read as UTF-8, its NUL bytes are valid and vanish in
normalization while the BOM counts only 2 invalid bytes, so it was kept as doubled-newline text with two
U+FFFD); invalid sequences become U+FFFD,
and a document is dropped as `invalid_utf8` when more than `max_invalid_utf8_frac` of its bytes were
invalid (a binary or wrongly encoded file), otherwise kept with the replacements. Text that is already
decoded (JSONL) can still hold lone surrogates (an escaped `\ud800` without its pair, as truncated emoji
leave in scraped data): each is one invalid character under the same policy.
"""

from __future__ import annotations

import codecs
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import xxhash

UNICODE_FORMS = ("NFC", "NFKC", "NFD", "NFKD", "none")

# C0/C1 control characters (tab and newline kept), DEL, stray BOMs; Unicode line separators -> newline.
_CONTROL = {c: None for c in [*range(0, 9), *range(11, 32), 0x7F, *range(0x80, 0xA0), 0xFEFF]}
_CONTROL.update({0x0D: "\n", 0x2028: "\n", 0x2029: "\n"})
_MANY_BLANK = re.compile(r"\n{4,}")
_SURROGATE = re.compile("[\ud800-\udfff]")  # in a str from json.loads: only unpaired ones remain
_ESCAPED = re.compile("[\udc80-\udcff]")  # bytes that surrogateescape could not decode
_ANY_CONTROL = re.compile("[" + "".join(re.escape(chr(c)) for c in _CONTROL) + "]")


@dataclass
class CleanConfig:
    """Cleaning and filtering options (thresholds after Gopher, Rae et al. 2021, loosened for source code)."""

    unicode_form: str = "NFC"
    max_invalid_utf8_frac: float = 0.01
    min_chars: int = 64
    max_chars: int = 1_000_000
    # Fraction of (non-blank) lines that repeat an earlier line, and the characters they hold.
    max_dup_line_frac: float = 0.5
    max_dup_line_char_frac: float = 0.4
    # Most frequent word n-gram's share of all word characters, per n.
    max_top_ngram_frac: dict[int, float] = field(default_factory=lambda: {2: 0.30, 3: 0.25, 4: 0.20})
    # Share of word characters inside n-grams that occur more than once, per n.
    max_dup_ngram_frac: dict[int, float] = field(default_factory=lambda: {5: 0.50, 10: 0.40})
    repetition_filters: bool = True

    def __post_init__(self) -> None:
        from seektrain.errors import UserError

        if self.unicode_form not in UNICODE_FORMS:
            raise UserError(
                f"unicode form must be one of {', '.join(UNICODE_FORMS)}, got {self.unicode_form!r}"
            )
        if self.min_chars < 0 or self.max_chars < self.min_chars:
            raise UserError(f"need 0 <= min_chars <= max_chars, got {self.min_chars}, {self.max_chars}")
        fracs = [
            self.max_invalid_utf8_frac,
            self.max_dup_line_frac,
            self.max_dup_line_char_frac,
            *self.max_top_ngram_frac.values(),
            *self.max_dup_ngram_frac.values(),
        ]
        if any(not 0.0 <= f <= 1.0 for f in fracs):
            raise UserError("cleaning thresholds are fractions and must lie in [0, 1]")
        for name in ("max_top_ngram_frac", "max_dup_ngram_frac"):
            if any(n < 1 for n in getattr(self, name)):
                raise UserError(f"{name}: n-gram sizes must be at least 1, got {sorted(getattr(self, name))}")


def clean_overrides(options: list[str]) -> dict:
    """`KEY=VALUE` strings (the CLI's --clean-option) -> CleanConfig keyword arguments; n-gram maps are
    written `2:0.2,3:0.18` (empty to switch that filter off). UserError names an unknown key."""
    from dataclasses import fields

    from seektrain.errors import UserError

    types = {f.name: f.type for f in fields(CleanConfig)}
    out: dict = {}
    for option in options:
        key, eq, value = option.partition("=")
        key = key.strip()
        if not eq or key not in types:
            raise UserError(
                f"--clean-option {option!r}: expected KEY=VALUE with KEY one of {', '.join(types)}"
            )
        kind = str(types[key])
        try:
            if kind.startswith("dict"):
                pairs = [item.split(":") for item in value.split(",") if item.strip()]
                out[key] = {int(n): float(frac) for n, frac in pairs}
            elif kind == "bool":
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                out[key] = value.lower() in ("true", "1")
            else:
                out[key] = {"int": int, "float": float, "str": str}[kind](value)
        except ValueError as e:
            raise UserError(f"--clean-option {option!r}: bad value for {key} ({kind})") from e
    return out


def decode(raw: bytes | str, max_invalid_frac: float) -> str | None:
    """UTF-8 text of a document, or None when too much of it is not valid UTF-8 (see module docstring)."""
    if isinstance(raw, str):
        try:
            raw.encode()  # the common case, checked at C speed: no lone surrogates
            return raw
        except UnicodeEncodeError:
            text, invalid = _SURROGATE.subn("\ufffd", raw)
            return None if invalid > max_invalid_frac * len(text.encode()) else text
    codec = next((c for bom, c in _BOMS if raw.startswith(bom)), "utf-8-sig")
    try:
        return raw.decode(codec)
    except UnicodeDecodeError:
        text = raw.decode(codec, errors="replace")  # a cut multi-byte sequence: one U+FFFD for its bytes
        if codec == "utf-8-sig":  # bytes, as the policy counts: each invalid one escapes to one surrogate
            invalid = len(_ESCAPED.findall(raw.decode(codec, errors="surrogateescape")))
        else:  # UTF-16/32: invalid code units
            invalid = text.count("\ufffd") - raw.decode(codec, errors="ignore").count("\ufffd")
        return None if invalid > max_invalid_frac * max(len(raw), 1) else text


# Byte-order marks of the encodings read besides UTF-8 (UTF-32's first: it begins with UTF-16's); each
# codec removes its BOM, as "utf-8-sig" does UTF-8's.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def normalize(text: str, form: str) -> str:
    """Unicode normalization, newline unification, control characters out, trailing spaces trimmed."""
    if form != "none" and not unicodedata.is_normalized(form, text):
        text = unicodedata.normalize(form, text)
    text = text.replace("\r\n", "\n")
    if _ANY_CONTROL.search(text):  # translate() costs a dict lookup per character: only when needed
        text = text.translate(_CONTROL)
    text = "\n".join([line.rstrip(" \t") for line in text.split("\n")])  # 10x faster than a regex
    if "\n\n\n\n" in text:
        text = _MANY_BLANK.sub("\n\n\n", text)
    return text.lstrip("\n").rstrip()


def _ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """Rolling polynomial hash of each word n-gram: (W,) word ids -> (W-n+1,) uint64."""
    h = np.zeros(len(ids) - n + 1, dtype=np.uint64)
    for j in range(n):
        h = h * np.uint64(1_000_003) + ids[j : len(ids) - n + 1 + j]
    return h


def repetition_reason(text: str, words: list[str], cfg: CleanConfig) -> str | None:
    """Name of the first repetition filter the document fails, or None (Gopher-style statistics)."""
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if lines:
        counts = Counter(lines)
        dup_lines = len(lines) - len(counts)
        if dup_lines / len(lines) > cfg.max_dup_line_frac:
            return "dup_lines"
        dup_chars = sum(len(ln) * (c - 1) for ln, c in counts.items() if c > 1)
        if dup_chars / max(sum(map(len, lines)), 1) > cfg.max_dup_line_char_frac:
            return "dup_line_chars"
    if len(words) < 2:
        return None
    # Word ids from Python's string hash: salted per process, but only equality matters here, so the
    # outcome is the same in every process (up to 64-bit collisions).
    ids = np.fromiter(map(hash, words), dtype=np.int64, count=len(words)).view(np.uint64)
    lens = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    total = max(int(lens.sum()), 1)
    for n, limit in sorted(cfg.max_top_ngram_frac.items()):
        if len(words) < n:
            break
        _, inverse, counts = np.unique(_ngram_hashes(ids, n), return_inverse=True, return_counts=True)
        top = int(counts.max())
        if top < 2:
            continue
        # Among equally frequent n-grams take the longest, so ties never depend on the word ids.
        chars = np.convolve(lens, np.ones(n, dtype=np.int64), mode="valid")  # (W-n+1,) chars per n-gram
        if top * int(chars[counts[inverse] == top].max()) / total > limit:
            return f"top_{n}gram"
    for n, limit in sorted(cfg.max_dup_ngram_frac.items()):
        if len(words) < n:
            break
        _, inverse, counts = np.unique(_ngram_hashes(ids, n), return_inverse=True, return_counts=True)
        starts = np.flatnonzero(counts[inverse] > 1)
        if not len(starts):
            continue
        cover = np.zeros(len(words) + 1, dtype=np.int64)  # difference array: words covered by a dup n-gram
        np.add.at(cover, starts, 1)
        np.add.at(cover, starts + n, -1)
        if lens[np.cumsum(cover[:-1]) > 0].sum() / total > limit:
            return f"dup_{n}gram"
    return None


@dataclass
class Cleaned:
    """Result of cleaning one document: text (None if dropped), drop reason, hashes for dedup and split."""

    text: str | None
    reason: str | None
    key_hash: int = 0
    split_hash: int = 0
    bands: bytes = b""


def clean_document(raw: bytes | str, cfg: CleanConfig, minhash=None) -> Cleaned:
    """Decode, normalize, filter and hash one document; `minhash` (a MinHasher) adds LSH band hashes."""
    text = decode(raw, cfg.max_invalid_utf8_frac)
    if text is None:
        return Cleaned(None, "invalid_utf8")
    text = normalize(text, cfg.unicode_form)
    if len(text) < max(cfg.min_chars, 1):  # an empty document is dropped even with min_chars 0
        return Cleaned(None, "too_short")
    if len(text) > cfg.max_chars:
        return Cleaned(None, "too_long")
    words = text.split()
    if cfg.repetition_filters:
        reason = repetition_reason(text, words, cfg)
        if reason is not None:
            return Cleaned(None, reason)
    # Exact-dedup key: the cleaned text with whitespace runs collapsed, so re-indented copies match too.
    key = " ".join(words).encode()
    bands = minhash.bands(words) if minhash is not None else b""
    return Cleaned(text, None, xxhash.xxh3_64_intdigest(key), xxhash.xxh3_64_intdigest(key, seed=1), bands)
