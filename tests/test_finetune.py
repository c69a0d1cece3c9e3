"""``ds-distil finetune``: task readers in every layout, metrics, fine-tuning, task-specific
distillation, the seed/learning-rate protocol, the launcher path and bad inputs.

Everything is real: tiny models built locally, real files, a real DeepSpeed engine (CPU,
bf16), real ranks under the ``deepspeed`` launcher.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT, child_env, make_corpus_lines
from ds_distil import tasks
from ds_distil.cli import main as cli_main
from ds_distil.errors import UserError

CPU_DS = REPO_ROOT / "ds_configs" / "cpu_bf16.json"


# ============================================================================ data

def _keyword_rows(n: int, seed: int) -> list[tuple[str, int]]:
    """A separable task: label 1 iff the sentence holds "teacher" (else "student")."""
    rng = random.Random(seed)
    rows = []
    for line in make_corpus_lines(n, seed=seed, min_words=4, max_words=12):
        label = rng.randint(0, 1)
        words = [w for w in line.rstrip(".").split() if w not in ("teacher", "student")]
        words.insert(rng.randint(0, len(words)), "teacher" if label else "student")
        rows.append((" ".join(words), label))
    return rows


def _write_tsv(path: Path, header: list[str] | None, rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (["\t".join(header)] if header else []) + ["\t".join(map(str, r)) for r in rows]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def keyword_task(tmp_path_factory) -> Path:
    """The separable task in the GLUE benchmark's SST-2 layout."""
    root = tmp_path_factory.mktemp("glue")
    for split, n, seed in (("train", 480, 1), ("dev", 160, 2)):
        _write_tsv(root / "SST-2" / f"{split}.tsv", ["sentence", "label"], [list(r) for r in _keyword_rows(n, seed)])
    return root


def test_glue_tsv_layouts_sst2_cola_headerless_mnli_two_dev_sets(tmp_path):
    # SST-2: header; a quote mark inside a sentence must not start a quoted field.
    _write_tsv(tmp_path / "SST-2" / "train.tsv", ["sentence", "label"], [['it \'s "great', 1], ["bad", 0]])
    _write_tsv(tmp_path / "SST-2" / "dev.tsv", ["sentence", "label"], [["fine", 1]])
    data, labels = tasks.load_task(tasks.GLUE_TASKS["sst2"], tmp_path)
    assert data["train"]["text_a"] == ['it \'s "great', "bad"] and data["train"]["label"] == [1, 0]
    assert labels == ("0", "1")
    # CoLA: no header; source, label, original label, sentence.
    _write_tsv(tmp_path / "CoLA" / "train.tsv", None, [["gj04", 1, "", "The boy ran."], ["gj04", 0, "*", "Ran boy the."]])
    _write_tsv(tmp_path / "CoLA" / "dev.tsv", None, [["cj99", 1, "", "She left."]])
    data, _ = tasks.load_task(tasks.GLUE_TASKS["cola"], tmp_path)
    assert data["train"]["text_a"] == ["The boy ran.", "Ran boy the."] and data["train"]["label"] == [1, 0]
    assert data["validation"]["text_a"] == ["She left."]
    # MNLI: string labels, two dev sets.
    header = ["index", "promptID", "pairID", "genre", "sentence1", "sentence2", "gold_label"]
    _write_tsv(tmp_path / "MNLI" / "train.tsv", header, [[0, 1, 1, "fic", "A man.", "A person.", "entailment"],
                                                         [1, 2, 2, "fic", "A dog.", "A cat.", "contradiction"]])
    _write_tsv(tmp_path / "MNLI" / "dev_matched.tsv", header, [[0, 3, 3, "fic", "Rain.", "Wet.", "neutral"]])
    _write_tsv(tmp_path / "MNLI" / "dev_mismatched.tsv", header, [[0, 4, 4, "gov", "Law.", "Rule.", "entailment"]])
    data, _ = tasks.load_task(tasks.GLUE_TASKS["mnli"], tmp_path)
    assert set(data) == {"train", "validation_matched", "validation_mismatched"}
    assert data["train"]["label"] == [0, 2] and data["validation_matched"]["label"] == [1]
    assert data["train"]["text_b"] == ["A person.", "A cat."]
    # STS-B: a float score; MRPC: its own column names.
    _write_tsv(tmp_path / "STS-B" / "train.tsv", ["index", "genre", "sentence1", "sentence2", "score"],
               [[0, "news", "a", "b", 3.8], [1, "news", "c", "d", 0.0]])
    _write_tsv(tmp_path / "STS-B" / "dev.tsv", ["index", "genre", "sentence1", "sentence2", "score"],
               [[0, "news", "e", "f", 5.0]])
    data, labels = tasks.load_task(tasks.GLUE_TASKS["stsb"], tmp_path)
    assert labels is None and data["train"]["label"] == pytest.approx([3.8, 0.0])
    _write_tsv(tmp_path / "MRPC" / "train.tsv", ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
               [[1, 7, 8, "He said.", "He stated."]])
    _write_tsv(tmp_path / "MRPC" / "dev.tsv", ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
               [[0, 9, 10, "Yes.", "No."]])
    data, _ = tasks.load_task(tasks.GLUE_TASKS["mrpc"], tmp_path / "MRPC")  # the task folder itself works too
    assert data["train"]["text_a"] == ["He said."] and data["train"]["text_b"] == ["He stated."]


