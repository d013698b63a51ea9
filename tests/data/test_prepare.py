"""prepare end to end on toy corpora: round trip, determinism, sources, atomicity, slices + merge."""

import codecs
import dataclasses
import gzip
import json
import os
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_helpers import make_docs, small_config, write_corpus
from tokenizers import Tokenizer

from seektrain.data.clean import CleanConfig
from seektrain.data.merge import merge
from seektrain.data.prepare import prepare, print_summary
from seektrain.data.shards import MANIFEST, load_manifest
from seektrain.data.sources import discover
from seektrain.errors import UserError
from seektrain.paths import recover_interrupted


def _documents(data_dir, split):
    """Decode a split back into documents: concatenate its shards, cut at EOS."""
    m = load_manifest(data_dir)
    ids = np.concatenate(
        [np.fromfile(data_dir / s["file"], dtype=m["dtype"]) for s in m["splits"][split]["shards"]]
    )
    tok = Tokenizer.from_file(str(data_dir / "tokenizer.json"))
    cuts = np.flatnonzero(ids == m["eos_id"])
    assert len(ids) == 0 or cuts[-1] == len(ids) - 1  # every document, the last included, ends with EOS
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [tok.decode(ids[a:b].tolist()) for a, b in zip(starts, cuts, strict=True)]


def test_round_trip_text_to_shards_and_back(prepared, corpus_docs):
    data_dir, report = prepared
    m = load_manifest(data_dir)
    train, val = _documents(data_dir, "train"), _documents(data_dir, "val")
    assert sorted(train + val) == sorted(
        corpus_docs
    )  # every document exactly once, byte-level BPE is lossless
    assert 0 < len(val) < len(train)
    assert [d for d in corpus_docs if d in set(val)] == val  # input order kept within a split
    assert m["splits"]["train"]["documents"] == len(train) == report["documents"]["train"]
    assert m["dtype"] == "<u2" and m["vocab_size"] == 384
    assert m["special_tokens"]["eos"] == {"token": "<|eos|>", "id": 1}
    shards = m["splits"]["train"]["shards"]
    assert len(shards) > 1 and all(s["tokens"] == 4096 for s in shards[:-1])  # fixed size but the last
    assert sum(s["tokens"] for s in shards) == m["splits"]["train"]["tokens"]


def test_tokenizer_loads_in_transformers(prepared):
    from transformers import PreTrainedTokenizerFast

    data_dir, _ = prepared
    m = load_manifest(data_dir)
    st = m["special_tokens"]
    hf = PreTrainedTokenizerFast(
        tokenizer_file=str(data_dir / "tokenizer.json"),
        bos_token=st["bos"]["token"],
        eos_token=st["eos"]["token"],
        pad_token=st["pad"]["token"],
    )
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    assert hf.decode(hf("hello wörld\n  x")["input_ids"]) == "hello wörld\n  x"


def test_same_input_same_bytes_any_worker_count(tmp_path, corpus_docs):
    src = write_corpus(tmp_path / "src", corpus_docs[:60])
    prepare(small_config([src], tmp_path / "a", workers=1))
    prepare(small_config([src], tmp_path / "b", workers=2, dedup="minhash"))
    prepare(small_config([src], tmp_path / "c", workers=2))
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) > 4
    for f in files:
        if f.name != "prepare_report.json":  # holds timings
            assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "c" / f).read_bytes(), f
    assert (tmp_path / "a/train/00000.bin").read_bytes() == (tmp_path / "b/train/00000.bin").read_bytes()


def test_no_more_workers_start_than_the_cpus_it_may_use(tmp_path, corpus_docs, monkeypatch):
    """`--workers 99999` started every process at once (~30 MB each), and the OOM killer ended prepare
    without a word: the CPU-bound workers are capped at the CPUs, which the report gives."""
    from seektrain import host_limits
    from seektrain.data import workers as W

    started, start_pool = [], W._start_pool
    monkeypatch.setattr(W, "_start_pool", lambda n, *rest: started.append(n) or start_pool(n, *rest))
    monkeypatch.setattr(host_limits, "usable_cpus", lambda: 2)
    src = write_corpus(tmp_path / "src", corpus_docs[:20])
    report = prepare(small_config([src], tmp_path / "out", workers=64))
    assert report["workers"] == 2 and started == [2, 2]  # the cleaning pass's pool, the tokenizing one's


