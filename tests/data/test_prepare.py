"""prepare end to end on toy corpora: round trip, determinism, sources, atomicity, slices + merge."""

import gzip
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_helpers import make_docs, small_config, write_corpus
from tokenizers import Tokenizer

from seektrain.data.clean import CleanConfig
from seektrain.data.merge import merge
from seektrain.data.prepare import _recover_interrupted, prepare
from seektrain.data.shards import load_manifest
from seektrain.errors import UserError


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


def test_interrupted_runs_are_cleaned_up(prepared, tmp_path, corpus_docs):
    data_dir, _ = prepared
    src = write_corpus(tmp_path / "src", corpus_docs[:20])
    dead = 2**22 + 12345  # above the default pid_max: no such process
    (tmp_path / f".out.tmp-{dead}").mkdir()  # a prepare killed while writing
    shutil.copytree(data_dir, tmp_path / f".out.old-{dead}")  # one killed between the two renames of the swap
    (tmp_path / ".out.tmp-1").mkdir()  # pid 1 is alive: not ours to touch
    _recover_interrupted(tmp_path / "out")
    assert (tmp_path / "out/manifest.json").read_bytes() == (data_dir / "manifest.json").read_bytes()
    prepare(small_config([src], tmp_path / "out", tokenizer=str(data_dir / "tokenizer.json")))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.tmp-1", "out", "src"]


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


def test_foreign_tokenizer_eos_fallback_and_missing_eos(tmp_path, corpus_docs):
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
