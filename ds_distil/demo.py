"""``ds-distil demo`` (= ``make demo``): the DistilBERT story in miniature, end to end.

Nothing is downloaded and no corpus ships with the repository:

1. harvest English text from docstrings already on the machine (the Python standard
   library and installed packages), deduplicated paragraphs of 8+ words;
2. train a WordPiece tokenizer on it and ``ds-distil prepare`` the data (held-out split);
3. pretrain a small BERT teacher with the trainer (MLM only, one process);
4. ``ds-distil init-student`` a half-depth student and distil it with the ``deepspeed``
   launcher on 2 ranks (ZeRO-1, bf16 on CPU), TensorBoard logs included;
5. train the same student architecture from random init, MLM only, for as many steps
   (the ablation baseline);
6. export both students, evaluate teacher / student / baseline on the held-out split,
   time batch-1 CPU inference, and write ``summary.json`` and a table.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from ds_distil.errors import UserError

# Packages whose docstrings are mostly English prose; the standard library alone is ~1.5 MB.
DOC_PACKAGES = ("torch", "transformers", "deepspeed", "datasets", "numpy", "pandas", "pyarrow",
                "tokenizers", "setuptools", "pip", "tensorboard", "huggingface_hub", "pydantic")
_WORD = re.compile(r"[A-Za-z][a-z]+")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="demo_run", help="where everything is written (default: demo_run)")
    parser.add_argument("--corpus-mb", type=float, default=8.0, help="size of the harvested corpus in MB")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=64, help="maximum sequence length in tokens")
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--teacher-steps", type=int, default=1200, help="MLM pretraining steps of the teacher")
    parser.add_argument("--student-steps", type=int, default=600, help="steps of distillation and of the baseline")
    parser.add_argument("--batch", type=int, default=64, help="global batch in sequences")
    parser.add_argument("--ranks", type=int, default=2, help="ranks of the deepspeed launcher for the students")
    parser.add_argument("--force", action="store_true", help="start over in a workdir that holds a finished demo")


def run(args) -> int:
    started = time.time()
    work = Path(args.workdir).resolve()
    if (work / "summary.json").exists() and not args.force:
        # Idempotent: a finished demo is shown again, not redone.
        print(format_table(json.loads((work / "summary.json").read_text())))
        print(f"\n{work} holds a finished demo; run it again with --force (make demo DEMO_ARGS=--force)")
        return 0
    if args.force and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    env = _child_env()

    corpus = work / "corpus.txt"
    if not corpus.exists():
        _stage("1/6 harvesting docstrings")
        stats = harvest_docstrings(corpus, int(args.corpus_mb * 1e6))
        print(f"    {stats['paragraphs']:,} paragraphs, {stats['bytes'] / 1e6:.1f} MB from {stats['files']:,} files")

    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        _stage("2/6 tokenizer and data")
        from ds_distil.scratch import train_wordpiece_tokenizer

        with open(corpus) as f:
            train_wordpiece_tokenizer(f, args.vocab_size, tok_dir, model_max_length=args.seq_len)
    data_dir = work / "data"
    if not (data_dir / "meta.json").exists():
        _cli(env, "prepare", "--tokenizer", tok_dir, "--input", corpus, "--output", data_dir,
             "--max-seq-len", args.seq_len, "--validation-fraction", 0.02, "--num-proc", 2)

    ds_json = work / "ds_cpu.json"
    _write_ds_config(ds_json, args.batch)
    teacher_init = work / "teacher_init"
    if not (teacher_init / "config.json").exists():
        from transformers import AutoTokenizer

        from ds_distil.scratch import new_bert_teacher

        new_bert_teacher(AutoTokenizer.from_pretrained(tok_dir), num_layers=args.teacher_layers,
                         hidden_size=args.hidden, num_heads=max(1, args.hidden // 64),
                         intermediate_size=4 * args.hidden, max_position=args.seq_len, output_dir=teacher_init)

    _stage("3/6 pretraining the teacher (MLM only, 1 process)")
    teacher_run = work / "runs" / "teacher"
    _train(env, 1, _run_config(work, "teacher", student=teacher_init, teacher=None, data=data_dir, ds=ds_json,
                               steps=args.teacher_steps, lr=2e-3))
    teacher_dir = work / "teacher"
    _cli(env, "export", "--checkpoint", teacher_run, "--output", teacher_dir, "--force")

    _stage(f"4/6 distilling a {args.teacher_layers // 2}-layer student (deepspeed, {args.ranks} ranks)")
    student_init = work / "student_init"
    _cli(env, "init-student", "--teacher", teacher_dir, "--output", student_init, "--force")
    _train(env, args.ranks, _run_config(work, "student", student=student_init, teacher=teacher_dir, data=data_dir,
                                        ds=ds_json, steps=args.student_steps, lr=1e-3))
    _cli(env, "export", "--checkpoint", work / "runs" / "student", "--output", work / "student", "--force")

    _stage("5/6 baseline: the same student from random init, MLM only")
    baseline_init = work / "baseline_init"
    _random_like(student_init, baseline_init)
    _train(env, args.ranks, _run_config(work, "baseline", student=baseline_init, teacher=None, data=data_dir,
                                        ds=ds_json, steps=args.student_steps, lr=1e-3))
    _cli(env, "export", "--checkpoint", work / "runs" / "baseline", "--output", work / "baseline", "--force")

    _stage("6/6 evaluation on the held-out split")
    summary = evaluate_models(work, data_dir, {"teacher": teacher_dir, "student": work / "student",
                                               "baseline": work / "baseline"})
    summary.update(student_dir=str(work / "student"), tensorboard_dir=str(work / "runs"),
                   teacher_steps=args.teacher_steps, student_steps=args.student_steps,
                   wall_minutes=round((time.time() - started) / 60, 1))
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_table(summary))
    print(f"\nsummary: {work / 'summary.json'}\nTensorBoard: tensorboard --logdir {work / 'runs'}")
    return 0


# ---------------------------------------------------------------------- corpus

def harvest_docstrings(output: Path, target_bytes: int) -> dict:
    """Write deduplicated English docstring paragraphs (8+ words) to ``output``, one per line."""
    files = _python_files()
    seen: set[bytes] = set()
    written = n_files = 0
    with open(output, "w") as out:
        for path in files:
            n_files += 1
            for paragraph in _docstring_paragraphs(path):
                key = hashlib.blake2b(paragraph.lower().encode(), digest_size=12).digest()
                if key in seen:
                    continue
                seen.add(key)
                out.write(paragraph + "\n")
                written += len(paragraph) + 1
            if written >= target_bytes:
                break
    if written == 0:
        raise UserError("found no docstrings to build the demo corpus from; is the Python standard library installed?")
    return {"paragraphs": len(seen), "bytes": written, "files": n_files}


def _python_files() -> list[Path]:
    roots = [Path(sysconfig.get_paths()["stdlib"])]
    site = Path(sysconfig.get_paths()["purelib"])
    roots += [site / name for name in DOC_PACKAGES if (site / name).is_dir()]
    files = []
    for root in roots:
        files += sorted(p for p in root.rglob("*.py") if "test" not in p.parts and "tests" not in p.parts)
    return files


def _docstring_paragraphs(path: Path):
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError, OSError, RecursionError):
        return
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node, clean=True)
        if not doc:
            continue
        for block in re.split(r"\n\s*\n", doc):
            text = " ".join(block.split())
            words = text.split()
            # Prose, not code, tables or parameter lists: enough words, mostly real words.
            if len(words) >= 8 and len(_WORD.findall(text)) >= 0.6 * len(words) and not text.startswith((">>>", "..", "--", "==")):
                yield text


# ---------------------------------------------------------------------- stages

def _stage(title: str) -> None:
    print(f"\n== {title}", flush=True)


def _child_env() -> dict:
    import torch

    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def _cli(env: dict, *args) -> None:
    cmd = [sys.executable, "-m", "ds_distil", *map(str, args)]
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"demo stage failed (exit {result.returncode}): {' '.join(cmd)}")


def _train(env: dict, ranks: int, config_path: Path) -> None:
    from ds_distil.distributed import free_port

    if ranks == 1:
        return _cli(env, "train", "--config", config_path)
    env = dict(env, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // ranks)))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "--module", "ds_distil", "train", "--config", str(config_path)]
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"demo stage failed (exit {result.returncode}): {' '.join(cmd)}")


def _write_ds_config(path: Path, global_batch: int) -> None:
    from ds_distil.ds_config import load_ds_config

    shipped = Path(__file__).resolve().parent.parent / "ds_configs" / "cpu_bf16.json"
    cfg = load_ds_config(shipped)
    cfg["train_batch_size"] = global_batch
    cfg["train_micro_batch_size_per_gpu"] = global_batch // 2 if global_batch % 2 == 0 else global_batch
    cfg.pop("gradient_accumulation_steps", None)
    path.write_text(json.dumps(cfg, indent=2))


def _run_config(work: Path, name: str, student, teacher, data, ds, steps: int, lr: float) -> Path:
    cfg = {"student": str(student), "teacher": str(teacher) if teacher else None, "data": str(data),
           "deepspeed_config": str(ds), "output_dir": str(work / "runs" / name),
           "loss": {"alpha_ce": 5.0 if teacher else 0.0, "alpha_mlm": 2.0, "alpha_cos": 1.0 if teacher else 0.0},
           "train": {"max_steps": steps, "log_interval": max(1, steps // 20), "checkpoint_interval": 0,
                     "warmup_fraction": 0.1, "eval_max_batches": 20, "num_workers": 1}}
    # The learning rate lives in the DeepSpeed JSON: give each run its own copy.
    ds_cfg = json.loads(Path(ds).read_text())
    ds_cfg["optimizer"]["params"]["lr"] = lr
    sched = ds_cfg.get("scheduler", {}).get("params", {})
    if "warmup_max_lr" in sched:
        sched["warmup_max_lr"] = lr
    run_ds = work / f"ds_{name}.json"
    run_ds.write_text(json.dumps(ds_cfg, indent=2))
    cfg["deepspeed_config"] = str(run_ds)
    path = work / f"run_{name}.json"
    path.write_text(json.dumps(cfg, indent=2))
    return path


def _random_like(student_dir: Path, output: Path) -> None:
    """The student's architecture and tokenizer with fresh random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

    torch.manual_seed(1234)
    model = AutoModelForMaskedLM.from_config(AutoConfig.from_pretrained(student_dir))
    model.save_pretrained(output)
    AutoTokenizer.from_pretrained(student_dir).save_pretrained(output)