def test_report_counts_each_drop_reason(tmp_path):
    docs = make_docs(30, seed=5)
    docs += [docs[0], docs[1].replace("\n", "\n\n"), "too short", "\n".join(["spam spam spam"] * 40)]
    src = write_corpus(tmp_path / "src", docs)
    (src / "binary.txt").write_bytes(bytes(range(128, 256)) * 8)
    (src / "huge.txt").write_text("word " * 2000)  # 10 kB > 4 bytes x max_chars: dropped unread
    report = prepare(small_config([src], tmp_path / "out", clean=CleanConfig(max_chars=2000)))
    assert report["documents_in"] == 36 and report["documents_kept"] == 30
    assert report["dropped"] == {
        "exact_duplicate": 2,
        "too_short": 1,
        "dup_lines": 1,
        "invalid_utf8": 1,
        "too_long": 1,
    }
    saved = json.loads((tmp_path / "out/prepare_report.json").read_text())
    assert saved["dropped"] == report["dropped"]
    assert load_manifest(tmp_path / "out")["sources"]["dropped"] == report["dropped"]


def test_a_gzipped_text_file_too_long_to_keep_is_never_read_whole(tmp_path):
    """A text file is one document: one over 4 bytes × max_chars is dropped as too_long. A plain one is
    not read at all; a gzipped one, whose text may be a thousand times its size on disk, is now read no
    further than that (a 1 MB .txt.gz of 432 MB text took 1.3 GB before). A limit far above the text
    reserves no memory for itself (--max-chars 1e10 to turn the filter off)."""
    import tracemalloc

    from seektrain.data.sources import read_text_file

    src = write_corpus(tmp_path / "src", make_docs(12, seed=4))
    bomb = src / "bomb.txt.gz"
    with gzip.open(bomb, "wb", compresslevel=1) as f:
        for _ in range(64):
            f.write(b"word " * (1 << 18) + b"\n")  # 64 MiB of text
    assert bomb.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        assert read_text_file(bomb, max_bytes=8000) is None
        small = src / "doc0000.txt"
        small_gz = tmp_path / "small.txt.gz"
        small_gz.write_bytes(gzip.compress(small.read_bytes()))
        for path in (small, small_gz):  # no 4 TB reserved for a limit of 4 TB
            assert read_text_file(path, max_bytes=4 * 10**12) == small.read_bytes()
        peak = tracemalloc.get_traced_memory()[1]
        report = prepare(small_config([src], tmp_path / "out", clean=CleanConfig(max_chars=2000)))
        peak_prepare = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak
    assert peak_prepare < 32 << 20, peak_prepare
    assert report["documents_in"] == 13 and report["dropped"]["too_long"] == 1
    assert report["documents_kept"] == 12


def test_jsonl_parquet_and_gzip_sources(tmp_path):
    docs = make_docs(24, seed=9)
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        for d in docs[:8]:
            f.write(json.dumps({"body": d, "id": 1}) + "\n")
    table = pa.table({"body": docs[8:16]})
    pq.write_table(table, tmp_path / "b.parquet", row_group_size=3)  # several row groups
    with gzip.open(tmp_path / "c.md.gz", "wt") as f:
        f.write(docs[16])
    report = prepare(small_config([tmp_path], tmp_path / "out", text_field="body"))
    assert report["files"] == 3 and report["documents_in"] == 17 and report["documents_kept"] == 17