def test_hub_parquet_layout_and_save_to_disk(tmp_path):
    import datasets

    root = tmp_path / "glue"
    (root / "mnli").mkdir(parents=True)
    rows = {"premise": ["A man.", "A dog."], "hypothesis": ["A person.", "A cat."], "label": [0, 2], "idx": [0, 1]}
    datasets.Dataset.from_dict(rows).to_parquet(str(root / "mnli" / "train-00000-of-00001.parquet"))
    for split in ("validation_matched", "validation_mismatched"):
        datasets.Dataset.from_dict({k: v[:1] for k, v in rows.items()}).to_parquet(
            str(root / "mnli" / f"{split}-00000-of-00001.parquet"))
    data, _ = tasks.load_task(tasks.GLUE_TASKS["mnli"], root)
    assert data["train"]["text_a"] == ["A man.", "A dog."] and data["train"]["label"] == [0, 2]
    assert len(data["validation_mismatched"]) == 1

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"sentence": ["x", "y"], "label": [0, 1]}),
                          "validation": datasets.Dataset.from_dict({"sentence": ["z"], "label": [1]})}
                         ).save_to_disk(str(saved))
    data, _ = tasks.load_task(tasks.GLUE_TASKS["sst2"], saved)
    assert data["validation"]["text_a"] == ["z"]


@pytest.mark.parametrize("suffix", ["csv", "tsv", "jsonl"])
def test_custom_task_files_learn_their_label_set(tmp_path, suffix):
    rows = [("good film", "pos"), ("bad film", "neg"), ("great", "pos")]
    for split, part in (("train", rows), ("dev", rows[:2])):
        path = tmp_path / f"{split}.{suffix}"
        if suffix == "jsonl":
            path.write_text("".join(json.dumps({"review": t, "y": y}) + "\n" for t, y in part))
        else:
            sep = "," if suffix == "csv" else "\t"
            path.write_text(f"review{sep}y\n" + "".join(f"{t}{sep}{y}\n" for t, y in part))
    spec = tasks.custom_task("imdb", ("review",), "y", "classification")
    data, labels = tasks.load_task(spec, tmp_path)
    assert labels == ("neg", "pos")
    assert data["train"]["label"] == [1, 0, 1] and data["validation"]["text_a"] == ["good film", "bad film"]


# ============================================================================ metrics

def test_each_metric_against_a_hand_computed_value():
    labels = [1, 1, 0, 0, 1, 0]
    preds = [1, 0, 0, 1, 1, 0]
    # tp=2, fp=1, fn=1, tn=2
    acc = 4 / 6
    f1 = 2 * 2 / (2 * 2 + 1 + 1)
    mcc = (2 * 2 - 1 * 1) / math.sqrt((2 + 1) * (2 + 1) * (2 + 1) * (2 + 1))
    spec = tasks.TaskSpec("t", ("a",), tasks.BINARY, ("accuracy", "f1", "matthews"))
    got = tasks.compute_metrics(spec, preds, labels)
    assert got == pytest.approx({"accuracy": 100 * acc, "f1": 100 * f1, "matthews": 100 * mcc})
    # Pearson of (1,2,3,4) with (1,3,2,4): cov / (sd sd); Spearman of ranks (same data here).
    x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 2.0, 4.0])
    pearson = ((x - x.mean()) * (y - y.mean())).sum() / math.sqrt(((x - x.mean()) ** 2).sum() * ((y - y.mean()) ** 2).sum())
    got = tasks.compute_metrics(tasks.GLUE_TASKS["stsb"], x, y)
    assert got["pearson"] == pytest.approx(100 * pearson) and got["spearman"] == pytest.approx(100 * 0.8)
    assert tasks.task_score({"m": {"accuracy": 80.0}, "mm": {"accuracy": 70.0}}) == 75.0


