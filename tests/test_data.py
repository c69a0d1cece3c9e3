"""ds-distil prepare: formats, chunking and filtering, meta, cache reuse, bad input, loaders."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ds_distil import data
from ds_distil.batching import GlobalBatchSampler
from ds_distil.errors import UserError
from ds_distil.masking import IGNORE_INDEX, MaskingCollator

from conftest import REPO_ROOT

UNKNOWN_CHAR = "字"  # not in the tiny WordPiece vocabulary: one [UNK] per character


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``ds-distil prepare ARGV`` in-process, with cli.main's handling of UserError."""
    parser = argparse.ArgumentParser(prog="ds-distil prepare")
    data.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        code = data.run(args)
    except UserError as err:
        for problem in err.problems:
            print(f"ds-distil prepare: error: {problem}", file=sys.stderr)
        code = 2
    out = capsys.readouterr()
    return code, out.out, out.err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error:" in line]


def rows(dataset) -> list[tuple[int, ...]]:
    return [tuple(ids) for ids in dataset["input_ids"]]


def expected_rows(tokenizer, lines: list[str], max_len: int, min_tokens: int = 12) -> list[tuple[int, ...]]:
    """The spec, restated: wrap, cut into the fewest near-equal chunks, drop short / mostly unknown."""
    out = []
    for line in lines:
        if not line.strip():
            continue
        ids = tokenizer(line, add_special_tokens=False)["input_ids"]
        body = max_len - 2
        for piece in np.array_split(np.array(ids, dtype=np.int64), max(1, -(-len(ids) // body))):
            piece = piece.tolist()
            if len(piece) + 2 < min_tokens or 2 * piece.count(tokenizer.unk_token_id) >= len(piece):
                continue
            out.append(tuple([tokenizer.cls_token_id] + piece + [tokenizer.sep_token_id]))
    return out


# ---------------------------------------------------------------------------------------------
# A corpus in every input format, prepared once for the read-only tests
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory, corpus_lines):
    import datasets

    root = tmp_path_factory.mktemp("corpus")
    text_dir = root / "text"
    (text_dir / "sub").mkdir(parents=True)
    (text_dir / "a.txt").write_text("\n".join(corpus_lines[:150]) + "\n\n")
    (text_dir / "sub" / "b.txt").write_text("\n".join(corpus_lines[150:300]))  # no final newline
    (text_dir / ".hidden.txt").write_text("hidden " * 50 + "\n")  # skipped: hidden
    with open(root / "extra.jsonl", "w") as handle:
        for number, line in enumerate(corpus_lines[300:350]):
            handle.write(json.dumps({"id": number, "text": line, "meta": {"x": [1, 2]}}) + "\n")
    # A saved dataset inside the directory is read as a dataset, not as files.
    saved = datasets.Dataset.from_dict({"text": corpus_lines[350:], "n": list(range(50)), "label": ["x"] * 50})
    saved.save_to_disk(str(text_dir / "saved"))
    inputs = [str(text_dir), str(root / "extra.jsonl")]
    return root, inputs, corpus_lines


@pytest.fixture(scope="module")
def prepared(corpus, bert_teacher_dir):
    root, inputs, lines = corpus
    out = root / "prepared"
    meta = data.prepare_corpus(bert_teacher_dir, inputs, out, max_seq_len=48, validation_fraction=0.2,
                               cache_dir=root / "cache")
    return out, meta


def test_all_input_formats_are_tokenised_wrapped_and_cut(corpus, prepared, bert_teacher_dir):
    import datasets
    from transformers import AutoTokenizer

    _, _, lines = corpus
    out, meta = prepared
    tokenizer = AutoTokenizer.from_pretrained(str(bert_teacher_dir))
    loaded = datasets.load_from_disk(str(out))  # plain datasets can read it
    assert isinstance(loaded, datasets.DatasetDict) and set(loaded) == {"train", "validation"}
    assert loaded["train"].features["input_ids"].feature.dtype == "uint16"
    produced = rows(loaded["train"]) + rows(loaded["validation"])
    expected = expected_rows(tokenizer, lines, max_len=48)
    assert sorted(produced) == sorted(expected)  # every line, every format, hidden file skipped
    assert meta["report"]["cut"] > 0  # some corpus lines are longer than 48 tokens
    for split in loaded.values():
        assert split["length"] == [len(ids) for ids in split["input_ids"]]
        assert max(split["length"]) <= 48 and min(split["length"]) >= 12


def test_mixed_inputs_rerun_from_the_cache(corpus, prepared, bert_teacher_dir, capsys):
    root, inputs, _ = corpus
    out, meta = prepared
    capsys.readouterr()
    again = data.prepare_corpus(bert_teacher_dir, inputs, root / "again", max_seq_len=48, validation_fraction=0.2,
                                cache_dir=root / "cache")
    assert "reusing the cached tokenisation" in capsys.readouterr().out
    assert again["splits"] == meta["splits"] and again["inputs"] == meta["inputs"]
    assert [item["kind"] for item in meta["inputs"]] == ["text", "saved", "text", "jsonl"]


def test_meta_counts_and_token_counts(prepared, bert_teacher_dir):
    from transformers import AutoTokenizer

    out, meta = prepared
    tokenizer = AutoTokenizer.from_pretrained(str(bert_teacher_dir))
    loaded = data.load_prepared(out)
    assert meta == loaded.meta
    tok = meta["tokenizer"]
    assert tok["fingerprint"] == data.tokenizer_fingerprint(tokenizer)
    assert tok["vocab_size"] == len(tokenizer) == 160
    assert tok["mask_token_id"] == tokenizer.mask_token_id and tok["pad_token_id"] == tokenizer.pad_token_id
    assert tok["all_special_ids"] == sorted(tokenizer.all_special_ids)
    assert tok["prefix_ids"] == [tokenizer.cls_token_id] and tok["suffix_ids"] == [tokenizer.sep_token_id]
    assert tok["model_max_length"] == 128  # max_position_embeddings of the teacher's config.json
    assert meta["max_seq_len"] == 48 and meta["token_dtype"] == "uint16"
    train_ids = [i for ids in loaded.train["input_ids"] for i in ids]
    assert meta["splits"]["train"] == {"sequences": len(loaded.train), "tokens": len(train_ids)}
    assert meta["splits"]["validation"]["sequences"] == len(loaded.validation)
    assert meta["num_sequences"] == len(loaded.train) + len(loaded.validation)
    assert np.array_equal(loaded.token_counts, np.bincount(train_ids, minlength=160))
    assert loaded.token_counts.dtype == np.int64
    histogram = dict(zip(meta["length_histogram"]["lengths"], meta["length_histogram"]["counts"]))
    assert histogram == {int(k): int(v) for k, v in zip(*np.unique(loaded.train["length"], return_counts=True))}
    assert np.array_equal(loaded.lengths("train"), np.array(loaded.train["length"]))
    # About 20% of the lines are held out (a seeded hash per line).
    share = len(loaded.validation) / meta["num_sequences"]
    assert 0.1 < share < 0.3


def test_crafted_chunking_and_filtering(tmp_path, bert_tokenizer_dir, capsys):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(bert_tokenizer_dir))
    words = [w for w in "the a of to and in is that for it as with was on be by this are from or".split()
             if len(tokenizer.tokenize(w)) == 1]
    assert len(words) >= 10 and tokenizer.tokenize(UNKNOWN_CHAR) == ["[UNK]"]
    unk = UNKNOWN_CHAR

    def known(n: int) -> str:
        return " ".join(words[i % len(words)] for i in range(n))

    lines = [
        known(10),                            # 12 tokens with [CLS]/[SEP]: kept
        known(9),                             # 11 tokens: dropped (too short)
        "",                                   # blank
        "   ",                                # blank
        known(6) + " " + " ".join([unk] * 6),  # half unknown: dropped
        known(7) + " " + " ".join([unk] * 5),  # less than half unknown: kept
        known(70),                            # 70 > 30: cut into 24 + 23 + 23
    ]
    corpus = tmp_path / "crafted.txt"
    corpus.write_text("\n".join(lines) + "\n")
    code, out, err = run_cli(["--tokenizer", str(bert_tokenizer_dir), "--input", str(corpus), "--output",
                              str(tmp_path / "out"), "--max-seq-len", "32", "--validation-fraction", "0",
                              "--cache-dir", str(tmp_path / "cache")], capsys)
    assert code == 0, err
    prepared = data.load_prepared(tmp_path / "out")
    got = rows(prepared.train)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    long_ids = tokenizer(known(70), add_special_tokens=False)["input_ids"]
    chunks = [r for r in got if len(r) > 20]
    assert [len(r) for r in chunks] == [26, 25, 25]
    assert all(r[0] == cls and r[-1] == sep for r in got)
    assert [i for r in chunks for i in r[1:-1]] == long_ids  # nothing lost or reordered
    assert sorted(len(r) for r in got if len(r) <= 20) == [12, 14]
    assert len(prepared.validation) == 0
    report = prepared.meta["report"]
    assert report == {**report, "lines": 7, "blank": 2, "too_short": 1, "mostly_unknown": 1, "cut": 1,
                      "chunks_from_cut": 3, "kept": 5}
    assert "2 blank skipped; 1 longer than the maximum cut into 3 chunks; dropped 1 of 11 tokens or fewer " \
           "and 1 at least half unknown tokens; 5 sequences kept" in out


def test_roberta_tokenizer_wraps_in_s_tags_and_caps_length(tmp_path, roberta_teacher_dir, corpus_lines, capsys):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(roberta_teacher_dir))
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(corpus_lines[:60]))
    meta = data.prepare_corpus(roberta_teacher_dir, [str(corpus)], tmp_path / "out", cache_dir=tmp_path / "cache")
    # RoBERTa positions start after the padding index: 130 positions - 2 = 128 tokens.
    assert meta["max_seq_len"] == 128
    prepared = data.load_prepared(tmp_path / "out")
    got = rows(prepared.train) + rows(prepared.validation)
    assert sorted(got) == sorted(expected_rows(tokenizer, corpus_lines[:60], 128))
    assert all(r[0] == tokenizer.bos_token_id and r[-1] == tokenizer.eos_token_id for r in got)