def test_bad_jsonl_line_fails_or_is_counted(tmp_path):
    docs = make_docs(6, seed=2)
    lines = [json.dumps({"text": d}) for d in docs]
    lines.insert(3, "{not json")
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"in.jsonl:4: JSONL line is not valid"):
        prepare(small_config([tmp_path / "in.jsonl"], tmp_path / "out"))
    report = prepare(small_config([tmp_path / "in.jsonl"], tmp_path / "out", skip_bad_lines=True))
    assert report["bad_jsonl_lines"] == 1 and report["documents_kept"] == 6
    (tmp_path / "all_bad.jsonl").write_text("{not json\n[1]\n")  # nothing left: the error says why
    with pytest.raises(UserError, match=r"dropped no documents read; skipped 2 JSONL lines that were not"):
        prepare(small_config([tmp_path / "all_bad.jsonl"], tmp_path / "none", skip_bad_lines=True))
    lines[3] = "[" * 100_000  # nested deeper than json's recursion limit: was a RecursionError traceback
    (tmp_path / "deep.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"deep.jsonl:4: JSONL line is not valid"):
        prepare(small_config([tmp_path / "deep.jsonl"], tmp_path / "deep"))
    report = prepare(small_config([tmp_path / "deep.jsonl"], tmp_path / "deep", skip_bad_lines=True))
    assert report["bad_jsonl_lines"] == 1 and report["documents_kept"] == 6
    # A null text is no text, as a Parquet null is: counted, not fatal; another type is still a bad line.
    lines[3] = json.dumps({"text": None})
    (tmp_path / "null.jsonl").write_text("\n".join([*lines, json.dumps({"text": 3})]) + "\n")
    with pytest.raises(UserError, match=r"null.jsonl:8: JSONL line is not valid: field 'text' is int"):
        prepare(small_config([tmp_path / "null.jsonl"], tmp_path / "null"))
    (tmp_path / "null.jsonl").write_text("\n".join(lines) + "\n")
    report = prepare(small_config([tmp_path / "null.jsonl"], tmp_path / "null"))
    assert report["dropped"]["null_text"] == 1 and report["documents_kept"] == 6
    assert report["documents_in"] == 7 and report["bad_jsonl_lines"] == 0
    # JSON, but not an object: said so (was Python's "string indices must be integers")
    for line, kind in (('"just a string"', "string"), ("[1, 2]", "array"), ("3", "number"), ("null", "null")):
        lines[3] = line
        (tmp_path / "shape.jsonl").write_text("\n".join(lines) + "\n")
        with pytest.raises(UserError, match=rf"shape.jsonl:4: JSONL line is a JSON {kind}, not an object \("):
            prepare(small_config([tmp_path / "shape.jsonl"], tmp_path / "shape"))


def test_failed_rerun_keeps_existing_data_dir(tmp_path, corpus_docs):
    src = write_corpus(tmp_path / "src", corpus_docs[:40])
    out = tmp_path / "out"
    prepare(small_config([src], out))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    empty = write_corpus(tmp_path / "empty", ["tiny", "also tiny"])
    with pytest.raises(UserError, match="empty corpus after filtering"):
        prepare(small_config([empty], out))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out", "src"]  # no temp dirs left
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious/notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a seektrain data dir"):
        prepare(small_config([src], tmp_path / "precious"))


def test_existing_tokenizer_and_bad_tokenizer(prepared, tmp_path, corpus_docs):
    data_dir, _ = prepared
    src = write_corpus(tmp_path / "src", corpus_docs[:20])
    report = prepare(small_config([src], tmp_path / "out", tokenizer=str(data_dir / "tokenizer.json")))
    assert not report["tokenizer_trained"]
    assert (tmp_path / "out/tokenizer.json").read_bytes() == (data_dir / "tokenizer.json").read_bytes()
    (tmp_path / "bad.json").write_text('{"model": 3}')
    with pytest.raises(UserError, match="does not parse"):
        prepare(small_config([src], tmp_path / "out2", tokenizer=str(tmp_path / "bad.json")))


def test_slices_merge_to_the_whole(prepared, tmp_path, corpus_docs):
    data_dir, _ = prepared
    src = write_corpus(tmp_path / "src", corpus_docs[:30])
    tok = str(data_dir / "tokenizer.json")
    whole = prepare(small_config([src], tmp_path / "whole", tokenizer=tok))
    parts = [str(tmp_path / f"part{i}") for i in range(3)]
    for i, p in enumerate(parts):
        prepare(small_config([src], p, tokenizer=tok, num_slices=3, slice_index=i))
    merged = merge(parts, str(tmp_path / "merged"))
    assert merged["tokens"] == whole["tokens"] and merged["documents_kept"] == 30
    assert sorted(_documents(tmp_path / "merged", "train")) == sorted(_documents(tmp_path / "whole", "train"))
    with pytest.raises(UserError, match="needs|share one tokenizer"):
        small_config([src], tmp_path / "x", num_slices=2)
    # A slice prepared with other options: the merged manifest, which records one set, would misdescribe it
    other = str(tmp_path / "other")
    prepare(
        small_config(
            [src], other, tokenizer=tok, num_slices=3, slice_index=2, val_fraction=0.5, dedup="none",
            clean=CleanConfig(min_chars=10),
        )
    )  # fmt: skip
    with pytest.raises(
        UserError,
        match=rf"{re.escape(other)} was prepared with other options than {re.escape(parts[0])} "
        r"\(clean\.min_chars: 64 vs 10; dedup: 'exact' vs 'none'; val_fraction: 0\.\d+ vs 0\.5\): slices",
    ):
        merge([*parts[:2], other], str(tmp_path / "merged2"))
    assert not (tmp_path / "merged2").exists()


def test_interrupted_runs_are_cleaned_up(prepared, tmp_path, corpus_docs):
    data_dir, _ = prepared
    src = write_corpus(tmp_path / "src", corpus_docs[:20])
    dead = 2**22 + 12345  # above the default pid_max: no such process
    (tmp_path / f".out.tmp-{dead}").mkdir()  # a prepare killed while writing
    shutil.copytree(data_dir, tmp_path / f".out.old-{dead}")  # one killed between the two renames of the swap
    (tmp_path / ".out.tmp-1").mkdir()  # pid 1 is alive: not ours to touch
    recover_interrupted(tmp_path / "out", MANIFEST)
    assert (tmp_path / "out/manifest.json").read_bytes() == (data_dir / "manifest.json").read_bytes()
    prepare(small_config([src], tmp_path / "out", tokenizer=str(data_dir / "tokenizer.json")))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.tmp-1", "out", "src"]

    # Names are compared as text, not as glob patterns: `d?` must not take `dx`'s swapped-out data
    # (it used to be moved into `d?`, then replaced), and `data[1]`'s own leftovers are found.
    shutil.copytree(data_dir, tmp_path / f".dx.old-{dead}")
    (tmp_path / f".data[1].tmp-{dead}").mkdir()
    recover_interrupted(tmp_path / "d?", MANIFEST)
    recover_interrupted(tmp_path / "data[1]", MANIFEST)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".dx.old-" + str(dead), ".out.tmp-1", "out", "src"]


