"""``ds-distil demo``: the corpus and downstream task it builds, its bad inputs, and a whole
miniature run end to end (real launcher, real training, real fine-tuning)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import child_env
from ds_distil import demo
from ds_distil.cli import main as cli_main


def test_harvest_labels_every_paragraph_with_its_package(tmp_path):
    corpus, sources = tmp_path / "corpus.txt", tmp_path / "sources.txt"
    stats = demo.harvest_docstrings(corpus, sources, target_bytes=200_000)
    lines, label_lines = corpus.read_text().splitlines(), sources.read_text().splitlines()
    # A blank line ends each file's paragraphs (one document each), on the same line of both.
    assert len(lines) == len(label_lines)
    assert [i for i, t in enumerate(lines) if not t] == [i for i, s in enumerate(label_lines) if not s]
    assert 1 < lines.count("") <= stats["files"]
    texts, labels = [t for t in lines if t], [s for s in label_lines if s]
    assert len(texts) == stats["paragraphs"] > 100
    assert set(labels) <= {demo.STDLIB, *demo.DOC_PACKAGES}
    assert len(set(labels)) >= 3  # packages are interleaved: a small corpus still has several
    assert all(len(t.split()) >= 8 for t in texts)
    assert len(set(t.lower() for t in texts)) == len(texts)  # deduplicated


def test_source_task_is_balanced_disjoint_and_uses_the_largest_packages(tmp_path):
    corpus, sources = tmp_path / "corpus.txt", tmp_path / "sources.txt"
    sizes = {"numpy": 30, "torch": 25, "python": 40, "pip": 5}
    rows = [(f"{pkg} paragraph number {i} with enough words to pass", pkg) for pkg, n in sizes.items()
            for i in range(n)]
    corpus.write_text("".join(t + "\n" for t, _ in rows))
    sources.write_text("".join(p + "\n" for _, p in rows))
    task = demo.build_source_task(corpus, sources, tmp_path / "task", classes=3, train_per_class=15,
                                  dev_per_class=5)
    assert task["classes"] == ["numpy", "python", "torch"] and task["chance"] == pytest.approx(1 / 3)
    train = [json.loads(line) for line in (tmp_path / "task" / "train.jsonl").read_text().splitlines()]
    dev = [json.loads(line) for line in (tmp_path / "task" / "dev.jsonl").read_text().splitlines()]
    assert len(train) == 45 and len(dev) == 15
    for label in task["classes"]:
        assert sum(r["label"] == label for r in train) == 15 and sum(r["label"] == label for r in dev) == 5
    assert not {r["text"] for r in train} & {r["text"] for r in dev}
    assert all(r["text"].startswith(r["label"]) for r in train + dev)  # labels follow their paragraphs
    with pytest.raises(demo.UserError, match="fewer than two packages"):
        demo.build_source_task(corpus, sources, tmp_path / "t2", classes=3, train_per_class=30, dev_per_class=5)


def test_workdir_that_is_a_file_or_under_one_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("keep me")
    for workdir in (tmp_path / "file", tmp_path / "file" / "run"):
        assert cli_main(["demo", "--workdir", str(workdir)]) == 2
        err = capsys.readouterr().err
        assert str(tmp_path / "file") in err and "Traceback" not in err
    assert (tmp_path / "file").read_text() == "keep me"


def test_a_damaged_summary_is_reported_and_not_trusted(tmp_path, capsys):
    path = tmp_path / "summary.json"
    path.write_text('{"models": {"teacher": ')
    assert demo._read_summary(path) is None
    assert "damaged" in capsys.readouterr().err
    path.write_text(json.dumps({"models": {}}))  # valid JSON, not a summary
    assert demo._read_summary(path) is None


def test_word_order_task_is_balanced_shuffles_only_word_order_and_evaluates_on_held_out_text(tmp_path):
    from ds_distil.data import held_out_lines

    corpus = tmp_path / "corpus.txt"
    paragraphs = [f"paragraph {i} says that the model reads its words in order {i % 7}" for i in range(3000)]
    corpus.write_text("\n".join(paragraphs[:1500] + [""] + paragraphs[1500:]) + "\n")  # a blank line ends a file
    task = demo.build_word_order_task(corpus, tmp_path / "task", train=200, dev=50)
    assert task["classes"] == ["original", "shuffled"] and task["chance"] == 0.5
    splits = {name: [json.loads(line) for line in (tmp_path / "task" / f"{name}.jsonl").read_text().splitlines()]
              for name in ("train", "dev")}
    held = dict(zip(paragraphs, held_out_lines(paragraphs, demo.VALIDATION_FRACTION, demo.SPLIT_SEED)))
    by_words = {tuple(sorted(p.split())): p for p in paragraphs}  # the numbers make each bag of words unique
    for name, rows in splits.items():
        assert len(rows) == {"train": 200, "dev": 50}[name] == task[name]
        assert sum(r["label"] == "shuffled" for r in rows) == len(rows) // 2
        for row in rows:
            source = by_words[tuple(sorted(row["text"].split()))]  # the same words as a corpus paragraph
            assert (row["text"] == source) == (row["label"] == "original")
            assert held[source] == (name == "dev")  # dev: held out of pretraining; train: not
    # Fewer held-out paragraphs than asked: all of them, if there are enough to measure.
    assert demo.build_word_order_task(corpus, tmp_path / "t2", train=10, dev=200)["dev"] == sum(held.values())
    with pytest.raises(demo.UserError, match="raise --corpus-mb"):
        demo.build_word_order_task(corpus, tmp_path / "t3", train=10, dev=10_000)
    with pytest.raises(demo.UserError, match="--tasks 'wordorder,nope'"):
        demo._downstream_tasks("wordorder,nope")


@pytest.mark.slow
@pytest.mark.distributed
def test_the_miniature_demo_runs_end_to_end_and_is_shown_again(tmp_path):
    work = tmp_path / "demo"
    args = [sys.executable, "-m", "ds_distil", "demo", "--workdir", str(work), "--corpus-mb", "0.6",
            "--vocab-size", "512", "--hidden", "32", "--teacher-steps", "20", "--student-steps", "10",
            "--batch", "16", "--tasks", "wordorder,docsource", "--task-classes", "3", "--task-train", "120",
            "--task-dev", "45",
            "--finetune-seeds", "1,2", "--finetune-epochs", "1"]
    env = child_env()
    env.pop("OMP_NUM_THREADS")
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((work / "summary.json").read_text())
    for name in ("teacher", "student", "baseline"):
        model = summary["models"][name]
        for key in ("parameters", "mlm_accuracy", "perplexity", "mlm_accuracy_smoothed", "downstream_accuracy",
                    "latency_ms"):
            assert model[key] > 0 or key == "mlm_accuracy", (name, key, model)
        # Two tasks in one finetune run, each fine-tuned for every model; the macro score is their mean.
        assert set(model["downstream"]) == {"wordorder", "docsource"}
        assert all(len(t["seed_scores"]) == 2 for t in model["downstream"].values())
        assert model["downstream_accuracy"] == pytest.approx(
            sum(t["accuracy"] for t in model["downstream"].values()) / 2)
        assert Path(summary["exported_models"][name], "config.json").is_file()
        for task in ("wordorder", "docsource"):
            assert Path(summary["finetuned_models"][name][task], "config.json").is_file()
    assert summary["downstream_tasks"]["docsource"]["train"] == 120 and \
        summary["downstream_tasks"]["wordorder"]["dev"] <= 45
    assert summary["models"]["student"]["parameters"] == summary["models"]["baseline"]["parameters"]
    assert summary["models"]["student"]["parameters"] < summary["models"]["teacher"]["parameters"]
    assert Path(summary["tensorboard_dir"], "student", "tensorboard").is_dir()
    assert demo.format_table(summary) in proc.stdout
    # A second run shows the finished demo instead of redoing it.
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "holds a finished demo" in again.stdout
    assert demo.format_table(summary) in again.stdout


@pytest.mark.slow
@pytest.mark.distributed
def test_the_decoder_miniature_distils_a_gpt2_and_reports_perplexity(tmp_path):
    """``demo --family gpt2``: DistilGPT2 in miniature (byte-level BPE, blocks, causal-LM
    distillation), perplexity, size and speed of all three models."""
    work = tmp_path / "gpt2"
    args = [sys.executable, "-m", "ds_distil", "demo", "--family", "gpt2", "--workdir", str(work), "--corpus-mb", "0.3",
            "--vocab-size", "400", "--hidden", "32", "--teacher-steps", "12", "--student-steps", "6", "--batch", "16",
            "--ranks", "1"]  # the launcher path is the BERT miniature's
    env = child_env()
    env.pop("OMP_NUM_THREADS")
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((work / "summary.json").read_text())
    assert summary["family"] == "gpt2"
    meta = json.loads((work / "data" / "meta.json").read_text())
    assert meta["unit"] == "block" and meta["tokenizer"]["objective"] == "causal"
    for name in ("teacher", "student", "baseline"):
        model = summary["models"][name]
        assert model["perplexity"] > 1 and model["latency_ms"] > 0 and 0 <= model["next_token_accuracy"] <= 1
        config = json.loads(Path(summary["exported_models"][name], "config.json").read_text())
        assert config["architectures"] == ["GPT2LMHeadModel"]
    assert summary["models"]["student"]["parameters"] == summary["models"]["baseline"]["parameters"]
    assert summary["models"]["student"]["parameters"] < summary["models"]["teacher"]["parameters"]
    assert "downstream_tasks" not in summary  # finetune takes encoders; a decoder's claim is perplexity
    assert Path(summary["tensorboard_dir"], "student", "tensorboard").is_dir()
    assert demo.format_table(summary) in proc.stdout
    # Its workdir is not taken for the BERT demo's.
    clash = subprocess.run([sys.executable, "-m", "ds_distil", "demo", "--workdir", str(work)], env=env,
                           capture_output=True, text=True, timeout=120)
    assert clash.returncode == 2 and "holds a finished gpt2 demo" in clash.stderr


def test_the_wordpiece_vocabulary_is_numbered_by_the_tokens_not_by_hash_order(tmp_path):
    """The tokenizers trainer hands its alphabet over in hash-set order, different on every
    run; the demo's seeded runs reproduce only if the same tokens get the same ids. (On a
    small corpus the trainer may also break ties in its merges differently: that changes the
    token set itself, which numbering cannot mend. On the demo's 16 MB two runs learnt the
    same 2,048 tokens.)"""
    from conftest import make_corpus_lines
    from ds_distil.scratch import BERT_SPECIALS, train_wordpiece_tokenizer

    lines = make_corpus_lines(400, seed=3) + ["Zebra quixotic jukebox wavers, vexing fjords."]
    vocab = train_wordpiece_tokenizer(lines, 300, tmp_path / "tok").get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    assert tokens[:5] == BERT_SPECIALS and tokens[5:] == sorted(tokens[5:])
    assert sorted(vocab.values()) == list(range(len(vocab)))