# ---------------------------------------------------------------------- evaluation

def evaluate_models(work: Path, data_dir: Path, models: dict) -> dict:
    """Held-out MLM accuracy / perplexity (fixed masks), parameters and batch-1 CPU latency."""
    import math

    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from ds_distil.config import MaskingConfig
    from ds_distil.data import load_prepared, make_eval_loader
    from ds_distil.masking import MaskingCollator
    from ds_distil.modeling import count_parameters, encode, project

    prepared = load_prepared(data_dir)
    tokenizer = AutoTokenizer.from_pretrained(models["teacher"])
    collator = MaskingCollator.from_prepared(prepared, tokenizer, seed=0, **dataclasses.asdict(MaskingConfig()))
    batches = list(make_eval_loader(prepared.validation, collator, 64, num_workers=0))
    results = {}
    for name, path in models.items():
        model = AutoModelForMaskedLM.from_pretrained(path).eval()
        nll = hits = n = 0.0
        with torch.inference_mode():
            for batch in batches:
                labels = batch["labels"]
                rows = (labels != -100).flatten().nonzero().squeeze(1)
                hidden = encode(model, batch["input_ids"], batch["attention_mask"])
                logits = project(model, hidden.reshape(-1, hidden.shape[-1])[rows]).float()
                targets = labels.flatten()[rows]
                nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
                hits += (logits.argmax(-1) == targets).sum().item()
                n += len(rows)
        results[name] = {"parameters": count_parameters(model), "mlm_accuracy": hits / max(n, 1),
                         "perplexity": math.exp(nll / max(n, 1)),
                         "latency_ms": _latency_ms(model, prepared.validation)}
    unigram = _unigram_accuracy(prepared, batches)
    return {
        "models": results,
        "validation_targets": int(n),
        "unigram_baseline_accuracy": unigram,
        "student_retention": results["student"]["mlm_accuracy"] / max(results["teacher"]["mlm_accuracy"], 1e-9),
        "student_speedup": results["teacher"]["latency_ms"] / results["student"]["latency_ms"],
        "parameter_reduction": 1 - results["student"]["parameters"] / results["teacher"]["parameters"],
    }