def test_minhash_prepare_drops_near_copies_only(tmp_path):
    docs = make_docs(20, seed=11, words=300)
    near = [" ".join("edited" if i == 150 else w for i, w in enumerate(d.split(" "))) for d in docs[:5]]
    src = write_corpus(tmp_path / "src", docs + near)
    exact = prepare(small_config([src], tmp_path / "exact"))
    minhash = prepare(small_config([src], tmp_path / "minhash", dedup="minhash"))
    assert exact["documents_kept"] == 25 and "near_duplicate" not in exact["dropped"]
    assert minhash["documents_kept"] == 20 and minhash["dropped"] == {
        "exact_duplicate": 0,
        "near_duplicate": 5,
    }
    kept = sorted(_documents(tmp_path / "minhash", "train") + _documents(tmp_path / "minhash", "val"))
    assert kept == sorted(docs)  # the originals (first occurrences) stay
    layout = ["manifest.json", "prepare_report.json", "tokenizer.json", "train", "val"]
    assert sorted(p.name for p in (tmp_path / "minhash").iterdir()) == layout  # no scratch files left


def test_foreign_tokenizer_eos_fallback_and_missing_eos(tmp_path, corpus_docs, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    src = write_corpus(tmp_path / "src", corpus_docs[:10])
    vocab = {chr(c): i for i, c in enumerate(range(32, 127))} | {"\n": 95}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.save(str(tmp_path / "no_eos.json"))
    with pytest.raises(UserError, match="no end-of-document token"):
        prepare(small_config([src], tmp_path / "a", tokenizer=str(tmp_path / "no_eos.json")))
    tok.add_special_tokens(["</s>"])
    tok.save(str(tmp_path / "eos.json"))
    prepare(small_config([src], tmp_path / "b", tokenizer=str(tmp_path / "eos.json")))
    m = load_manifest(tmp_path / "b")
    assert m["special_tokens"]["eos"] == {"token": "</s>", "id": 96} and m["vocab_size"] == 97
    assert "bos" not in m["special_tokens"]
    # other names asked for (--special-tokens) fall back to ours too: this one has <|eos|>, not </s>
    tok = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.add_special_tokens(["<|eos|>"])
    tok.save(str(tmp_path / "ours.json"))
    report = prepare(small_config([src], tmp_path / "c", tokenizer=str(tmp_path / "ours.json"),
                                  special_tokens=("<s>", "</s>", "<pad>")))  # fmt: skip
    assert load_manifest(tmp_path / "c")["special_tokens"]["eos"] == {"token": "<|eos|>", "id": 96}
    print_summary(report)  # which is said, not silently taken
    assert "given; documents end with <|eos|>\n" in capsys.readouterr().out


def test_dir_with_a_foreign_manifest_is_not_replaced(prepared, tmp_path, corpus_docs):
    data_dir, _ = prepared
    src = write_corpus(tmp_path / "src", corpus_docs[:20])
    web = tmp_path / "web"  # a web app's folder: its manifest.json is not ours
    web.mkdir()
    (web / "manifest.json").write_text('{"name": "app", "start_url": "/"}')
    (web / "index.html").write_text("<html></html>")
    before = {p.name: p.read_bytes() for p in web.iterdir()}
    with pytest.raises(UserError, match="not a seektrain data dir"):
        prepare(small_config([src], web))
    with pytest.raises(UserError, match="not a seektrain data dir"):
        merge([str(data_dir)], str(web))
    assert {p.name: p.read_bytes() for p in web.iterdir()} == before
    old = tmp_path / "old"  # a data dir of another format version is still ours to replace
    shutil.copytree(data_dir, old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "format_version": 0}))
    prepare(small_config([src], old))
    assert load_manifest(old)["sources"]["documents_kept"] == 20


