"""ds-distil prepare's readers: every input format, line vs document units, shard-and-merge, bad inputs.

Everything runs through ``ds_distil.cli.main(["prepare", ...])`` (or the readers directly)
on small files generated here; nothing is downloaded.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import random
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ds_distil import cli, data, readers

try:
    import zstandard
except ImportError:  # .zst needs the zstandard package (a dependency of prepare)
    zstandard = None

UNKNOWN_CHAR = "字"  # not in the tiny WordPiece vocabulary: one [UNK] per character


def prepare(argv: list[str], capsys) -> tuple[int, str, str]:
    """``ds-distil prepare ARGV`` through the real CLI entry point, in-process."""
    code = cli.main(["prepare", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def error_lines(err: str) -> list[str]:
    """The error lines of stderr (progress bars of datasets' loaders may precede them)."""
    assert "Traceback" not in err
    return [line for line in err.splitlines() if "error" in line.lower()]


def rows(dataset) -> list[tuple[int, ...]]:
    return [tuple(ids) for ids in dataset["input_ids"]]


def expected_line_rows(tokenizer, lines: list[str], max_len: int, min_tokens: int = 12) -> list[tuple[int, ...]]:
    """Line mode, restated: wrap, cut into the fewest near-equal chunks, drop short / mostly unknown."""
    out = []
    for line in lines:
        if not line.strip():
            continue
        ids = tokenizer(line, add_special_tokens=False)["input_ids"]
        for piece in np.array_split(np.array(ids, dtype=np.int64), max(1, -(-len(ids) // (max_len - 2)))):
            piece = piece.tolist()
            if len(piece) + 2 < min_tokens or 2 * piece.count(tokenizer.unk_token_id) >= len(piece):
                continue
            out.append(tuple([tokenizer.cls_token_id] + piece + [tokenizer.sep_token_id]))
    return out


# ---------------------------------------------------------------------------------------------
# The same documents in every format
# ---------------------------------------------------------------------------------------------

def make_documents(lines: list[str], count: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    documents, start = [], 0
    for _ in range(count):
        size = rng.randint(1, 4)
        documents.append(lines[start:start + size])
        start += size
    return documents


def write_text(path: Path, documents: list[list[str]], opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as handle:
        handle.write("\n\n".join("\n".join(d) for d in documents) + "\n")
    return path


def write_jsonl(path: Path, documents: list[list[str]], opener=open, field: str = "text") -> Path:
    with opener(path, "wt", encoding="utf-8") as handle:
        for number, document in enumerate(documents):
            handle.write(json.dumps({"id": number, field: "\n".join(document)}) + "\n")
    return path


def write_zst(path: Path, content: bytes) -> Path:
    path.write_bytes(zstandard.ZstdCompressor().compress(content))
    return path


def table(documents: list[list[str]], column: str = "text"):
    import pyarrow as pa

    return pa.table({"id": pa.array(range(len(documents)), pa.int64()),
                     column: pa.array(["\n".join(d) for d in documents], pa.string())})


def write_parquet(path: Path, documents: list[list[str]], column: str = "text") -> Path:
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table(documents, column), path)
    return path


def write_arrow(path: Path, documents: list[list[str]], file_format: bool) -> Path:
    import pyarrow as pa

    data_table = table(documents)
    with pa.OSFile(str(path), "wb") as sink:
        new = pa.ipc.new_file if file_format else pa.ipc.new_stream
        with new(sink, data_table.schema) as writer:
            writer.write_table(data_table)
    return path


def write_csv(path: Path, documents: list[list[str]], sep: str = ",", opener=open) -> Path:
    import pandas as pd

    frame = pd.DataFrame({"id": range(len(documents)), "text": ["\n".join(d) for d in documents]})
    with opener(path, "wt", encoding="utf-8", newline="") as handle:
        frame.to_csv(handle, sep=sep, index=False)
    return path


@pytest.fixture(scope="module")
def formats(tmp_path_factory, corpus_lines):
    """``{name: (input path, documents it holds)}``: one input per format and layout."""
    import datasets

    root = tmp_path_factory.mktemp("formats")
    docs = make_documents(corpus_lines, 24, seed=3)
    other = make_documents(corpus_lines[200:], 6, seed=4)  # in splits/configs that must be left out
    found = {
        "txt": (write_text(root / "docs.txt", docs), docs),
        "txt.gz": (write_text(root / "docs.txt.gz", docs, gzip.open), docs),
        "txt.bz2": (write_text(root / "docs.txt.bz2", docs, bz2.open), docs),
        "txt.xz": (write_text(root / "docs.txt.xz", docs, lzma.open), docs),
        "jsonl": (write_jsonl(root / "docs.jsonl", docs), docs),
        "jsonl.gz": (write_jsonl(root / "docs.jsonl.gz", docs, gzip.open), docs),
        "csv": (write_csv(root / "docs.csv", docs), docs),
        "tsv.bz2": (write_csv(root / "docs.tsv.bz2", docs, sep="\t", opener=bz2.open), docs),
        "parquet": (write_parquet(root / "docs.parquet", docs), docs),
        "arrow stream": (write_arrow(root / "docs.arrow", docs, file_format=False), docs),
        "arrow file": (write_arrow(root / "docs.feather", docs, file_format=True), docs),
    }
    if zstandard is not None:
        content = (root / "docs.txt").read_bytes()
        found["txt.zst"] = (write_zst(root / "docs.txt.zst", content), docs)
    saved = root / "saved"
    datasets.Dataset.from_dict({"text": ["\n".join(d) for d in docs], "n": list(range(len(docs)))}).save_to_disk(
        str(saved))
    found["saved"] = (saved, docs)

    # A repository as the hub serves it: data/{split}-NNNNN-of-NNNNN.parquet (train in two shards).
    hub = root / "hub_sharded"
    write_parquet(hub / "data" / "train-00000-of-00002.parquet", docs[:10])
    write_parquet(hub / "data" / "train-00001-of-00002.parquet", docs[10:])
    write_parquet(hub / "data" / "test-00000-of-00001.parquet", other)
    (hub / "README.md").write_text("# A corpus\n")
    found["hub data/train-*"] = (hub, docs)

    # <config>/train-*.parquet with the configurations declared in the dataset card.
    configs = root / "hub_configs"
    write_parquet(configs / "en" / "train-00000-of-00001.parquet", docs)
    write_parquet(configs / "en" / "test-00000-of-00001.parquet", other)
    write_parquet(configs / "fr" / "train-00000-of-00001.parquet", other)
    (configs / "README.md").write_text(
        "---\nconfigs:\n- config_name: en\n  default: true\n  data_files:\n  - split: train\n    path: en/train-*\n"
        "  - split: test\n    path: en/test-*\n- config_name: fr\n  data_files:\n  - split: train\n"
        "    path: fr/train-*\n---\n# Two languages\n")
    found["hub <config>/train-*"] = (configs, docs)

    # JSON data files named by split.
    json_repo = root / "hub_json"
    json_repo.mkdir()
    write_jsonl(json_repo / "train.jsonl", docs)
    write_jsonl(json_repo / "validation.jsonl", other)
    (json_repo / ".gitattributes").write_text("*.jsonl filter=lfs\n")
    found["hub train.jsonl"] = (json_repo, docs)
    return root, found


def test_every_format_reads_as_the_same_documents(formats, tmp_path, capsys):
    _, found = formats
    for name, (path, docs) in found.items():
        items = readers.collect_inputs([str(path)])
        scans = readers.check_inputs(items, "text")
        parts = readers.read_parts(items, scans, "text", "document", tmp_path / "cache", num_proc=1)
        texts = [text.strip() for part in parts for text in part.dataset["text"]]
        assert texts == ["\n".join(d) for d in docs], name
        assert all(scan.bad_utf8_count == 0 for scan in scans.values()), name
    out = capsys.readouterr().out
    assert "hub_sharded: dataset repository, split train: 2 files; left out: test (1 file)" in out
    assert "hub_configs (config en): dataset repository, split train: 1 file; left out: test (1 file)" in out
    assert "hub_json: dataset repository, split train: 1 file; left out: validation (1 file)" in out
    kinds = {name: [item.kind for item in readers.collect_inputs([str(path)])] for name, (path, _) in found.items()}
    assert kinds["tsv.bz2"] == ["tsv"] and kinds["arrow file"] == ["arrow"] and kinds["hub train.jsonl"] == ["jsonl"]
    assert [i.compression for i in readers.collect_inputs([str(found["txt.xz"][0])])] == ["xz"]


def test_prepare_reads_every_format_in_order(formats, tmp_path, bert_tokenizer_dir, capsys):
    from transformers import AutoTokenizer

    _, found = formats
    names = list(found)
    code, out, err = prepare(["--tokenizer", bert_tokenizer_dir, "--input", *[found[n][0] for n in names],
                              "--output", tmp_path / "out", "--cache-dir", tmp_path / "cache", "--max-seq-len", 40,
                              "--validation-fraction", 0], capsys)
    assert code == 0, err
    assert "warning" not in err  # valid compressed text is not "invalid UTF-8"
    tokenizer = AutoTokenizer.from_pretrained(str(bert_tokenizer_dir))
    lines = [line for n in names for d in found[n][1] for line in d]
    prepared = data.load_prepared(tmp_path / "out")
    assert rows(prepared.train) == expected_line_rows(tokenizer, lines, 40)  # every format, in input order
    kinds = [item["kind"] for item in prepared.meta["inputs"]]
    assert {"text", "jsonl", "csv", "tsv", "parquet", "arrow", "saved"} <= set(kinds)
    assert prepared.meta["unit"] == "line" and prepared.meta["text_column"] == "text"


# ---------------------------------------------------------------------------------------------
# Line vs document units, on a hand-checked example
# ---------------------------------------------------------------------------------------------

def test_line_and_document_units_hand_checked(tmp_path, bert_tokenizer_dir, capsys):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(bert_tokenizer_dir))
    words = [w for w in "the a of to and in is that for it as with was on be by this are from or".split()
             if len(tokenizer.tokenize(w)) == 1]
    assert len(words) >= 10

    def known(n: int, shift: int) -> str:
        return " ".join(words[(i + shift) % len(words)] for i in range(n))

    documents = [[known(5, 0), known(6, 1), known(4, 2)],  # A
                 [known(20, 3)],                           # B: one line longer than a sequence
                 [known(3, 4), known(3, 5)],               # C
                 [known(4, 6), known(30, 7)]]              # D: a long line after a short one
    write_text(tmp_path / "docs.txt", documents)
    write_parquet(tmp_path / "docs.parquet", documents)
    ids = {line: tokenizer(line, add_special_tokens=False)["input_ids"] for d in documents for line in d}
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    common = ["--tokenizer", bert_tokenizer_dir, "--max-seq-len", 16, "--min-tokens", 4, "--validation-fraction", 0,
              "--cache-dir", tmp_path / "cache"]

    # Line mode: every line wrapped; 20 tokens -> 10 + 10, 30 -> 10 + 10 + 10 (body 14).
    code, out, err = prepare([*common, "--input", tmp_path / "docs.txt", "--output", tmp_path / "line"], capsys)
    assert code == 0, err
    line = data.load_prepared(tmp_path / "line")
    assert [len(r) for r in rows(line.train)] == [7, 8, 6, 12, 12, 5, 5, 6, 12, 12, 12]
    assert line.meta["unit"] == "line" and line.meta["fill_ratio"] == round(97 / (11 * 16), 6)
    assert "fill ratio 55.1%: 97 real tokens in 11 sequences of up to 16 tokens" in out

    # Document mode: A1+A2 | A3 | B[:14] | B[14:] | C1+C2 | D1+D2[:10] | D2[10:24] | D2[24:].
    code, out, err = prepare([*common, "--input", tmp_path / "docs.txt", "--output", tmp_path / "doc",
                              "--unit", "document"], capsys)
    assert code == 0, err
    doc = data.load_prepared(tmp_path / "doc")
    a, b, c, d = documents
    expected = [ids[a[0]] + ids[a[1]], ids[a[2]], ids[b[0]][:14], ids[b[0]][14:], ids[c[0]] + ids[c[1]],
                ids[d[0]] + ids[d[1]][:10], ids[d[1]][10:24], ids[d[1]][24:]]
    assert rows(doc.train) == [tuple([cls] + e + [sep]) for e in expected]
    assert [len(r) for r in rows(doc.train)] == [13, 6, 16, 8, 8, 16, 16, 8]
    assert doc.meta["unit"] == "document" and doc.meta["fill_ratio"] == round(91 / (8 * 16), 6)
    assert doc.meta["report"]["documents"] == 4 and doc.meta["report"]["lines"] == 8
    assert "4 documents (0 empty), 8 lines: packed into 8 sequences (3 documents span several)" in out
    assert "fill ratio 71.1%: 91 real tokens in 8 sequences" in out

    # A parquet row is one document: the same sequences.
    code, _, err = prepare([*common, "--input", tmp_path / "docs.parquet", "--output", tmp_path / "doc_pq",
                            "--unit", "document"], capsys)
    assert code == 0, err
    assert rows(data.load_prepared(tmp_path / "doc_pq").train) == rows(doc.train)


# ---------------------------------------------------------------------------------------------
# Data quality: duplicates and unknown-heavy lines
# ---------------------------------------------------------------------------------------------

def test_dedup_and_unknown_examples(tmp_path, bert_tokenizer_dir, corpus_lines, capsys):
    first, second, third = [line for line in corpus_lines if 8 < len(line.split()) < 20][:3]
    unknown = " ".join([UNKNOWN_CHAR] * 8) + " the model layer"
    lines = [first, second, first, second + "   ", "", third, unknown, unknown, first]
    (tmp_path / "c.txt").write_text("\n".join(lines) + "\n")
    common = ["--tokenizer", bert_tokenizer_dir, "--input", tmp_path / "c.txt", "--max-seq-len", 128,
              "--min-tokens", 4, "--validation-fraction", 0, "--cache-dir", tmp_path / "cache"]
    code, out, err = prepare([*common, "--output", tmp_path / "all"], capsys)
    assert code == 0, err
    everything = data.load_prepared(tmp_path / "all")
    assert len(everything.train) == 6 and everything.meta["report"]["mostly_unknown"] == 2
    assert everything.meta["mostly_unknown_examples"] == [unknown, unknown]
    assert f"sequences at least half unknown tokens ([UNK]) look like: {unknown!r}, {unknown!r}" in out

    code, out, err = prepare([*common, "--output", tmp_path / "dedup", "--dedup"], capsys)
    assert code == 0, err
    deduplicated = data.load_prepared(tmp_path / "dedup")
    assert rows(deduplicated.train) == [rows(everything.train)[i] for i in (0, 1, 4)]  # first, second, third
    report = deduplicated.meta["report"]
    assert report["duplicates"] == 4 and report["mostly_unknown"] == 1 and report["blank"] == 1
    assert "9 lines: 1 blank skipped; 4 duplicate lines removed;" in out

    # Document mode removes repeated lines inside and across documents before packing.
    (tmp_path / "d.txt").write_text(f"{first}\n{second}\n\n{first}\n{third}\n")
    code, out, err = prepare([*common[:3], tmp_path / "d.txt", *common[4:], "--output", tmp_path / "doc",
                              "--unit", "document", "--dedup"], capsys)
    assert code == 0, err
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(bert_tokenizer_dir))

    def body(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    packed = rows(data.load_prepared(tmp_path / "doc").train)
    assert packed == [tuple([cls] + body(first) + body(second) + [sep]), tuple([cls] + body(third) + [sep])]
    assert "1 duplicate lines removed" in out


# ---------------------------------------------------------------------------------------------
# Shard and merge
# ---------------------------------------------------------------------------------------------

def test_shard_and_merge_equal_one_shot(tmp_path, bert_tokenizer_dir, corpus_lines, capsys):
    docs = make_documents(corpus_lines, 120, seed=5)
    inputs = [write_text(tmp_path / "a.txt", docs[:50]),
              write_jsonl(tmp_path / "b.jsonl", docs[50:60]),
              write_parquet(tmp_path / "c.parquet", docs[60:80]),
              write_text(tmp_path / "d.txt.gz", docs[80:100], gzip.open),
              write_csv(tmp_path / "e.csv", docs[100:])]
    common = ["--tokenizer", bert_tokenizer_dir, "--input", *inputs, "--max-seq-len", 48, "--unit", "document",
              "--validation-fraction", 0.25, "--cache-dir", tmp_path / "cache"]
    code, _, err = prepare([*common, "--output", tmp_path / "one"], capsys)
    assert code == 0, err
    shards = []
    for index in range(3):
        shards.append(tmp_path / "shards" / f"shard-{index}")
        code, out, err = prepare([*common, "--shard", f"{index}/3", "--output", shards[-1]], capsys)
        assert code == 0, err
        assert f"shard {index}/3:" in out
    sizes = [len(data.load_prepared(s).meta["inputs"]) for s in shards]
    assert sum(sizes) == 5 and all(sizes)
    code, out, err = prepare(["--merge", *reversed(shards), "--output", tmp_path / "merged"], capsys)
    assert code == 0, err
    assert "merged 3 shards into" in out
    one, merged = data.load_prepared(tmp_path / "one"), data.load_prepared(tmp_path / "merged")
    for split in ("train", "validation"):
        left, right = getattr(one, split), getattr(merged, split)
        assert len(left) > 0 and len(left) == len(right)
        # Byte for byte: the same token ids, sequence by sequence, in the same order.
        assert left.data.column("input_ids").combine_chunks().equals(right.data.column("input_ids").combine_chunks())
        assert rows(left) == rows(right)
    assert np.array_equal(one.token_counts, merged.token_counts)
    for key in ("splits", "report", "fill_ratio", "length_histogram", "num_tokens", "inputs"):
        assert one.meta[key] == merged.meta[key], key
    # The same command again: up to date.
    code, out, _ = prepare(["--merge", *shards, "--output", tmp_path / "merged"], capsys)
    assert code == 0 and "is up to date" in out

    # Wrong merges: one line each.
    bad = [
        (["--merge", *shards[:2]], "shard(s) 2 of 3 missing: prepare them"),
        (["--merge", shards[0], shards[0], *shards[1:]], "shard 0/3 is given twice"),
        (["--merge", tmp_path / "one", *shards], f"{tmp_path / 'one'} is not a shard"),
        (["--merge", *shards, "--input", inputs[0]], "--merge takes the shard directories only"),
    ]
    code, _, err = prepare([*common, "--seed", 1, "--shard", "1/3", "--output", tmp_path / "seed1"], capsys)
    assert code == 0, err
    bad.append((["--merge", shards[0], tmp_path / "seed1", shards[2]], "with seed=1 but"))
    for argv, message in bad:
        code, _, err = prepare([*argv, "--output", tmp_path / "bad"], capsys)
        assert code == 2 and len(error_lines(err)) == 1 and message in err, (argv, err)
    for spec, message in (("3/3", "expected I/N with 0 <= I < N"), ("0/9", "the inputs are 5 file(s), fewer than 9")):
        code, _, err = prepare([*common, "--shard", spec, "--output", tmp_path / "bad"], capsys)
        assert code == 2 and len(error_lines(err)) == 1 and message in err, err


def test_shard_bounds_are_contiguous_balanced_and_never_empty():
    assert readers.shard_bounds([10, 10, 10, 10], 2) == [0, 2, 4]
    assert readers.shard_bounds([100, 1, 1, 1], 3) == [0, 1, 2, 4]
    assert readers.shard_bounds([1, 1, 1, 100], 2) == [0, 3, 4]
    for sizes in ([5] * 7, [0, 0, 0], [3, 1, 4, 1, 5, 9, 2, 6]):
        for count in range(1, len(sizes) + 1):
            bounds = readers.shard_bounds(sizes, count)
            assert bounds[0] == 0 and bounds[-1] == len(sizes) and len(bounds) == count + 1
            assert all(a < b for a, b in zip(bounds, bounds[1:]))


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2 and one line naming the file or column
# ---------------------------------------------------------------------------------------------

def _truncated(path: Path, write) -> Path:
    write(path)
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    return path


def _bad_inputs(root: Path, lines: list[str]) -> list[tuple[str, list, list[str]]]:
    """``(case, extra argv, substrings of the error)``; each case writes its own files."""
    docs = [[line] for line in lines[:40]]
    text = ("\n".join(lines[:400]) + "\n").encode()
    cases = []

    def case(name: str, argv: list, *expected: str) -> None:
        cases.append((name, argv, list(expected)))

    gz = _truncated(root / "cut.txt.gz", lambda p: p.write_bytes(gzip.compress(text)))
    case("truncated gz", ["--input", gz], f"input {gz} is truncated", "download or compress it again")
    xz = _truncated(root / "cut.jsonl.xz", lambda p: write_jsonl(p, docs, lzma.open))
    case("truncated xz", ["--input", xz], f"input {xz} is truncated")
    bz = _truncated(root / "cut.csv.bz2", lambda p: write_csv(p, docs, opener=bz2.open))
    case("truncated bz2", ["--input", bz], f"input {bz} is truncated")
    if zstandard is not None:
        zst = _truncated(root / "cut.txt.zst", lambda p: write_zst(p, text))
        case("truncated zst", ["--input", zst], f"input {zst} is truncated")
    noise = root / "noise.txt"
    noise.write_bytes(random.Random(0).randbytes(16_000))
    case("random bytes", ["--input", noise], f"input {noise} is binary data (it holds NUL bytes)")
    latin = root / "latin1.txt"
    latin.write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e \xe0 la fran\xe7aise\n".encode("latin-1") * 40)
    case("mostly undecodable", ["--input", latin], f"input {latin} is not text: 40 of its 40 lines are not valid UTF-8")
    bodies = write_parquet(root / "bodies.parquet", docs, column="body")
    case("parquet missing column", ["--input", bodies],
         f"input {bodies} has no column 'text' (columns: id, body): pass --text-column NAME")
    case("parquet non-text column", ["--input", bodies, "--text-column", "id"],
         f"input {bodies}: column 'id' holds int64, not text", "(body)")
    empty = write_parquet(root / "data" / "train-00001-of-00002.parquet", [])
    case("empty parquet shard", ["--input", empty], f"input {empty} holds no rows (an empty shard)")
    cut_parquet = _truncated(root / "cut.parquet", lambda p: write_parquet(p, docs))
    case("truncated parquet", ["--input", cut_parquet], f"input {cut_parquet} is not a readable parquet file")
    arrow = write_arrow(root / "docs.arrow", docs, file_format=False)
    case("arrow missing column", ["--input", arrow, "--text-column", "body"],
         f"input {arrow} has no column 'body' (columns: id, text)")
    csv = write_csv(root / "docs.csv", docs)
    case("csv missing column", ["--input", csv, "--text-column", "body"],
         f"input {csv} has no column 'body' (columns: id, text)")
    case("csv numeric column", ["--input", csv, "--text-column", "id"], f"input {csv}: column 'id' holds numbers")
    jsonl = write_jsonl(root / "docs.jsonl", docs, field="body")
    case("jsonl missing field", ["--input", jsonl], f"input {jsonl} has no field 'text' (fields: id, body)")
    hidden_gz = root / "hidden.txt"
    hidden_gz.write_bytes(gzip.compress(text))
    case("gzip named .txt", ["--input", hidden_gz],
         f"input {hidden_gz} is gzip-compressed but its name does not say so")
    fake_gz = root / "fake.txt.gz"
    fake_gz.write_bytes(text)
    case("not gzip", ["--input", fake_gz], f"input {fake_gz} is named .gz but is not gzip data")
    archive = root / "corpus.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("corpus.txt", text)
    case("zip archive", ["--input", archive], f"input {archive} is a zip archive", "unzip")
    repo = root / "repo"
    write_parquet(repo / "en" / "train-00000-of-00001.parquet", docs)
    write_parquet(repo / "fr" / "train-00000-of-00001.parquet", docs)
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: en\n  data_files: en/*\n- config_name: fr\n"
                                    "  data_files: fr/*\n---\n")
    case("repository without default config", ["--input", repo],
         f"input {repo} is a dataset repository with 2 configurations and no default (en (en), fr (fr))",
         f"--input {repo / 'en'}")
    good = root / "good.txt"
    good.write_text("\n".join(lines[:20]) + "\n")
    case("output is a file", ["--input", good, "--output", good], f"--output {good} exists and is a file")
    case("output under a file", ["--input", good, "--output", good / "out"],
         f"--output {good / 'out'} lies under {good}, which is a file")
    return cases


def test_bad_inputs_give_one_line_and_exit_2(tmp_path, bert_tokenizer_dir, corpus_lines, capsys):
    for name, argv, expected in _bad_inputs(tmp_path, corpus_lines):
        if "--output" not in argv:
            argv = [*argv, "--output", tmp_path / "out"]
        code, out, err = prepare(["--tokenizer", bert_tokenizer_dir, *argv, "--cache-dir", tmp_path / "cache"], capsys)
        lines = error_lines(err)
        assert code == 2, (name, err)
        assert len(lines) == 1 and lines[0].startswith("ds-distil prepare: error: "), (name, err)
        for text in expected:
            assert text in lines[0], (name, lines[0])
        assert not (tmp_path / "out").exists(), name


def test_zstd_without_the_zstandard_package(tmp_path, bert_tokenizer_dir, corpus_lines, capsys, monkeypatch):
    path = tmp_path / "c.txt.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd" + b"\0" * 16)  # a zstd magic number is enough to get there
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import zstandard now raises ImportError
    code, _, err = prepare(["--tokenizer", bert_tokenizer_dir, "--input", path, "--output", tmp_path / "out",
                            "--cache-dir", tmp_path / "cache"], capsys)
    assert code == 2 and error_lines(err) == [
        f"ds-distil prepare: error: input {path} is zstd-compressed and the zstandard package is not installed: "
        f"pip install zstandard (or decompress it first: zstd -d {path})"]


def test_mostly_valid_text_is_kept_with_a_warning(tmp_path, bert_tokenizer_dir, corpus_lines, capsys):
    # Few bad lines: decoded with U+FFFD and reported (not refused); compressed files count lines the same way.
    content = "\n".join(corpus_lines[:20]).encode() + b"\ncaf\xe9 " + corpus_lines[20].encode() + b"\n"
    path = tmp_path / "mixed.txt.gz"
    path.write_bytes(gzip.compress(content))
    code, _, err = prepare(["--tokenizer", bert_tokenizer_dir, "--input", path, "--output", tmp_path / "out",
                            "--cache-dir", tmp_path / "cache"], capsys)
    assert code == 0, err
    assert f"warning: {path}: 1 line(s) are not valid UTF-8 (line 21)" in err


def test_slurm_array_script_shards_and_merges(tmp_path, bert_tokenizer_dir, corpus_lines):
    """slurm/prepare_array.sbatch run as SLURM would run it: two array tasks, then the merge."""
    import os
    import subprocess

    from conftest import REPO_ROOT, child_env

    inputs = [write_text(tmp_path / f"{name}.txt", [[line] for line in corpus_lines[i * 100:(i + 1) * 100]])
              for i, name in enumerate("abc")]
    script = str(REPO_ROOT / "slurm" / "prepare_array.sbatch")
    env = child_env(DS_DISTIL_CMD=f"{sys.executable} -m ds_distil", PYTHONPATH=str(REPO_ROOT),
                    DS_DISTIL_CACHE=str(tmp_path / "cache"), SLURM_ARRAY_JOB_ID="7", SLURM_ARRAY_TASK_MIN="0",
                    SLURM_ARRAY_TASK_MAX="1", SLURM_CPUS_PER_TASK="1")
    out = tmp_path / "data"
    for task in ("0", "1"):
        done = subprocess.run(["bash", script, str(bert_tokenizer_dir), str(out), *map(str, inputs), "--",
                               "--max-seq-len", "64"], env={**env, "SLURM_ARRAY_TASK_ID": task},
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert f"shard {task}/2" in done.stdout
    assert sorted(os.listdir(tmp_path / "data.shards")) == ["shard-0", "shard-1"]
    done = subprocess.run(["bash", script, "--merge", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    merged = data.load_prepared(out)
    assert [m["shard"] for m in merged.meta["merged_from"]] == [0, 1]
    assert [Path(i["path"]).name for i in merged.meta["inputs"]] == ["a.txt", "b.txt", "c.txt"]
    done = subprocess.run(["bash", script, str(bert_tokenizer_dir), str(out), str(inputs[0])], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "not an array task" in done.stderr