def test_median_of_seeds_at_the_best_learning_rate_and_retention(tmp_path):
    from ds_distil.finetune import FinetuneConfig, summarise

    spec = tasks.GLUE_TASKS["rte"]
    cfg = FinetuneConfig(models={"teacher": "t", "student": "s"}, tasks=[spec], data="d", output_dir=str(tmp_path),
                         deepspeed_config="x", learning_rates=(1e-5, 2e-5), seeds=(1, 2, 3))
    scores = {("teacher", 1e-5): [60, 70, 90], ("teacher", 2e-5): [65, 66, 67],
              ("student", 1e-5): [50, 55, 60], ("student", 2e-5): [59, 10, 58]}
    runs = [{"model": m, "task": "rte", "lr": lr, "seed": i + 1, "score": float(v),
             "metrics": {"validation": {"accuracy": float(v)}}}
            for (m, lr), values in scores.items() for i, v in enumerate(values)]
    out = summarise(cfg, runs)
    teacher, student = out["models"]["teacher"]["tasks"]["rte"], out["models"]["student"]["tasks"]["rte"]
    assert teacher["score"] == 70 and teacher["best_lr"] == 1e-5 and teacher["median_seed"] == 2
    assert student["score"] == 58 and student["best_lr"] == 2e-5  # medians 55 vs 58
    assert out["models"]["student"]["retention"]["macro"] == pytest.approx(58 / 70)


# ============================================================================ runs

def _finetune(*args) -> int:
    """A real ``ds-distil finetune`` process (it starts a process group: not in pytest's)."""
    proc = subprocess.run([sys.executable, "-m", "ds_distil", "finetune", *map(str, args)], env=child_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.returncode


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _fine_tuning_args(bert_teacher_dir, student_dir, keyword_task, out) -> list:
    return ["--models", f"teacher={bert_teacher_dir}", f"student={student_dir}", "--task", "sst2", "--data",
            keyword_task, "--output", out, "--lr", "3e-3", "--seeds", "1,2", "--epochs", 6, "--batch-size", 32,
            "--deepspeed-config", CPU_DS]


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory, bert_teacher_dir, student_dir, keyword_task) -> Path:
    """Teacher and student fine-tuned on the separable task (true labels), two seeds each:
    the fine-tuning test's run, and the plain (label-trained) student of the distillation test."""
    out = tmp_path_factory.mktemp("fine_tuned") / "ft"
    assert _finetune(*_fine_tuning_args(bert_teacher_dir, student_dir, keyword_task, out)) == 0
    return out


@pytest.mark.slow
def test_fine_tuning_a_tiny_model_on_a_separable_task_reaches_high_accuracy(fine_tuned, bert_teacher_dir,
                                                                            student_dir, keyword_task):
    out = fine_tuned
    results = _results(out)
    for name in ("teacher", "student"):
        task = results["models"][name]["tasks"]["sst2"]
        assert task["score"] >= 90, (name, task)
        assert len(task["seed_scores"]) == 2
        model_dir = Path(task["model"])  # the median run's model, loadable with transformers alone
        from transformers import AutoModelForSequenceClassification

        assert AutoModelForSequenceClassification.from_pretrained(model_dir).config.num_labels == 2
    assert len(results["runs"]) == 4
    assert not any(Path(r["saved_model"]).exists() for r in results["runs"])  # "best" keeps only the median's
    # Finished runs are not redone: a second call reads them back.
    stamps = {r["seed"]: (out / "runs" / "teacher" / "sst2" / f"lr0.003-seed{r['seed']}" / "result.json").stat().st_mtime
              for r in results["runs"] if r["model"] == "teacher"}
    assert _finetune(*_fine_tuning_args(bert_teacher_dir, student_dir, keyword_task, out)) == 0
    assert stamps == {s: (out / "runs" / "teacher" / "sst2" / f"lr0.003-seed{s}" / "result.json").stat().st_mtime
                      for s in stamps}


def test_dropout_is_on_from_the_first_step(tmp_path, bert_teacher_dir, keyword_task):
    """transformers hands models over in eval mode; the loop must switch dropout on before
    its first step, not only after the first evaluation. Two copies of one model that differ
    only in their dropout rate must therefore log different first-step losses."""
    import shutil

    models = []
    for name, rate in (("still", 0.0), ("dropped", 0.5)):
        model_dir = tmp_path / name
        shutil.copytree(bert_teacher_dir, model_dir)
        config = json.loads((model_dir / "config.json").read_text())
        config.update(hidden_dropout_prob=rate, attention_probs_dropout_prob=rate)
        (model_dir / "config.json").write_text(json.dumps(config))
        models.append(f"{name}={model_dir}")
    out = tmp_path / "ft"
    _finetune("--models", *models, "--task", "sst2", "--data", keyword_task, "--output", out, "--lr", "1e-3",
              "--seeds", "1", "--epochs", 0.1, "--batch-size", 32, "--log-interval", 1, "--deepspeed-config", CPU_DS)
    first_loss = {}
    for name in ("still", "dropped"):
        lines = (out / "runs" / name / "sst2" / "lr0.001-seed1" / "metrics.jsonl").read_text().splitlines()
        first_loss[name] = next(r["loss"] for r in map(json.loads, lines) if r["group"] == "Train" and r["step"] == 1)
    assert first_loss["still"] != first_loss["dropped"], first_loss