def test_lone_surrogates_in_jsonl_become_replacement_characters(tmp_path):
    docs = make_docs(6, seed=12)
    docs[2] = docs[2][:200] + "\ud83d" + docs[2][200:]  # a truncated emoji: the first half of a pair
    lines = [json.dumps({"text": d}) for d in docs]  # json.dumps writes it as the escape \ud83d
    lines.append(json.dumps({"text": "\udc00" * 100}))  # nothing but invalid characters
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    report = prepare(small_config([tmp_path / "in.jsonl"], tmp_path / "out", val_fraction=0.0))
    assert report["documents_in"] == 7 and report["dropped"]["invalid_utf8"] == 1
    assert report["bytes_in"] == sum(len(d.encode("utf-8", "surrogatepass")) for d in docs) + 300
    kept = _documents(tmp_path / "out", "train")
    assert kept[2] == docs[2].replace("\ud83d", "\ufffd") and kept[:2] + kept[3:] == docs[:2] + docs[3:]


def test_bytes_that_are_not_utf8_in_jsonl_are_replaced_as_in_text_files(tmp_path):
    """A Latin-1 byte inside a JSONL text stopped prepare (`JSONL line is not valid: 'utf-8' codec…`),
    where a text or Parquet document has it replaced: now the same, and a mostly invalid text is dropped."""
    docs = make_docs(6, seed=14)
    lines = [json.dumps({"text": d}).encode() for d in docs]
    lines[1] = json.dumps({"text": "caf_ " + docs[1]}).encode().replace(b"caf_", b"caf\xe9")
    lines.append(b'{"text": "' + bytes(range(0x80, 0xFF)) + b'"}')  # nothing but bytes that are not UTF-8
    lines[0] = codecs.BOM_UTF8 + lines[0].replace(b"{", b'{"x": "\xff", ', 1)  # a BOM, a bad byte elsewhere
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    report = prepare(small_config([tmp_path / "in.jsonl"], tmp_path / "out", val_fraction=0.0))
    assert report["documents_in"] == 7 and report["dropped"]["invalid_utf8"] == 1
    assert report["bytes_in"] == sum(len(d.encode()) for d in docs) + len("caf\xe9 ") + 127
    kept = _documents(tmp_path / "out", "train")
    assert kept[1] == "caf\ufffd " + docs[1] and kept[:1] + kept[2:] == docs[:1] + docs[2:]


def test_special_token_text_in_documents_is_not_a_boundary(tmp_path):
    docs = make_docs(12, seed=13)
    docs = [d.replace(".", " <|eos|>hi<|bos|> <|pad|>.", 1) for d in docs]  # e.g. scraped chat logs
    src = write_corpus(tmp_path / "src", docs)
    first = prepare(small_config([src], tmp_path / "a", val_fraction=0.0))
    tok_file = str(tmp_path / "a/tokenizer.json")
    given = prepare(small_config([src], tmp_path / "b", val_fraction=0.0, tokenizer=tok_file, workers=2))
    # a given tokenizer that lists them as plain added tokens ("special": false): their text in documents
    # was matched as the tokens themselves, fake boundaries
    plain = json.loads((tmp_path / "a/tokenizer.json").read_text())
    for entry in plain["added_tokens"]:
        entry["special"] = False
    plain_file = tmp_path / "plain.json"
    plain_file.write_text(json.dumps(plain))
    as_plain = prepare(small_config([src], tmp_path / "c", val_fraction=0.0, tokenizer=plain_file))
    for out, report in ((tmp_path / "a", first), (tmp_path / "b", given), (tmp_path / "c", as_plain)):
        m = load_manifest(out)
        ids = np.concatenate(
            [np.fromfile(out / s["file"], dtype=m["dtype"]) for s in m["splits"]["train"]["shards"]]
        )
        assert np.bincount(ids, minlength=3)[:3].tolist() == [0, 12, 0]  # bos, eos (one per doc), pad
        assert sorted(_documents(out, "train")) == sorted(docs) and report["documents_kept"] == 12
    saved = Tokenizer.from_file(str(tmp_path / "b/tokenizer.json"))  # what generate and eval load
    assert (tmp_path / "b/tokenizer.json").read_bytes() == (tmp_path / "a/tokenizer.json").read_bytes()
    assert saved.encode("<|eos|>", add_special_tokens=False).ids == [1]


def test_symlinked_out_is_written_through_and_a_dangling_one_refused(prepared, tmp_path, corpus_docs):
    data_dir, _ = prepared
    src = write_corpus(tmp_path / "src", corpus_docs[:20])
    (tmp_path / "disk").mkdir()
    shutil.copytree(data_dir, tmp_path / "disk/data")
    (tmp_path / "links").mkdir()
    link = tmp_path / "links/data"
    link.symlink_to(tmp_path / "disk/data")
    prepare(small_config([src], link))
    assert link.is_symlink() and load_manifest(link)["sources"]["documents_kept"] == 20
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["data"]  # no temp or old dir left
    dangling = tmp_path / "links/gone"
    dangling.symlink_to(tmp_path / "unmounted/data")
    with pytest.raises(UserError, match="symbolic link to a missing path"):
        prepare(small_config([src], dangling))
    assert sorted(p.name for p in (tmp_path / "links").iterdir()) == ["data", "gone"]
    assert not (tmp_path / "unmounted").exists()


