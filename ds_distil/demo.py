"""``ds-distil demo`` (= ``make demo``): the DistilBERT story in miniature, end to end.

Nothing is downloaded and no corpus ships with the repository:

1. harvest English text from docstrings already on the machine (the Python standard
   library and installed packages), deduplicated paragraphs of 8+ words, each labelled
   with the package it comes from;
2. train a WordPiece tokenizer on it and ``ds-distil prepare`` the data (held-out split);
3. pretrain a small BERT teacher with the trainer (MLM only);
4. ``ds-distil init-student`` a half-depth student and distil it with the ``deepspeed``
   launcher on 2 ranks (ZeRO-1, bf16 on CPU), TensorBoard logs included;
5. train the same student architecture from random init, MLM only, for as many steps
   (the ablation baseline);
6. export both students and evaluate all three on the held-out split: MLM accuracy and
   perplexity with the standard uniform 15% masks (80/10/10), the same masks for every
   model; batch-1 CPU latency, models interleaved, median of repeats;
7. downstream, as the paper measures "97%": ``ds-distil finetune`` fine-tunes each model
   on two tasks built from the same text, with the same budget and seeds; held-out
   accuracy, median of seeds, and their mean (the macro score). ``wordorder`` (is a
   paragraph in its own word order or are its words shuffled? evaluated on paragraphs no
   model saw in pretraining) needs syntax, as GLUE's CoLA; ``docsource`` (which package a
   paragraph comes from) is answered largely from vocabulary, as SST-2;
8. write ``summary.json`` and the table.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from ds_distil.errors import UserError

# Packages whose docstrings are mostly English prose; the standard library alone is ~1.5 MB.
DOC_PACKAGES = ("torch", "transformers", "deepspeed", "datasets", "numpy", "pandas", "pyarrow",
                "tokenizers", "setuptools", "pip", "tensorboard", "huggingface_hub", "pydantic")
STDLIB = "python"  # the label of the standard library's paragraphs
_WORD = re.compile(r"[A-Za-z][a-z]+")
MODELS = ("teacher", "student", "baseline")
DOWNSTREAM_TASKS = ("wordorder", "docsource")
# The held-out split of ``prepare``: the MLM evaluation's text, and the word-order task's dev set.
VALIDATION_FRACTION = 0.02
SPLIT_SEED = 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", choices=("bert", "gpt2"), default="bert",
                        help="bert: DistilBERT in miniature (MLM, downstream task); gpt2: DistilGPT2 in miniature "
                             "(causal LM: perplexity, size and speed)")
    parser.add_argument("--workdir", default=None,
                        help="where everything is written (default: demo_run, or demo_run_gpt2 for --family gpt2)")
    parser.add_argument("--corpus-mb", type=float, default=None,
                        help="size of the harvested corpus in MB (default: 16 for bert, 8 for gpt2)")
    parser.add_argument("--vocab-size", type=int, default=2048,
                        help="WordPiece vocabulary (small, so that the embedding does not dominate a small model)")
    parser.add_argument("--seq-len", type=int, default=64, help="maximum sequence length in tokens")
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--teacher-steps", type=int, default=None,
                        help="pretraining steps of the teacher (default: 2,400 for bert, 2,500 for gpt2)")
    parser.add_argument("--teacher-lr", type=float, default=None,
                        help="peak learning rate of the teacher (default: 2e-3 for bert, 1e-3 for gpt2)")
    parser.add_argument("--student-steps", type=int, default=None,
                        help="steps of distillation and of the baseline (default: 350 for bert, 400 for gpt2)")
    parser.add_argument("--student-lr", type=float, default=None,
                        help="peak learning rate of the distilled student (default: 3e-3 for bert, 1e-3 for gpt2)")
    parser.add_argument("--baseline-lr", type=float, default=1e-3,
                        help="peak learning rate of the baseline (each model trains at the best rate measured for it)")
    parser.add_argument("--batch", type=int, default=64, help="global batch in sequences")
    parser.add_argument("--ranks", type=int, default=2, help="ranks of the deepspeed launcher (one thread each)")
    parser.add_argument("--tasks", default="wordorder,docsource",
                        help="downstream tasks, comma-separated: wordorder (is the word order the paragraph's own?), "
                             "docsource (which package does it come from?); the macro score is their mean")
    parser.add_argument("--task-classes", type=int, default=6, help="packages (classes) of the docsource task")
    parser.add_argument("--task-train", type=int, default=1000, help="training paragraphs per downstream task")
    parser.add_argument("--task-dev", type=int, default=1000, help="held-out paragraphs per downstream task")
    parser.add_argument("--finetune-seeds", default="1,2,3", help="seeds of the downstream runs (median reported)")
    parser.add_argument("--finetune-lr", default="1e-3", help="learning rate(s) of the downstream runs")
    parser.add_argument("--finetune-epochs", type=float, default=3.0,
                        help="epochs of each downstream run (3, as the fine-tuning scripts of BERT and DistilBERT)")
    parser.add_argument("--force", action="store_true", help="start over in a workdir that holds a finished demo")


# Defaults that differ by family, each measured with the demo's other defaults.
# bert: the masked-LM teacher sits on a plateau (loss ~5.1) until its attention learns to use
# the context; at 1e-3 it leaves it after ~1,200 of its 2,500 steps and ends at 28%
# validation MLM accuracy, at 2e-3 sooner and ends at 34% (5e-4: 21%). On 8 MB it then saw
# every paragraph ~2.6 times and overfitted (training loss 0.19 nats under validation, the
# distilled student's 0.05), and the 2-layer student matched it on held-out text: 16 MB,
# about all the docstrings a machine with the dependencies holds, halves the repetition.
# The distilled student learns faster at a higher rate (the trainer's held-out MLM accuracy
# after 400 steps: 1e-3 29.4%, 2e-3 31.4%, 3e-3 31.8%), where the baseline, from random
# init, breaks down (11.8%, 5.1%, 4.7%): each trains at the best rate measured for it.
# Steps: what fits the 15 minutes with two downstream tasks.
# gpt2: calibrated at 1e-3 on 8 MB.
_FAMILY_DEFAULTS = {"bert": {"corpus_mb": 16.0, "teacher_lr": 2e-3, "student_lr": 3e-3, "teacher_steps": 2400,
                             "student_steps": 350},
                    "gpt2": {"corpus_mb": 8.0, "teacher_lr": 1e-3, "student_lr": 1e-3, "teacher_steps": 2500,
                             "student_steps": 400}}


def run(args) -> int:
    started = time.time()
    for key, value in _FAMILY_DEFAULTS[args.family].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    downstream_tasks = _downstream_tasks(args.tasks)
    work = Path(args.workdir or ("demo_run" if args.family == "bert" else f"demo_run_{args.family}")).resolve()
    _check_workdir(work)
    summary_path = work / "summary.json"
    if summary_path.exists() and not args.force:
        summary = _read_summary(summary_path)
        if summary is not None and summary.get("family", "bert") != args.family:
            raise UserError(f"--workdir {work}: holds a finished {summary.get('family', 'bert')} demo; choose another "
                            f"--workdir for --family {args.family}, or add --force to replace it")
        if summary is not None:  # idempotent: a finished demo is shown again, not redone
            print(format_table(summary))
            print(f"\n{work} holds a finished demo; run it again with --force (make demo DEMO_ARGS=--force)")
            return 0
    if args.force and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    env = _child_env()

    corpus, sources = work / "corpus.txt", work / "corpus_sources.txt"
    if not sources.exists():
        _stage("1/8 harvesting docstrings")
        stats = harvest_docstrings(corpus, sources, int(args.corpus_mb * 1e6))
        print(f"    {stats['paragraphs']:,} paragraphs, {stats['bytes'] / 1e6:.1f} MB from {stats['files']:,} files")

    causal = args.family == "gpt2"
    tok_dir = work / "tokenizer"
    data_dir = work / "data"
    if not (data_dir / "meta.json").exists():
        _stage("2/8 tokenizer and data")
        from ds_distil import scratch

        train_tokenizer = scratch.train_gpt2_tokenizer if causal else scratch.train_wordpiece_tokenizer
        with open(corpus) as f:
            train_tokenizer((line for line in f if line.strip()), args.vocab_size, tok_dir,
                            model_max_length=args.seq_len)
        _cli(env, "prepare", "--tokenizer", tok_dir, "--input", corpus, "--output", data_dir,
             "--max-seq-len", args.seq_len, "--validation-fraction", VALIDATION_FRACTION, "--seed", SPLIT_SEED,
             "--num-proc", 2,
             # One paragraph per sequence, as the reference's data (packing a file's paragraphs,
             # --unit document, raised the fill from 63% to 89% but not the teacher's MLM loss
             # at 2,500 steps: it sees the 2.5 M-token corpus ~3 times either way). A decoder's
             # data is GPT-2's: the files joined by end-of-text and cut into full blocks.
             "--unit", "block" if causal else "line")

    ds_json = work / "ds_cpu.json"
    _write_ds_config(ds_json, args.batch, args.ranks)
    teacher_init = work / "teacher_init"
    if not (teacher_init / "config.json").exists():
        from transformers import AutoTokenizer

        from ds_distil import scratch

        new_teacher = scratch.new_gpt2_teacher if causal else scratch.new_bert_teacher
        shape = {} if causal else {"intermediate_size": 4 * args.hidden}  # GPT-2: 4 x n_embd by definition
        new_teacher(AutoTokenizer.from_pretrained(tok_dir), num_layers=args.teacher_layers,
                    hidden_size=args.hidden, num_heads=max(1, args.hidden // 64), max_position=args.seq_len,
                    output_dir=teacher_init,
                    # Minutes of training see each token about once: the models underfit,
                    # and dropout would only slow them (the student and the downstream
                    # runs inherit this through the teacher's config).
                    dropout=0.0, **shape)

    lm = "causal LM" if causal else "MLM"
    _stage(f"3/8 pretraining the teacher ({lm} only, deepspeed, {args.ranks} ranks)")
    _train(env, args.ranks, _run_config(work, "teacher", student=teacher_init, teacher=None, data=data_dir, ds=ds_json,
                                        steps=args.teacher_steps, lr=args.teacher_lr, causal=causal))
    teacher_dir = work / "teacher"
    _cli(env, "export", "--checkpoint", work / "runs" / "teacher", "--output", teacher_dir, "--force")

    _stage(f"4/8 distilling a {args.teacher_layers // 2}-layer student (deepspeed, {args.ranks} ranks)")
    student_init = work / "student_init"
    _cli(env, "init-student", "--teacher", teacher_dir, "--output", student_init, "--force")
    _train(env, args.ranks, _run_config(work, "student", student=student_init, teacher=teacher_dir, data=data_dir,
                                        ds=ds_json, steps=args.student_steps, lr=args.student_lr, causal=causal))
    _cli(env, "export", "--checkpoint", work / "runs" / "student", "--output", work / "student", "--force")

    _stage(f"5/8 baseline: the same student from random init, {lm} only")
    baseline_init = work / "baseline_init"
    _random_like(student_init, baseline_init)
    _train(env, args.ranks, _run_config(work, "baseline", student=baseline_init, teacher=None, data=data_dir,
                                        ds=ds_json, steps=args.student_steps, lr=args.baseline_lr, causal=causal))
    _cli(env, "export", "--checkpoint", work / "runs" / "baseline", "--output", work / "baseline", "--force")
    exported = {"teacher": teacher_dir, "student": work / "student", "baseline": work / "baseline"}

    masks = "next-token targets" if causal else "uniform masks"
    _stage(f"6/8 {lm} evaluation on the held-out split ({masks}) and batch-1 latency")
    summary = evaluate_models(data_dir, exported)
    summary.update(family=args.family, exported_models={n: str(p) for n, p in exported.items()},
                   tensorboard_dir=str(work / "runs"), teacher_steps=args.teacher_steps,
                   student_steps=args.student_steps,
                   learning_rates={"teacher": args.teacher_lr, "student": args.student_lr, "baseline": args.baseline_lr})

    if causal:
        # DistilGPT2's claims are perplexity, size and speed; finetune takes encoders.
        _stage("7/8 downstream: none for a decoder (its claims are perplexity, size and speed)")
    else:
        _stage(f"7/8 downstream: fine-tuning each model on {', '.join(downstream_tasks)}")
        task_root = work / "tasks"
        built = {}
        for name in downstream_tasks:
            if name == "wordorder":
                built[name] = build_word_order_task(corpus, task_root / name, args.task_train, args.task_dev)
            else:
                built[name] = build_source_task(corpus, sources, task_root / name, args.task_classes,
                                                args.task_train // args.task_classes,
                                                args.task_dev // args.task_classes)
            print(f"    {name}: {built[name]['description']}; {built[name]['train']:,} training and "
                  f"{built[name]['dev']:,} held-out paragraphs")
        finetune_out = work / "finetune"
        _launch(env, args.ranks, "finetune", "--models", *(f"{n}={p}" for n, p in exported.items()),
                "--task", ",".join(downstream_tasks), "--data", task_root, "--text-columns", "text",
                "--output", finetune_out,
                "--lr", args.finetune_lr, "--seeds", args.finetune_seeds, "--epochs", args.finetune_epochs,
                "--batch-size", 32, "--max-seq-len", args.seq_len, "--log-interval", 1000,
                "--deepspeed-config", ds_json)
        downstream = json.loads((finetune_out / "results.json").read_text())
        summary = add_downstream(summary, downstream, built)
        summary.update(finetuned_models={n: {t: r.get("model") for t, r in m["tasks"].items()}
                                         for n, m in downstream["models"].items()},
                       finetune_results=str(finetune_out / "results.json"))
    summary.update(wall_minutes=round((time.time() - started) / 60, 1), load_average=os.getloadavg())

    _stage("8/8 summary")
    tmp = summary_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, summary_path)
    print(format_table(summary))
    print(f"\nsummary: {summary_path}\nTensorBoard: tensorboard --logdir {work / 'runs'}")
    return 0


def _downstream_tasks(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in DOWNSTREAM_TASKS]
    if unknown or not names or len(set(names)) != len(names):
        raise UserError(f"--tasks {text!r}: give one or more of {', '.join(DOWNSTREAM_TASKS)}, each once, "
                        "comma-separated")
    return names


def _check_workdir(work: Path) -> None:
    if work.exists() and not work.is_dir():
        raise UserError(f"--workdir {work}: exists and is not a directory; choose a directory path")
    for parent in work.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"--workdir {work}: lies under {parent}, which is a file; choose a directory path")


def _read_summary(path: Path) -> dict | None:
    """A finished demo's summary, or None (with a note) if it is damaged: the demo is then redone."""
    try:
        summary = json.loads(path.read_text())
        format_table(summary)
        return summary
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        print(f"{path}: damaged or from an older demo ({type(err).__name__}); running the demo again, reusing "
              "the finished stages", file=sys.stderr)
        return None