def _latency_ms(model, validation, n: int = 200) -> float:
    """Mean batch-1 forward time (full MLM logits, as a user would run it) on the CPU."""
    import torch

    rows = validation.select(range(min(n, len(validation))))["input_ids"]
    inputs = [torch.tensor([list(r)], dtype=torch.long) for r in rows]
    with torch.inference_mode():
        for x in inputs[:10]:
            model(input_ids=x)
        start = time.perf_counter()
        for x in inputs:
            model(input_ids=x)
    return (time.perf_counter() - start) / len(inputs) * 1000


def _unigram_accuracy(prepared, batches) -> float:
    """Accuracy of always predicting the most frequent training token."""
    top = int(prepared.token_counts.argmax())
    hits = sum(int((b["labels"] == top).sum()) for b in batches)
    total = sum(int((b["labels"] != -100).sum()) for b in batches)
    return hits / max(total, 1)


def format_table(summary: dict) -> str:
    rows = [f"{'model':<10} {'params':>10} {'MLM acc':>8} {'ppl':>8} {'ms/seq':>8}"]
    for name, r in summary["models"].items():
        rows.append(f"{name:<10} {r['parameters']:>10,} {r['mlm_accuracy']:>8.1%} {r['perplexity']:>8.1f} "
                    f"{r['latency_ms']:>8.2f}")
    rows.append(f"student: {summary['parameter_reduction']:.0%} fewer parameters, "
                f"{summary['student_speedup']:.2f}x faster (batch 1, CPU), "
                f"{summary['student_retention']:.0%} of the teacher's MLM accuracy; "
                f"unigram baseline {summary['unigram_baseline_accuracy']:.1%}")
    return "\n".join(rows)