def test_parquet_text_column_must_hold_strings_and_nulls_are_counted(tmp_path):
    docs = make_docs(6, seed=14)
    pq.write_table(pa.table({"text": [d.encode() for d in docs]}), tmp_path / "bin.parquet")
    with pytest.raises(UserError, match=r"bin.parquet: Parquet column 'text' holds binary, not text"):
        prepare(small_config([tmp_path / "bin.parquet"], tmp_path / "out"))
    pq.write_table(pa.table({"n": [1, 2], "text": [3, 4]}), tmp_path / "int.parquet")
    with pytest.raises(UserError, match=r"int.parquet: Parquet column 'text' holds int64"):
        prepare(small_config([tmp_path / "int.parquet"], tmp_path / "out"))
    texts = [docs[0], None, docs[1], "", None, docs[2]]
    table = pa.table({"text": pa.array(texts).dictionary_encode()})  # dictionary-encoded strings read fine
    pq.write_table(table, tmp_path / "nulls.parquet")
    report = prepare(small_config([tmp_path / "nulls.parquet"], tmp_path / "out"))
    assert report["documents_in"] == 6 and report["documents_kept"] == 3
    assert report["dropped"] == {"exact_duplicate": 0, "null_text": 2, "too_short": 1}
    # a file whose column holds nothing but nulls has type null: counted too, not refused
    pq.write_table(pa.table({"text": pa.nulls(3)}), tmp_path / "all_null.parquet")
    inputs = [tmp_path / "nulls.parquet", tmp_path / "all_null.parquet"]
    report = prepare(small_config(inputs, tmp_path / "out"))
    assert report["documents_in"] == 9 and report["dropped"]["null_text"] == 5
    # a damaged file: one line, the library's control bytes escaped (was 3 lines with a raw ^O)
    damaged = bytearray((tmp_path / "nulls.parquet").read_bytes())
    damaged[4:44] = bytes(b ^ 0x5A for b in damaged[4:44])
    (tmp_path / "damaged.parquet").write_bytes(bytes(damaged))
    with pytest.raises(UserError, match=r"^cannot read Parquet file .*damaged.parquet: ") as e:
        prepare(small_config([tmp_path / "damaged.parquet"], tmp_path / "out2"))
    assert len(str(e.value).splitlines()) == 1 and str(e.value).isprintable(), repr(str(e.value))


def test_parquet_text_that_is_not_utf8_follows_the_text_files_policy(tmp_path):
    """A string column whose writer did not check UTF-8 (here: bytes viewed as strings): one bad byte in a
    document is replaced, a mostly invalid document is dropped as invalid_utf8, as in a text file; the
    run used to stop at the first bad value. Dictionary-encoded columns alike."""
    docs = make_docs(4, seed=15)
    raw = [docs[0].encode()[:500] + b"\xff" + docs[0].encode()[500:], bytes(range(128, 256)) * 8, None]
    raw += [d.encode() for d in docs[1:]]
    column = pa.array(raw, type=pa.binary()).view(pa.string())  # no validation: what a lax writer leaves
    for name, values in [("plain", column), ("dict", column.dictionary_encode())]:
        pq.write_table(pa.table({"text": values}), tmp_path / f"{name}.parquet")
        report = prepare(small_config([tmp_path / f"{name}.parquet"], tmp_path / name, val_fraction=0.0))
        assert report["documents_in"] == 6 and report["documents_kept"] == 4, name
        assert report["dropped"]["invalid_utf8"] == 1 and report["dropped"]["null_text"] == 1
        assert sum(doc.count("\ufffd") for doc in _documents(tmp_path / name, "train")) == 1


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_pipes_and_devices_are_not_read(tmp_path, corpus_docs):
    """A named pipe with a text file's name in an input folder made prepare wait on it forever (a link to
    /dev/zero would never end): one in a folder is passed over, one named is refused."""
    from seektrain.data.sources import discover

    src = write_corpus(tmp_path / "src", corpus_docs[:3])
    os.mkfifo(src / "pipe.txt")
    (src / "zeros.txt").symlink_to("/dev/zero")
    assert [f.path.name for f in discover([str(src)])] == ["doc0000.txt", "doc0001.txt", "doc0002.txt"]
    with pytest.raises(UserError, match=r"^cannot read .*/pipe\.txt: not a regular file or folder$"):
        discover([str(src / "pipe.txt")])