def _class_distributions(model_dir, rows, tokenizer_dir):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    enc = tok([t for t, _ in rows], padding=True, return_tensors="pt")
    kwargs = {k: v for k, v in enc.items() if k != "token_type_ids" or model.config.model_type == "bert"}
    with torch.no_grad():
        return torch.softmax(model(**kwargs).logits.float(), -1)


@pytest.fixture(scope="module")
def flipped_task(tmp_path_factory, keyword_task) -> Path:
    """The separable task with every label flipped (as separable: "teacher" -> 0)."""
    flipped = tmp_path_factory.mktemp("flipped")
    for split in ("train", "dev"):
        rows = (keyword_task / "SST-2" / f"{split}.tsv").read_text().splitlines()
        body = [f"{t}\t{1 - int(y)}" for t, y in (r.split("\t") for r in rows[1:])]
        (flipped / "SST-2").mkdir(parents=True, exist_ok=True)
        (flipped / "SST-2" / f"{split}.tsv").write_text("\n".join([rows[0], *body]) + "\n")
    return flipped


@pytest.fixture(scope="module")
def flipped_teacher_on_two_ranks(tmp_path_factory, bert_teacher_dir, flipped_task):
    """The teacher fine-tuned on the flipped labels by 2 ranks under the deepspeed launcher:
    the launcher test's run, and the distillation test's teacher."""
    from ds_distil.distributed import free_port

    out = tmp_path_factory.mktemp("flipped_teacher") / "ft2"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "--module", "ds_distil", "finetune", "--models",
           f"teacher={bert_teacher_dir}", "--task", "sst2", "--data", str(flipped_task), "--output", str(out),
           "--lr", "3e-3", "--seeds", "1", "--epochs", "6", "--batch-size", "32", "--deepspeed-config", str(CPU_DS)]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, out


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_under_the_deepspeed_launcher(flipped_teacher_on_two_ranks):
    proc, out = flipped_teacher_on_two_ranks
    assert "16/micro-batch x 1 x 2 ranks" in proc.stdout
    results = _results(out)
    assert results["models"]["teacher"]["tasks"]["sst2"]["score"] >= 90
    # The dev set was split over the ranks and gathered: every example scored once.
    assert proc.stdout.count("task (metric)") == 1  # only rank 0 prints the table


@pytest.mark.slow
def test_task_specific_distillation_moves_the_student_toward_the_teachers_classes(tmp_path, student_dir, keyword_task,
                                                                                  flipped_teacher_on_two_ranks,
                                                                                  fine_tuned):
    """A teacher fine-tuned on the *flipped* labels; a student given only its soft targets
    (alpha_task=0) on the true-label data follows the teacher, not the labels. The plain
    student (fine-tuned on the true labels, no teacher) is the fine-tuning test's."""
    teacher_dir = flipped_teacher_on_two_ranks[1] / "models" / "teacher" / "sst2"
    dev = _keyword_rows(160, 2)
    p_teacher = _class_distributions(teacher_dir, dev, teacher_dir)
    labels = np.array([y for _, y in dev])
    assert (p_teacher.argmax(-1).numpy() != labels).mean() > 0.9  # the teacher learned the flipped task

    def judge(model_dir):
        p = _class_distributions(model_dir, dev, teacher_dir)
        kl = float((p_teacher * (p_teacher.log() - p.log())).sum(-1).mean())
        return kl, float((p.argmax(-1).numpy() == labels).mean())

    _finetune("--models", f"student={student_dir}", "--data", keyword_task, "--output", tmp_path / "distil",
              "--task", "sst2", "--lr", "3e-3", "--seeds", "1", "--epochs", 6, "--batch-size", 32,
              "--deepspeed-config", CPU_DS, "--teacher", teacher_dir, "--alpha-task", 0, "--alpha-ce", 1)
    kl_distilled, acc_distilled = judge(_results(tmp_path / "distil")["models"]["student"]["tasks"]["sst2"]["model"])
    kl_plain, acc_plain = judge(fine_tuned / "models" / "student" / "sst2")
    print(f"KL(teacher || student) on dev: distilled {kl_distilled:.3f}, fine-tuned on labels {kl_plain:.3f}; "
          f"accuracy on the true labels: distilled {acc_distilled:.2f}, plain {acc_plain:.2f}")
    assert acc_plain > 0.9 and acc_distilled < 0.1
    assert kl_distilled < 0.2 * kl_plain