# ---------------------------------------------------------------------- corpus

def harvest_docstrings(output: Path, sources: Path, target_bytes: int) -> dict:
    """Deduplicated English docstring paragraphs (8+ words), one per line in ``output``, a blank
    line after each file's paragraphs (one document per file); the package each comes from on
    the same line of ``sources`` (``python`` for the standard library)."""
    seen: set[bytes] = set()
    written = n_files = 0
    with open(output, "w") as out, open(sources, "w") as src:
        for package, path in _python_files():
            n_files += 1
            kept = 0
            for paragraph in _docstring_paragraphs(path):
                key = hashlib.blake2b(paragraph.lower().encode(), digest_size=12).digest()
                if key in seen:
                    continue
                seen.add(key)
                out.write(paragraph + "\n")
                src.write(package + "\n")
                written += len(paragraph) + 1
                kept += 1
            if kept:  # a blank line ends the file's document: `prepare --unit document` packs within it
                out.write("\n")
                src.write("\n")
            if written >= target_bytes:
                break
    if written == 0:
        raise UserError("found no docstrings to build the demo corpus from; is the Python standard library installed?")
    return {"paragraphs": len(seen), "bytes": written, "files": n_files}


def _python_files() -> list[tuple[str, Path]]:
    """``(package, file)`` pairs; the packages interleaved so that a small corpus still has them all."""
    roots = [(STDLIB, Path(sysconfig.get_paths()["stdlib"]))]
    site = Path(sysconfig.get_paths()["purelib"])
    roots += [(name, site / name) for name in DOC_PACKAGES if (site / name).is_dir()]
    per_root = []
    for name, root in roots:
        files = sorted(p for p in root.rglob("*.py") if "test" not in p.parts and "tests" not in p.parts
                       and "site-packages" not in p.relative_to(root).parts)
        per_root.append([(name, f) for f in files])
    # Round-robin over the packages: every package contributes from the start.
    out = []
    for i in range(max(len(files) for files in per_root)):
        out += [files[i] for files in per_root if i < len(files)]
    return out


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