def test_linked_folders_are_followed_once_and_path_inputs_work(tmp_path, corpus_docs):
    """A folder linked into an input folder was skipped without a word (os.walk does not follow links);
    now it is read, and a link back to an ancestor does not loop. `pathlib.Path` inputs reached the
    manifest as such and failed at the very end (not JSON)."""
    main = write_corpus(tmp_path / "main", corpus_docs[:3])
    other = write_corpus(tmp_path / "other", corpus_docs[3:8])
    (main / "linked").symlink_to(other)
    (other / "back").symlink_to(tmp_path / "main")  # a cycle through the link
    found = discover([str(main)])
    assert len(found) == 8 and len({f.path.resolve() for f in found}) == 8
    cfg = small_config([main], tmp_path / "out")
    report = prepare(dataclasses.replace(cfg, inputs=[main]))  # a Path, not a str
    assert report["documents_in"] == 8
    assert load_manifest(tmp_path / "out")["sources"]["inputs"] == [str(main)]


def test_a_file_reached_twice_is_read_once(tmp_path, corpus_docs):
    """A folder and its subfolder both given, a file named twice, a link to a file of the corpus: each
    real file is read once (with `--dedup none` its documents were kept twice)."""
    main = write_corpus(tmp_path / "main", corpus_docs[:4])
    sub = write_corpus(main / "sub", corpus_docs[4:6])
    (main / "alias.txt").symlink_to(sorted(sub.iterdir())[0])
    one = sorted(main.glob("*.txt"))[0]
    found = discover([str(main), str(sub), str(one)])
    assert len(found) == 6 and len({f.path.resolve() for f in found}) == 6
    report = prepare(small_config([main, sub, one], tmp_path / "out", dedup="none"))
    assert report["documents_in"] == 6


def test_merge_refuses_a_slice_twice_and_out_over_its_own_input(prepared, tmp_path, corpus_docs):
    data_dir, _ = prepared
    src = write_corpus(tmp_path / "src", corpus_docs[:20])
    tok = str(data_dir / "tokenizer.json")
    parts = [tmp_path / f"part{i}" for i in range(2)]
    for i, p in enumerate(parts):
        prepare(small_config([src], p, tokenizer=tok, num_slices=2, slice_index=i))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="same slice twice"):
        merge([str(parts[0]), str(tmp_path / "src/../part0")], str(tmp_path / "merged"))
    shutil.copytree(parts[0], tmp_path / "copy")  # e.g. gathered from two machines under two names
    with pytest.raises(UserError, match="two copies of one slice"):
        merge([str(parts[0]), str(parts[1]), str(tmp_path / "copy")], str(tmp_path / "merged"))
    shutil.rmtree(tmp_path / "copy")
    shutil.copytree(parts[1], tmp_path / "broken")
    shard = next((tmp_path / "broken" / "train").iterdir())
    shard.unlink()  # was a FileNotFoundError traceback
    with pytest.raises(UserError, match=f"shard missing: {shard}"):
        merge([str(parts[0]), str(tmp_path / "broken")], str(tmp_path / "merged"))
    shutil.rmtree(tmp_path / "broken")
    with pytest.raises(UserError, match="is or holds the input"):
        merge([str(p) for p in parts], str(parts[0]))
    (parts[1] / "more").mkdir()  # text kept inside a data dir, then prepared into that same dir
    (parts[1] / "more/notes.txt").write_text(corpus_docs[30])
    with pytest.raises(UserError, match="is or holds the input"):
        prepare(small_config([parts[1] / "more"], parts[1], tokenizer=tok))
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part0", "part1", "src"]