def test_large_vocabulary_is_stored_as_int32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate(specials + [f"w{i}" for i in range(70_000)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                           special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]", model_max_length=64
                            ).save_pretrained(str(tmp_path / "tok"))
    line = " ".join(f"w{i}" for i in range(69_980, 70_000))
    (tmp_path / "c.txt").write_text(line + "\n")
    meta = data.prepare_corpus(tmp_path / "tok", [str(tmp_path / "c.txt")], tmp_path / "out",
                               validation_fraction=0, cache_dir=tmp_path / "cache")
    prepared = data.load_prepared(tmp_path / "out")
    assert meta["token_dtype"] == "int32"
    assert prepared.train.features["input_ids"].feature.dtype == "int32"
    assert prepared.train[0]["input_ids"] == AutoTokenizer.from_pretrained(str(tmp_path / "tok"))(line)["input_ids"]
    assert max(prepared.train[0]["input_ids"]) == 70_004 and prepared.token_counts[70_004] == 1


# ---------------------------------------------------------------------------------------------
# Re-runs: the cache, up-to-date outputs, num_proc
# ---------------------------------------------------------------------------------------------

def test_rerun_reuses_the_cache_and_num_proc_gives_the_same_data(tmp_path, bert_tokenizer_dir, corpus_lines, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(corpus_lines))
    args = ["--tokenizer", str(bert_tokenizer_dir), "--input", str(corpus), "--output", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache"), "--max-seq-len", "40"]
    code, out, err = run_cli(args, capsys)
    assert code == 0 and "tokenising 400 lines" in out, err
    cached = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "tokenised").glob("*.arrow")}
    first = data.load_prepared(tmp_path / "out")
    first_rows = (rows(first.train), rows(first.validation))

    # Same command: the output is up to date, nothing is done.
    code, out, err = run_cli(args, capsys)
    assert code == 0 and "is up to date" in out and "tokenising" not in out

    # --force rebuilds the output from the cached tokenisation.
    code, out, err = run_cli(args + ["--force"], capsys)
    assert code == 0 and "reusing the cached tokenisation" in out and "tokenising" not in out
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "tokenised").glob("*.arrow")} == cached
    again = data.load_prepared(tmp_path / "out")
    assert (rows(again.train), rows(again.validation)) == first_rows

    # An edited input is tokenised again.
    with open(corpus, "a") as handle:
        handle.write("\n" + corpus_lines[0])
    code, out, err = run_cli(args + ["--force"], capsys)
    assert code == 0 and "tokenising 401 lines" in out

    # Two processes produce exactly the same splits, in the same order.
    corpus.write_text("\n".join(corpus_lines))
    code, out, err = run_cli(args[:5] + [str(tmp_path / "out2"), "--cache-dir", str(tmp_path / "cache2"),
                                         "--max-seq-len", "40", "--num-proc", "2"], capsys)
    assert code == 0 and "with 2 process(es)" in out, err
    parallel = data.load_prepared(tmp_path / "out2")
    assert (rows(parallel.train), rows(parallel.validation)) == first_rows