def build_source_task(corpus: Path, sources: Path, out: Path, classes: int, train_per_class: int,
                      dev_per_class: int, seed: int = 0) -> dict:
    """A downstream task from the harvested text: which package does a paragraph come from?

    The ``classes`` packages with the most paragraphs, the same number of paragraphs from
    each (so chance is 1/classes), split into train and dev JSON Lines files. Answering
    needs the paragraph's meaning (its vocabulary and topic), not its format: every
    paragraph went through the same prose filter.
    """
    texts = corpus.read_text().splitlines()
    labels = sources.read_text().splitlines()
    by_source: dict[str, list[str]] = {}
    for text, label in zip(texts, labels):
        if text:  # blank lines separate the documents (files)
            by_source.setdefault(label, []).append(text)
    need = train_per_class + dev_per_class
    ranked = sorted((s for s in by_source if len(by_source[s]) >= need), key=lambda s: -len(by_source[s]))
    if len(ranked) < 2:
        raise UserError(f"{corpus}: fewer than two packages have {need} paragraphs for the downstream task; "
                        "raise --corpus-mb or lower --task-train/--task-dev")
    chosen = sorted(ranked[:classes])
    rng = random.Random(seed)
    train, dev = [], []
    for label in chosen:
        picked = rng.sample(by_source[label], need)
        train += [{"text": t, "label": label} for t in picked[:train_per_class]]
        dev += [{"text": t, "label": label} for t in picked[train_per_class:]]
    rng.shuffle(train)
    _write_task(out, train, dev)
    return {"classes": chosen, "train": len(train), "dev": len(dev), "chance": 1 / len(chosen),
            "description": f"which of {len(chosen)} packages a paragraph comes from ({', '.join(chosen)})"}