def test_merge_refuses_slices_that_overlap(prepared, tmp_path, corpus_docs, monkeypatch):
    """Merge compared slices by path and whole-slice checksums only: slice 0 prepared again with another
    shard size, slices of two splits of one corpus (K = 2 and 3, however its folder was spelled), a whole
    prepare beside one of its slices and a merged dir beside slices it overlaps were all accepted, and
    their shared documents counted twice. Slices with different shard sizes merged into a manifest that
    stated the first one's. Other corpora (told by their files' names and sizes, not by the paths typed)
    and merged dirs of other slices merge."""
    data_dir, _ = prepared
    src = write_corpus(tmp_path / "src", corpus_docs[:24])
    tok = str(data_dir / "tokenizer.json")
    monkeypatch.chdir(tmp_path)

    def part(name, index, count, inputs=("src",), **kw):
        out = tmp_path / name
        prepare(small_config(list(inputs), out, tokenizer=tok, num_slices=count, slice_index=index, **kw))
        return str(out)

    thirds = [part(f"third{i}", i, 3) for i in range(3)]
    again = part("third0_again", 0, 3, shard_tokens=999)
    half = part("half0", 0, 2, inputs=(f"{src}/../src/",))  # the same folder, spelled otherwise
    whole = part("whole", 0, 1)
    merged = str(tmp_path / "merged")
    merge(thirds[:2], merged)  # slices 0 and 1 of 3: a part of the corpus, merged
    for slices, refused in [
        ([*thirds, again], r"names slice 0 of 3 of one corpus twice \(.*third0 and .*third0_again\)"),
        ([thirds[1], thirds[2], half], r"half0 holds slice 0 of 2, .*third1 one of 3 of the same corpus"),
        ([whole, thirds[1]], r"third1 holds slice 1 of 3, .*whole one of 1"),
        ([thirds[1], again], r"third0_again was prepared with --shard-tokens 999, .*third1 with \d+"),
        ([merged, thirds[1]], r"names dirs that share shards \(.*merged and .*third1\)"),
        ([merged, whole], r"whole holds slice 0 of 1, .*merged one of 3"),
        ([merged, half], r"half0 holds slice 0 of 2, .*merged one of 3"),
    ]:
        with pytest.raises(UserError, match=refused):
            merge(slices, str(tmp_path / "refused"))
        assert not (tmp_path / "refused").exists()
    merge([merged, thirds[2]], str(tmp_path / "all"))  # the merge of 0 and 1, then 2: the whole corpus
    assert load_manifest(tmp_path / "all")["splits"]["train"]["tokens"] == load_manifest(whole)["splits"][
        "train"
    ]["tokens"]
    for name in ("whole", "third1"):  # prepared before the fingerprint: the inputs as typed stand for it
        manifest = load_manifest(tmp_path / name)
        del manifest["sources"]["corpus"]
        (tmp_path / name / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"third1 holds slice 1 of 3, .*whole one of 1 of the same corpus"):
        merge([whole, thirds[1]], str(tmp_path / "refused"))
    (tmp_path / "elsewhere").mkdir()  # another corpus, prepared whole from a folder also typed "src"
    write_corpus(tmp_path / "elsewhere" / "src", corpus_docs[24:40])
    monkeypatch.chdir(tmp_path / "elsewhere")
    report = merge([whole, part("other", 0, 1)], str(tmp_path / "two_corpora"))
    assert report["documents_kept"] == 40


def test_merge_refuses_slices_that_end_documents_with_other_tokens(prepared, tmp_path, corpus_docs):
    """A tokenizer with two end tokens, and slices prepared with different --special-tokens: the merged
    manifest named the first slice's EOS id for every slice's documents."""
    from tokenizers import Tokenizer

    from seektrain.data.tokenizer import BOS, EOS, PAD

    data_dir, _ = prepared
    tokenizer = Tokenizer.from_file(str(data_dir / "tokenizer.json"))
    tokenizer.add_special_tokens(["</s>"])
    tok = str(tmp_path / "two_ends.json")
    tokenizer.save(tok)
    src = write_corpus(tmp_path / "src", corpus_docs[:20])
    parts = [str(tmp_path / f"part{i}") for i in range(2)]
    slices = dict(tokenizer=tok, num_slices=2)
    prepare(small_config([src], parts[0], **slices, slice_index=0))
    prepare(small_config([src], parts[1], **slices, slice_index=1, special_tokens=(BOS, "</s>", PAD)))
    refused = rf"^{re.escape(parts[1])} has other special tokens .*\(eos: '<\|eos\|>' vs '</s>'\): slices"
    with pytest.raises(UserError, match=refused):
        merge(parts, str(tmp_path / "merged"))
    assert not (tmp_path / "merged").exists() and EOS != "</s>"


def test_merge_cleans_up_after_a_killed_prepare_or_merge(prepared, tmp_path, corpus_docs):
    """As prepare does: a temp dir of a killed run is removed, and a data dir swapped out by a run killed
    between its two renames is put back before the merge replaces it (it used to stay hidden, full size)."""
    data_dir, _ = prepared
    src = write_corpus(tmp_path / "src", corpus_docs[:20])
    tok = str(data_dir / "tokenizer.json")
    parts = [str(tmp_path / f"part{i}") for i in range(2)]
    for i, p in enumerate(parts):
        prepare(small_config([src], p, tokenizer=tok, num_slices=2, slice_index=i))
    dead = 2**22 + 12345  # above the default pid_max: no such process
    (tmp_path / f".merged.tmp-{dead}").mkdir()
    shutil.copytree(data_dir, tmp_path / f".merged.old-{dead}")
    merge(parts, str(tmp_path / "merged"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "part0", "part1", "src"]
    assert load_manifest(tmp_path / "merged")["sources"]["documents_kept"] == 20