# ============================================================================ bad input

def _error_of(capsys, *args) -> str:
    """Bad input is refused before any process group starts, so this runs in-process."""
    assert cli_main(["finetune", *map(str, args)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_bad_inputs_get_one_clear_line(tmp_path, capsys, bert_teacher_dir, keyword_task):
    base = ["--models", f"t={bert_teacher_dir}", "--output", tmp_path / "o", "--deepspeed-config", CPU_DS]
    assert "unknown task nope" in _error_of(capsys, *base, "--task", "nope", "--data", keyword_task)
    # Missing dev split.
    (tmp_path / "nodev").mkdir()
    (tmp_path / "nodev" / "train.csv").write_text("text,label\na,0\nb,1\n")
    err = _error_of(capsys, *base, "--task", "mine", "--text-columns", "text", "--data", tmp_path / "nodev")
    assert "no validation split" in err and "nodev" in err
    # Wrong column.
    (tmp_path / "nodev" / "dev.csv").write_text("text,label\na,0\n")
    err = _error_of(capsys, *base, "--task", "mine", "--text-columns", "review", "--data", tmp_path / "nodev")
    assert "no column 'review'" in err and "text, label" in err
    # A dev label outside the training split's label set.
    (tmp_path / "nodev" / "dev.csv").write_text("text,label\na,7\n")
    err = _error_of(capsys, *base, "--task", "mine", "--text-columns", "text", "--data", tmp_path / "nodev")
    assert "label '7'" in err or "label 7" in err
    assert "outside the label set" in err
    # A GLUE label outside the task's label set.
    _write_tsv(tmp_path / "bad" / "SST-2" / "train.tsv", ["sentence", "label"], [["a", 0], ["b", 2]])
    _write_tsv(tmp_path / "bad" / "SST-2" / "dev.tsv", ["sentence", "label"], [["a", 0]])
    err = _error_of(capsys, *base, "--task", "sst2", "--data", tmp_path / "bad")
    assert "train row 2" in err and "outside the label set {0, 1}" in err
    # Regression with text labels.
    (tmp_path / "reg").mkdir()
    for split in ("train", "dev"):
        (tmp_path / "reg" / f"{split}.csv").write_text("text,label\na,high\nb,low\n")
    err = _error_of(capsys, *base, "--task", "mine", "--text-columns", "text", "--task-type", "regression",
                    "--data", tmp_path / "reg")
    assert "'high'" in err and "not a number" in err
    # Several custom tasks read one folder each, and each is named once.
    err = _error_of(capsys, *base, "--task", "mine,reg", "--text-columns", "text", "--data", tmp_path)
    assert "no folder for mine" in err and "reg" not in err.split("no folder for")[1]
    assert "each custom task once" in _error_of(capsys, *base, "--task", "reg,reg", "--text-columns", "text",
                                                "--data", tmp_path)
    # Not a supported encoder.
    (tmp_path / "gpt").mkdir()
    (tmp_path / "gpt" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    err = _error_of(capsys, "--models", f"g={tmp_path / 'gpt'}", "--output", tmp_path / "o", "--task", "sst2",
                    "--data", keyword_task)
    assert "model_type 'gpt2' is not a supported encoder" in err
    # Not a model directory; an output under a file; a bad grid.
    err = _error_of(capsys, "--models", f"x={tmp_path}", "--output", tmp_path / "o", "--task", "sst2",
                    "--data", keyword_task)
    assert "no config.json" in err
    (tmp_path / "file").write_text("")
    assert "lies under a file" in _error_of(capsys, *base[:2], "--output", tmp_path / "file" / "o", "--task", "sst2",
                                             "--data", keyword_task)
    assert "--lr 'fast'" in _error_of(capsys, *base, "--task", "sst2", "--data", keyword_task, "--lr", "fast")
    assert "no such file or directory" in _error_of(capsys, *base, "--task", "sst2", "--data", tmp_path / "none")


def test_unknown_task_names_are_refused_before_anything_loads():
    with pytest.raises(UserError, match="unknown task foo"):
        tasks.resolve_tasks("sst2,foo")
    assert [s.name for s in tasks.resolve_tasks("glue")] == list(tasks.GLUE_TASKS)