def build_word_order_task(corpus: Path, out: Path, train: int, dev: int, seed: int = 0) -> dict:
    """A downstream task that needs syntax, not vocabulary: is a paragraph in its own word
    order, or are its words shuffled? Half of each split is shuffled (chance is 50%).

    Both classes hold the same words, so a bag of words cannot tell them apart: a model has
    to know how English (and docstring) text is put together, as for GLUE's CoLA, where the
    paper's student loses the most (51.3 vs 56.3). The dev paragraphs are ones ``prepare``
    held out (same fraction and seed as the demo's data), so no model saw them in pretraining
    and none can answer from memory; the training paragraphs come from the training split.
    If the corpus holds fewer held-out paragraphs than ``dev``, all of them are used.
    """
    from ds_distil.data import held_out_lines

    # Four distinct words at least: a shuffle then differs from the original.
    paragraphs = [p for p in corpus.read_text().splitlines() if len(set(p.split())) >= 4]
    held_out = held_out_lines(paragraphs, VALIDATION_FRACTION, SPLIT_SEED)
    pools = {"train": [p for p, h in zip(paragraphs, held_out) if not h],
             "dev": [p for p, h in zip(paragraphs, held_out) if h]}
    if len(pools["train"]) < train or len(pools["dev"]) < max(2, dev // 4):
        raise UserError(f"{corpus}: {len(pools['train']):,} training and {len(pools['dev']):,} held-out paragraphs "
                        f"for the word-order task (wanted {train:,} and {dev:,}); raise --corpus-mb or lower "
                        "--task-train/--task-dev")
    rng = random.Random(seed)
    splits = {}
    for name, wanted in (("train", train), ("dev", min(dev, len(pools["dev"])))):
        rows = []
        for i, paragraph in enumerate(rng.sample(pools[name], wanted)):
            words = paragraph.split()
            if i % 2:
                shuffled = list(words)
                while shuffled == words:
                    rng.shuffle(shuffled)
                rows.append({"text": " ".join(shuffled), "label": "shuffled"})
            else:
                rows.append({"text": " ".join(words), "label": "original"})
        rng.shuffle(rows)
        splits[name] = rows
    _write_task(out, splits["train"], splits["dev"])
    return {"classes": ["original", "shuffled"], "train": train, "dev": len(splits["dev"]), "chance": 0.5,
            "description": "is a paragraph in its own word order or are its words shuffled (held-out paragraphs)"}


def _write_task(out: Path, train: list[dict], dev: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("dev", dev)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


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
    _run_stage(cmd, env)


def _run_stage(cmd: list[str], env: dict) -> None:
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        raise UserError(f"demo stage failed (exit {result.returncode}): {' '.join(cmd)}; its messages are above. "
                        "Rerun `make demo` to resume: finished stages are kept")


def _train(env: dict, ranks: int, config_path: Path) -> None:
    _launch(env, ranks, "train", "--config", config_path)


def _launch(env: dict, ranks: int, *args) -> None:
    """A ds-distil command on ``ranks`` processes of the ``deepspeed`` launcher (one: directly)."""
    from ds_distil.distributed import free_port

    if ranks == 1:
        return _cli(env, *args)
    # The cores shared out: oversubscribed OpenMP threads spin against each other, and a
    # small model's step then runs several times slower.
    env = dict(env, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // ranks)))
    _run_stage([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
                "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                "--module", "ds_distil", *map(str, args)], env)


def _write_ds_config(path: Path, global_batch: int, ranks: int) -> None:
    from ds_distil.ds_config import load_ds_config, with_batch_and_lr

    shipped = Path(__file__).resolve().parent.parent / "ds_configs" / "cpu_bf16.json"
    micro = global_batch // ranks if global_batch % ranks == 0 else global_batch
    path.write_text(json.dumps(with_batch_and_lr(load_ds_config(shipped), global_batch=global_batch,
                                                 micro_batch=micro), indent=2))


def _run_config(work: Path, name: str, student, teacher, data, ds, steps: int, lr: float,
                causal: bool = False) -> Path:
    from ds_distil.ds_config import with_batch_and_lr

    # The reference's weights: 5 L_ce + 2 L_mlm (L_clm for a decoder) + 1 L_cos.
    lm_term = {"alpha_clm": 2.0} if causal else {"alpha_mlm": 2.0}
    cfg = {"student": str(student), "teacher": str(teacher) if teacher else None, "data": str(data),
           "deepspeed_config": str(ds), "output_dir": str(work / "runs" / name),
           "loss": {"alpha_ce": 5.0 if teacher else 0.0, **lm_term, "alpha_cos": 1.0 if teacher else 0.0},
           # Uniform masks for every model: the metric of step 6 is the standard one.
           "masking": {"smoothing": None},
           "train": {"max_steps": steps, "log_interval": max(1, steps // 10), "checkpoint_interval": 0,
                     "warmup_fraction": 0.05, "eval_max_batches": 20, "num_workers": 1}}
    # The learning rate lives in the DeepSpeed JSON: give each run its own copy.
    run_ds = work / f"ds_{name}.json"
    run_ds.write_text(json.dumps(with_batch_and_lr(json.loads(Path(ds).read_text()), lr=lr), indent=2))
    cfg["deepspeed_config"] = str(run_ds)
    path = work / f"run_{name}.json"
    path.write_text(json.dumps(cfg, indent=2))
    return path


def _random_like(student_dir: Path, output: Path) -> None:
    """The student's architecture and tokenizer with fresh random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    from ds_distil.modeling import model_objective

    torch.manual_seed(1234)
    auto = AutoModelForCausalLM if model_objective(student_dir) == "causal" else AutoModelForMaskedLM
    model = auto.from_config(AutoConfig.from_pretrained(student_dir))
    model.save_pretrained(output)
    AutoTokenizer.from_pretrained(student_dir).save_pretrained(output)


# ---------------------------------------------------------------------- evaluation

def evaluate_models(data_dir: Path, models: dict) -> dict:
    """Held-out LM accuracy / perplexity, parameters and batch-1 CPU latency of each model.

    Masked LMs: two sets of fixed masks, the same for every model: uniform 15% (80/10/10),
    the standard metric, and the training recipe's smoothed masks (count^-0.7, rare tokens
    favoured). Causal LMs: every next-token target of the held-out blocks, each block its
    own window (per-token perplexity, as DistilGPT2 is reported).
    """
    from transformers import AutoTokenizer

    from ds_distil.config import MaskingConfig
    from ds_distil.data import load_prepared, make_eval_loader
    from ds_distil.masking import MaskingCollator, make_collator, objective_of
    from ds_distil.modeling import count_parameters, load_model

    prepared = load_prepared(data_dir)
    causal = objective_of(prepared.meta) == "causal"
    tokenizer = AutoTokenizer.from_pretrained(models["teacher"])
    targets = {}
    if causal:
        collator = make_collator(prepared, tokenizer)
        targets["next"] = list(make_eval_loader(prepared.validation, collator, 64, num_workers=0))
    else:
        for kind, smoothing in (("uniform", None), ("smoothed", MaskingConfig().smoothing)):
            options = dict(dataclasses.asdict(MaskingConfig()), smoothing=smoothing)
            collator = MaskingCollator.from_prepared(prepared, tokenizer, seed=0, **options)
            targets[kind] = list(make_eval_loader(prepared.validation, collator, 64, num_workers=0))
    standard = targets["next" if causal else "uniform"]
    results = {}
    for name, path in models.items():
        model = load_model(str(path)).eval()
        scores = _lm_scores(model, standard)
        results[name] = {"parameters": count_parameters(model), "perplexity": scores["perplexity"],
                         ("next_token_accuracy" if causal else "mlm_accuracy"): scores["accuracy"]}
        if not causal:
            smoothed = _lm_scores(model, targets["smoothed"])
            results[name].update(mlm_accuracy_smoothed=smoothed["accuracy"], perplexity_smoothed=smoothed["perplexity"])
    latency = batch1_latency_ms(models, prepared.validation, causal=causal)
    for name in results:
        results[name]["latency_ms"] = latency[name]
    accuracy = "next_token_accuracy" if causal else "mlm_accuracy"
    return {
        "models": results,
        "validation_targets": sum(int((b["labels"] != -100).sum()) for b in standard),
        "unigram_baseline_accuracy": _unigram_accuracy(prepared, standard),
        f"student_{'lm' if causal else 'mlm'}_retention":
            results["student"][accuracy] / max(results["teacher"][accuracy], 1e-9),
        "student_speedup": results["teacher"]["latency_ms"] / results["student"]["latency_ms"],
        "parameter_reduction": 1 - results["student"]["parameters"] / results["teacher"]["parameters"],
    }


def _lm_scores(model, batches) -> dict:
    """Accuracy and perplexity over every target of ``batches`` (``labels`` != -100): masked
    tokens of an MLM, next tokens of a causal LM (its collator puts them at the predicting
    position, so no shift here)."""
    import math

    import torch

    from ds_distil.modeling import encode, project

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
    return {"accuracy": hits / max(n, 1), "perplexity": math.exp(nll / max(n, 1))}


def batch1_latency_ms(models: dict, validation, sequences: int = 50, repeats: int = 7, causal: bool = False) -> dict:
    """Median batch-1 forward time per sequence of each model, on one CPU thread.

    The paper times inference at batch 1 on a CPU; a downstream model runs the encoder and
    a small head, so an encoder is timed as a sequence classifier, a decoder as the causal
    LM it is (one forward over the sequence). The models take turns in every repeat
    (interleaved), so a burst of load from another process slows them alike, and the
    median of the repeats discards the outliers; one thread keeps the timing away from
    thread scheduling on a shared machine.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier": expected, it is not trained here
    try:
        if causal:
            loaded = {n: AutoModelForCausalLM.from_pretrained(p).eval() for n, p in models.items()}
        else:
            loaded = {n: AutoModelForSequenceClassification.from_pretrained(p, num_labels=2).eval()
                      for n, p in models.items()}
    finally:
        hf_logging.set_verbosity(level)
    rows = validation.select(range(min(sequences, len(validation))))["input_ids"]
    inputs = [torch.tensor([list(r)], dtype=torch.long) for r in rows]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {n: [] for n in loaded}
    try:
        with torch.inference_mode():
            for model in loaded.values():  # warm-up
                for x in inputs[:5]:
                    model(input_ids=x)
            for _ in range(repeats):
                for name, model in loaded.items():
                    start = time.perf_counter()
                    for x in inputs:
                        model(input_ids=x)
                    times[name].append((time.perf_counter() - start) / len(inputs) * 1000)
    finally:
        torch.set_num_threads(threads)
    return {n: statistics.median(t) for n, t in times.items()}


def _unigram_accuracy(prepared, batches) -> float:
    """Accuracy of always predicting the most frequent training token."""
    top = int(prepared.token_counts.argmax())
    hits = sum(int((b["labels"] == top).sum()) for b in batches)
    total = sum(int((b["labels"] != -100).sum()) for b in batches)
    return hits / max(total, 1)


def add_downstream(summary: dict, finetune: dict, tasks: dict) -> dict:
    """Each model's held-out accuracy per task (median of seeds), their mean (the macro score,
    as the paper's), and the student's retention of the teacher's macro score."""
    for name, result in finetune["models"].items():
        per_task = {t: {"accuracy": r["metrics"]["validation"]["accuracy"] / 100, "seed_scores": r["seed_scores"]}
                    for t, r in result["tasks"].items()}
        summary["models"][name]["downstream"] = per_task
        summary["models"][name]["downstream_accuracy"] = statistics.fmean(t["accuracy"] for t in per_task.values())
    teacher = summary["models"]["teacher"]["downstream_accuracy"]
    summary["student_downstream_retention"] = summary["models"]["student"]["downstream_accuracy"] / max(teacher, 1e-9)
    summary["downstream_tasks"] = tasks
    summary["downstream_protocol"] = finetune["protocol"]
    return summary


def format_table(summary: dict) -> str:
    if summary.get("family") == "gpt2":
        return _format_causal(summary)
    tasks = summary["downstream_tasks"]
    columns = list(tasks) + (["macro"] if len(tasks) > 1 else [])
    rows = [f"{'model':<10} {'params':>10} {'MLM acc':>8} {'ppl':>8} " + " ".join(f"{c:>9}" for c in columns)
            + f" {'ms/seq':>7}"]
    for name, r in summary["models"].items():
        scores = [r["downstream"][t]["accuracy"] for t in tasks] + ([r["downstream_accuracy"]] if len(tasks) > 1 else [])
        rows.append(f"{name:<10} {r['parameters']:>10,} {r['mlm_accuracy']:>8.1%} {r['perplexity']:>8.1f} "
                    + " ".join(f"{s:>9.1%}" for s in scores) + f" {r['latency_ms']:>7.2f}")
    rows.append(f"student: {summary['parameter_reduction']:.0%} fewer parameters, "
                f"{summary['student_speedup']:.2f}x faster (batch 1, 1 CPU thread), "
                f"{summary['student_downstream_retention']:.0%} of the teacher's downstream "
                f"{'macro score' if len(tasks) > 1 else 'accuracy'}, "
                f"{summary['student_mlm_retention']:.0%} of its MLM accuracy")
    rows.append(f"MLM: uniform 15% masks (80/10/10), {summary['validation_targets']:,} held-out targets, "
                f"unigram baseline {summary['unigram_baseline_accuracy']:.1%}")
    for name, task in tasks.items():
        rows.append(f"{name}: {task['description']}, chance {task['chance']:.0%}")
    rows.append(f"downstream: held-out accuracy, median of {len(summary['downstream_protocol']['seeds'])} "
                "fine-tuning seeds")
    return "\n".join(rows)


def _format_causal(summary: dict) -> str:
    rows = [f"{'model':<10} {'params':>10} {'ppl':>8} {'next-token acc':>15} {'ms/seq':>7}"]
    for name, r in summary["models"].items():
        rows.append(f"{name:<10} {r['parameters']:>10,} {r['perplexity']:>8.1f} {r['next_token_accuracy']:>15.1%} "
                    f"{r['latency_ms']:>7.2f}")
    teacher, student = summary["models"]["teacher"], summary["models"]["student"]
    rows.append(f"student: {summary['parameter_reduction']:.0%} fewer parameters, "
                f"{summary['student_speedup']:.2f}x faster (batch 1, 1 CPU thread), perplexity "
                f"{student['perplexity']:.1f} vs the teacher's {teacher['perplexity']:.1f} "
                f"({summary['student_lm_retention']:.0%} of its next-token accuracy)")
    rows.append(f"held-out: {summary['validation_targets']:,} next-token targets, each block its own window; "
                f"unigram baseline {summary['unigram_baseline_accuracy']:.1%}")
    return "\n".join(rows)