# ---------------------------------------------------------------------------------------------
# Bad input: one clear line, exit 2 (or a warning and exit 0 where the work goes on)
# ---------------------------------------------------------------------------------------------

def base_args(tokenizer_dir, tmp_path, *inputs) -> list[str]:
    return ["--tokenizer", str(tokenizer_dir), "--input", *map(str, inputs), "--output", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache")]


def test_missing_input_path(tmp_path, bert_tokenizer_dir, capsys):
    code, _, err = run_cli(base_args(bert_tokenizer_dir, tmp_path, tmp_path / "nope.txt"), capsys)
    assert code == 2
    assert error_lines(err) == [f"ds-distil prepare: error: input {tmp_path / 'nope.txt'} does not exist: "
                                "check the path given to --input"]
    assert not (tmp_path / "out").exists()


def test_empty_corpus_and_corpus_of_short_lines(tmp_path, bert_tokenizer_dir, capsys):
    (tmp_path / "empty.txt").write_text("")
    code, _, err = run_cli(base_args(bert_tokenizer_dir, tmp_path, tmp_path / "empty.txt"), capsys)
    assert code == 2 and len(error_lines(err)) == 1
    assert f"the inputs ({tmp_path / 'empty.txt'}) hold no text" in err
    (tmp_path / "short.txt").write_text("the model\n\nsmall fast\n")
    code, _, err = run_cli(base_args(bert_tokenizer_dir, tmp_path, tmp_path / "short.txt"), capsys)
    assert code == 2 and "no sequence of 12 tokens or more in the inputs" in error_lines(err)[0]
    (tmp_path / "emptydir").mkdir()
    code, _, err = run_cli(base_args(bert_tokenizer_dir, tmp_path, tmp_path / "emptydir"), capsys)
    assert code == 2 and "holds no files" in error_lines(err)[0]
    assert not (tmp_path / "out").exists()


def test_non_utf8_lines_are_replaced_counted_and_reported(tmp_path, bert_tokenizer_dir, corpus_lines, capsys):
    good = [line for line in corpus_lines if len(line.split()) > 20][:3]
    bad = "caf\xe9 ".encode("latin-1") + good[0].encode()  # \xe9 alone is not UTF-8
    (tmp_path / "mixed.txt").write_bytes(good[1].encode() + b"\n" + good[2].encode() + b"\n" + bad + b"\n")
    code, out, err = run_cli(base_args(bert_tokenizer_dir, tmp_path, tmp_path / "mixed.txt")
                             + ["--validation-fraction", "0"], capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "warning:" in line]
    assert warnings == [f"ds-distil prepare: warning: {tmp_path / 'mixed.txt'}: 1 line(s) are not valid UTF-8 "
                        "(line 3); they were decoded with U+FFFD replacement characters: convert the file to UTF-8 "
                        "(e.g. iconv -f latin1 -t utf-8) if that is wrong"]
    prepared = data.load_prepared(tmp_path / "out")
    assert len(prepared.train) == 3 and prepared.meta["report"]["bad_utf8_lines"] == 1


def test_bad_jsonl_lines_are_skipped_with_a_warning(tmp_path, bert_tokenizer_dir, corpus_lines, capsys):
    lines = [json.dumps({"text": line}) for line in corpus_lines[:20]]
    lines[3] = "{not json"
    lines[5] = json.dumps({"body": corpus_lines[5]})
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    code, _, err = run_cli(base_args(bert_tokenizer_dir, tmp_path, tmp_path / "c.jsonl"), capsys)
    assert code == 0, err
    assert "c.jsonl: 1 line(s) are not valid JSON (line 4)" in err
    assert "c.jsonl: 1 JSON line(s) have no string 'text' field" in err
    assert data.load_prepared(tmp_path / "out").meta["report"]["lines"] == 18


def test_tokenizer_directory_that_is_not_a_tokenizer(tmp_path, corpus_lines, capsys):
    (tmp_path / "c.txt").write_text("\n".join(corpus_lines[:5]))
    for name, setup in [("empty", lambda d: None),
                        ("garbage", lambda d: (d / "tokenizer.json").write_text("{not json"))]:
        directory = tmp_path / name
        directory.mkdir()
        setup(directory)
        code, _, err = run_cli(base_args(directory, tmp_path, tmp_path / "c.txt"), capsys)
        assert code == 2 and len(error_lines(err)) == 1
        assert f"error: --tokenizer {directory} is not a tokenizer directory (" in err
        assert "pass the teacher's directory" in err
    code, _, err = run_cli(base_args(tmp_path / "missing", tmp_path, tmp_path / "c.txt"), capsys)
    assert code == 2 and f"--tokenizer {tmp_path / 'missing'} does not exist" in err


def test_max_seq_len_above_the_model_maximum(tmp_path, bert_teacher_dir, corpus_lines, capsys):
    (tmp_path / "c.txt").write_text("\n".join(corpus_lines[:5]))
    code, _, err = run_cli(base_args(bert_teacher_dir, tmp_path, tmp_path / "c.txt") + ["--max-seq-len", "256"], capsys)
    assert code == 2
    assert error_lines(err) == [f"ds-distil prepare: error: --max-seq-len 256 is above the model's maximum of 128 "
                                f"(max_position_embeddings in config.json in {Path(bert_teacher_dir).resolve()}): "
                                "pass --max-seq-len 128 or less"]
    code, _, err = run_cli(base_args(bert_teacher_dir, tmp_path, tmp_path / "c.txt")
                           + ["--validation-fraction", "1.5"], capsys)
    assert code == 2 and "--validation-fraction 1.5 must be in [0, 1)" in err


def test_prepared_data_with_another_tokenizer_is_refused(prepared, roberta_teacher_dir, bert_teacher_dir):
    from transformers import AutoTokenizer

    out, meta = prepared
    loaded = data.load_prepared(out)
    data.check_tokenizer_matches(meta, AutoTokenizer.from_pretrained(str(bert_teacher_dir)), out)  # same: fine
    roberta = AutoTokenizer.from_pretrained(str(roberta_teacher_dir))
    with pytest.raises(UserError) as caught:
        data.check_tokenizer_matches(meta, roberta, out)
    message = str(caught.value)
    assert f"{out} was prepared with another tokenizer" in message and "ds-distil prepare --tokenizer" in message
    assert "\n" not in message
    with pytest.raises(UserError, match="prepared with another tokenizer"):
        MaskingCollator.from_prepared(loaded, tokenizer=roberta)


def test_existing_output_is_never_overwritten_half_way(tmp_path, bert_tokenizer_dir, corpus_lines, capsys):
    (tmp_path / "c.txt").write_text("\n".join(corpus_lines[:80]))
    args = base_args(bert_tokenizer_dir, tmp_path, tmp_path / "c.txt")
    assert run_cli(args, capsys)[0] == 0
    before = (tmp_path / "out" / "meta.json").read_text()
    # Other inputs into the same output: refused without --force.
    (tmp_path / "d.txt").write_text("\n".join(corpus_lines[80:160]))
    code, _, err = run_cli(base_args(bert_tokenizer_dir, tmp_path, tmp_path / "d.txt"), capsys)
    assert code == 2 and f"--output {tmp_path / 'out'} already exists (with other data): pass --force" in err
    # A forced run that fails part-way leaves the old data complete and readable.
    (tmp_path / "short.txt").write_text("the model\n")
    code, _, err = run_cli(base_args(bert_tokenizer_dir, tmp_path, tmp_path / "short.txt") + ["--force"], capsys)
    assert code == 2
    assert (tmp_path / "out" / "meta.json").read_text() == before
    assert len(data.load_prepared(tmp_path / "out").train) > 0
    # A leftover temporary directory of a dead run is cleaned up; a successful forced run replaces the data.
    stale = tmp_path / ".out.partial-999999999"
    stale.mkdir()
    code, _, err = run_cli(base_args(bert_tokenizer_dir, tmp_path, tmp_path / "d.txt") + ["--force"], capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "meta.json").read_text() != before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []
    # A directory that is not prepared data is never replaced, even with --force.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    args = base_args(bert_tokenizer_dir, tmp_path, tmp_path / "d.txt")
    args[args.index("--output") + 1] = str(tmp_path / "mine")
    code, _, err = run_cli(args + ["--force"], capsys)
    assert code == 2 and f"--output {tmp_path / 'mine'} exists and is not prepared data" in err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    # Missing parent directories are created.
    args[args.index("--output") + 1] = str(tmp_path / "new" / "nested" / "out")
    assert run_cli(args, capsys)[0] == 0
    assert data.load_prepared(tmp_path / "new" / "nested" / "out").meta["num_sequences"] > 0


def test_load_prepared_on_a_directory_that_is_not_prepared(tmp_path):
    with pytest.raises(UserError, match=rf"{tmp_path} is not prepared data \(no meta.json\): run ds-distil prepare"):
        data.load_prepared(tmp_path)
    with pytest.raises(UserError, match="does not exist: run ds-distil prepare --output"):
        data.load_prepared(tmp_path / "missing")


def test_cli_subprocess(tmp_path, bert_tokenizer_dir, corpus_lines):
    # Runs the real `python -m ds_distil prepare`: passes once cli.py registers
    # ("prepare", "ds_distil.data", ...) in SUBCOMMANDS (the lead's change).
    (tmp_path / "c.txt").write_text("\n".join(corpus_lines[:50]))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    prepare = [sys.executable, "-m", "ds_distil", "prepare"]
    done = subprocess.run(prepare + base_args(bert_tokenizer_dir, tmp_path, tmp_path / "c.txt"),
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "ds-distil prepare: wrote" in done.stdout
    done = subprocess.run(prepare + base_args(bert_tokenizer_dir, tmp_path, tmp_path / "missing.txt"),
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip() == f"ds-distil prepare: error: input {tmp_path / 'missing.txt'} does not exist: " \
                                  "check the path given to --input"


# ---------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------

def batches_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def test_train_loader_follows_the_sampler_whatever_the_workers(prepared):
    out, _ = prepared
    loaded = data.load_prepared(out)
    collator = MaskingCollator.from_prepared(loaded, seed=5)
    lengths = loaded.lengths()
    for rank in range(2):
        sampler = GlobalBatchSampler(lengths, global_batch_size=16, micro_batch_size=2, world_size=2, rank=rank, seed=1)
        serial = list(data.make_train_loader(loaded.train, sampler, collator, epoch=1, num_workers=0))
        parallel = list(data.make_train_loader(loaded.train, sampler, collator, epoch=1, num_workers=2))
        assert len(serial) == sampler.steps_per_epoch * sampler.accumulation_steps
        assert all(batches_equal(a, b) for a, b in zip(serial, parallel, strict=True))
        expected = [(step, slot, batch) for step, micro in sampler.iter_epoch(1) for slot, batch in enumerate(micro)]
        for item, (step, slot, indices) in zip(serial, expected, strict=True):
            assert (item["step"], item["micro_step"]) == (step, slot)
            assert item["sample_indices"].tolist() == indices
            # Uncorrupted positions hold the dataset's own tokens.
            for row, index in enumerate(indices):
                ids = torch.tensor(loaded.train[index]["input_ids"])
                keep = item["labels"][row, :len(ids)] == IGNORE_INDEX
                assert torch.equal(item["input_ids"][row, :len(ids)][keep], ids[keep])
                assert item["attention_mask"][row].sum() == len(ids)
        # Resuming at step 3 gives exactly the rest.
        resumed = list(data.make_train_loader(loaded.train, sampler, collator, epoch=1, start_step=3, num_workers=1))
        skip = 3 * sampler.accumulation_steps
        assert all(batches_equal(a, b) for a, b in zip(serial[skip:], resumed, strict=True))


def test_eval_loader_covers_validation_once_with_fixed_masks(prepared):
    out, _ = prepared
    loaded = data.load_prepared(out)
    collator = MaskingCollator.from_prepared(loaded)
    n = len(loaded.validation)
    for world_size in (1, 2, 3):
        shares = [data.eval_batches(n, 4, world_size, rank) for rank in range(world_size)]
        assert len({len(share) for share in shares}) == 1  # the same number of batches on every rank
        seen = [int(i) for share in shares for batch in share for i in batch]
        assert sorted(seen) == list(range(n))
        assert all(0 < len(batch) <= 4 for share in shares for batch in share)
    first = list(data.make_eval_loader(loaded.validation, collator, 4, world_size=2, rank=1, num_workers=0))
    second = list(data.make_eval_loader(loaded.validation, collator, 4, world_size=2, rank=1, num_workers=1))
    assert all(batches_equal(a, b) for a, b in zip(first, second, strict=True))
    # Fewer samples than ranks: the extra rank gets an empty batch rather than a missing one.
    assert [len(b) for r in range(3) for b in data.eval_batches(2, 4, 3, r)] == [1, 1, 0]


def test_held_out_lines_are_exactly_the_lines_of_the_validation_split(corpus_file, prepared_dir, bert_teacher_dir):
    """A downstream task evaluated on text no model saw in pretraining (the demo's word-order
    task) picks its lines with ``held_out_lines``: it must agree with ``prepare``'s split."""
    import datasets
    from transformers import AutoTokenizer

    lines = [line for line in corpus_file.read_text().splitlines() if line.strip()]
    held = data.held_out_lines(lines, fraction=0.05, seed=0)  # the fixture's fraction and seed
    assert 0 < held.sum() < len(lines)
    tokenizer = AutoTokenizer.from_pretrained(str(bert_teacher_dir))
    loaded = datasets.load_from_disk(str(prepared_dir))
    for split, picked in (("validation", held), ("train", ~held)):
        chosen = [line for line, keep in zip(lines, picked) if keep]
        assert sorted(rows(loaded[split])) == sorted(expected_rows(tokenizer, chosen, max_len=64)), split
    assert not data.held_out_lines(lines, fraction=0.0, seed=0).any()
