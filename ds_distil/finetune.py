"""``ds-distil finetune``: fine-tune models on downstream tasks and compare them, as the paper's Table 1.

For every (task, model, learning rate, seed) one run fine-tunes the model with a
sequence-classification (or regression) head and evaluates it on the task's dev split(s).
The protocol is the paper's: dev sets, several seeds, the median reported; with a grid of
learning rates, the rate whose median is best. Given several models, one table puts them
side by side with each model's retention (its score over the reference model's, per task
and for the macro score).

Each run is a DeepSpeed engine driven by the trainer's own loop (``Trainer.fit``): the
same batching, non-finite-step guards, preemption handling, logging and TensorBoard as
``ds-distil train``; :class:`FinetuneRun` only supplies the model, the data and the step.
``--teacher`` adds task-specific distillation (the paper's DistilBERT (D)): the soft
targets of an already fine-tuned teacher, softened by a temperature, on the class logits.

A finished run leaves ``result.json`` in its folder and is not redone, so an interrupted
comparison picks up where it stopped. Nothing is downloaded: every model is a local
directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ds_distil.errors import UserError
from ds_distil.models import FAMILIES
from ds_distil.trainer import DistillStep, StepTotals, Trainer

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "ds_configs"
# Encoders ds-distil fine-tunes (with transformers' sequence-classification class of each):
# the model types of every masked-LM family (BERT, DistilBERT, RoBERTa, XLM-R, ModernBERT).
SUPPORTED_ENCODERS = tuple(t for f in FAMILIES if f.objective == "masked" for t in f.model_types)


@dataclass
class FinetuneConfig:
    """Everything one ``ds-distil finetune`` invocation does (built from the command line)."""

    models: dict[str, str]
    """Name -> HF directory of each model to fine-tune; the first is the reference of the retention."""
    tasks: list
    """The tasks (:class:`ds_distil.tasks.TaskSpec`)."""
    data: str
    """Directory of the task's data (or the GLUE root holding one folder per task)."""
    output_dir: str
    """Where runs, results.json and the fine-tuned models go."""
    deepspeed_config: str
    """DeepSpeed JSON: precision, ZeRO stage, optimizer and schedule (batch and LR are set here)."""
    learning_rates: tuple[float, ...] = (2e-5, 3e-5, 5e-5)
    """Grid of peak learning rates; each is run with every seed and the best median is reported."""
    seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
    """Seeds of the classifier's initialisation, batch order and dropout (the paper: median of 5)."""
    epochs: float = 3.0
    """Passes over the training split per run."""
    batch_size: int = 32
    """Global batch in examples (split into micro-batches and ranks by DeepSpeed's arithmetic)."""
    micro_batch_size: int | None = None
    """Examples per rank per forward pass (None: the global batch over the ranks)."""
    max_seq_len: int = 128
    """Longer inputs are truncated (pairs: the longer text first)."""
    warmup_fraction: float = 0.1
    """Share of each run's steps over which the learning rate warms up."""
    teacher: str | None = None
    """Fine-tuned teacher for task-specific distillation: a model directory, or a directory
    holding one per task (``TEACHER/sst2``); None = plain fine-tuning."""
    alpha_task: float = 1.0
    """Weight of the task loss (cross-entropy with the labels, or MSE for regression)."""
    alpha_ce: float = 1.0
    """Weight of the soft-target loss with ``teacher`` (KL at temperature T, times T^2; MSE for regression)."""
    temperature: float = 2.0
    """Softmax temperature of the soft-target loss."""
    save_models: str = "best"
    """Fine-tuned weights to keep: "best" (the median run at the best learning rate, under
    ``models/NAME/TASK``), "all" or "none"."""
    log_interval: int = 50
    """Steps between log lines of a run."""


@dataclass
class _RunSettings:
    """What ``Trainer.fit`` reads of a run config: the train section, and nothing to resume."""

    train: object
    output_dir: str

    def to_dict(self) -> dict:
        return {"train": dataclasses.asdict(self.train), "output_dir": self.output_dir}


# ---------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", required=True, metavar="[NAME=]DIR",
                        help="models to fine-tune (HF directories), e.g. teacher=runs/teacher student=runs/distilbert; "
                             "the first is the reference for the retention column")
    parser.add_argument("--task", required=True,
                        help="GLUE task(s): cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli (comma-separated) or "
                             "glue for all nine; any other name is a custom task (give --text-columns); several "
                             "custom tasks, comma-separated, share the columns and read DATA/NAME/ each")
    parser.add_argument("--data", required=True,
                        help="the task's data directory (GLUE TSVs, the hub's parquet files, CSV/TSV/JSONL named by "
                             "split, or a save_to_disk DatasetDict), or the GLUE root holding one folder per task")
    parser.add_argument("--output", required=True, help="output directory (results.json, runs, fine-tuned models)")
    parser.add_argument("--text-columns", default=None,
                        help="custom task: the text column, or two comma-separated for sentence pairs")
    parser.add_argument("--label-column", default="label", help="custom task: the label column (default: label)")
    parser.add_argument("--task-type", choices=("classification", "regression"), default="classification",
                        help="custom task: classification (labels read from the train split) or regression")
    parser.add_argument("--lr", default="2e-5,3e-5,5e-5", help="learning-rate grid, comma-separated")
    parser.add_argument("--seeds", default="1,2,3,4,5", help="seeds, comma-separated; the median run is reported")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--batch-size", type=int, default=32, help="global batch in examples")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="examples per rank per forward pass")
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--warmup-fraction", type=float, default=0.1)
    parser.add_argument("--deepspeed-config", default=None,
                        help="DeepSpeed JSON (default: ds_configs/cpu_bf16.json without a GPU, bf16_zero2.json with)")
    parser.add_argument("--teacher", default=None,
                        help="fine-tuned teacher (or a directory with one per task) for task-specific distillation")
    parser.add_argument("--alpha-task", type=float, default=1.0)
    parser.add_argument("--alpha-ce", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--save-models", choices=("best", "all", "none"), default="best")
    parser.add_argument("--log-interval", type=int, default=50)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)


def run(args) -> int:
    cfg = config_from_args(args)
    from transformers.utils import logging as hf_logging

    from ds_distil.distributed import setup_distributed, teardown_distributed

    hf_logging.disable_progress_bar()  # a bar per model load and save would drown the log lines
    loaded = load_tasks(cfg)  # every data error is reported before any rank starts
    info = setup_distributed()
    try:
        results = run_protocol(cfg, info, loaded)
    except BaseException:
        from ds_distil.trainer import _abandon_process_group

        _abandon_process_group()
        raise
    teardown_distributed()
    if info.is_main:
        print(format_tables(results))
        print(f"\nresults: {Path(cfg.output_dir) / 'results.json'}")
    return 0


def config_from_args(args) -> FinetuneConfig:
    from ds_distil import tasks

    problems = []
    models = _parse_models(args.models)
    for name, path in models.items():
        problems += _encoder_problems(f"--models {name}={path}", Path(path))
    if args.text_columns:
        # Several custom tasks share the columns and read one folder each: DATA/NAME/train.jsonl ...
        names = [n.strip() for n in args.task.split(",") if n.strip()]
        columns = tuple(c.strip() for c in args.text_columns.split(","))
        task_list = [tasks.custom_task(name, columns, args.label_column, args.task_type) for name in names]
        if len(set(names)) != len(names) or not names:
            problems.append(f"--task {args.task!r}: give each custom task once, comma-separated")
        elif len(names) > 1:
            missing = [n for n in names if not (Path(args.data) / n).is_dir()]
            if missing:
                problems.append(f"--data {args.data}: several custom tasks read one folder each "
                                f"({Path(args.data) / names[0]}/train.jsonl, ...); no folder for "
                                f"{', '.join(missing)}")
    else:
        task_list = tasks.resolve_tasks(args.task)
    lrs = _floats(args.lr, "--lr")
    seeds = _ints(args.seeds, "--seeds")
    for flag, value, ok in (("--epochs", args.epochs, args.epochs > 0), ("--batch-size", args.batch_size, args.batch_size >= 1),
                            ("--max-seq-len", args.max_seq_len, args.max_seq_len >= 8),
                            ("--warmup-fraction", args.warmup_fraction, 0 <= args.warmup_fraction < 1),
                            ("--temperature", args.temperature, args.temperature > 0),
                            ("--alpha-task", args.alpha_task, args.alpha_task >= 0),
                            ("--alpha-ce", args.alpha_ce, args.alpha_ce >= 0),
                            ("--log-interval", args.log_interval, args.log_interval >= 1)):
        if not (ok and math.isfinite(value)):
            problems.append(f"{flag} {value}: out of range")
    if args.micro_batch_size is not None and not 1 <= args.micro_batch_size <= args.batch_size:
        problems.append(f"--micro-batch-size {args.micro_batch_size}: give 1 to --batch-size ({args.batch_size})")
    if any(lr <= 0 or lr > 1 for lr in lrs):
        problems.append(f"--lr {args.lr}: learning rates must lie in (0, 1]")
    if any(s < 0 for s in seeds):
        problems.append(f"--seeds {args.seeds}: seeds must be >= 0")
    if args.teacher is not None and not Path(args.teacher).is_dir():
        problems.append(f"--teacher {args.teacher}: no such directory")
    ds_path = args.deepspeed_config or str(REPO_CONFIGS / _default_ds_config())
    if not Path(ds_path).is_file():
        problems.append(f"--deepspeed-config {ds_path}: no such file (the shipped ones are in ds_configs/)")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        problems.append(f"--output {output}: exists and is not a directory; choose a directory path")
    elif any(p.exists() and not p.is_dir() for p in output.parents):
        problems.append(f"--output {output}: lies under a file; choose a directory path")
    if problems:
        raise UserError(*problems)
    return FinetuneConfig(models=models, tasks=task_list, data=args.data, output_dir=str(output),
                          deepspeed_config=ds_path, learning_rates=tuple(lrs), seeds=tuple(seeds), epochs=args.epochs,
                          batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                          max_seq_len=args.max_seq_len, warmup_fraction=args.warmup_fraction, teacher=args.teacher,
                          alpha_task=args.alpha_task, alpha_ce=args.alpha_ce, temperature=args.temperature,
                          save_models=args.save_models, log_interval=args.log_interval)


def _encoder_problems(flag: str, path: Path) -> list[str]:
    """Why ``path`` is not a local model directory of a supported encoder (empty: it is)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        return [f"{flag}: not a model directory (no config.json); give a directory written by "
                "`ds-distil export` or save_pretrained"]
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (ValueError, AttributeError):
        return [f"{config_file}: not valid JSON; re-export the model"]
    if model_type not in SUPPORTED_ENCODERS:
        return [f"{flag}: model_type {model_type!r} is not a supported encoder; finetune takes "
                f"{', '.join(SUPPORTED_ENCODERS)} models"]
    if not any((path / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json",
                                               "pytorch_model.bin")):
        return [f"{flag}: no weights (model.safetensors) in the directory; export the model again"]
    return []


def _default_ds_config() -> str:
    import torch

    return "bf16_zero2.json" if torch.cuda.is_available() else "cpu_bf16.json"


def _parse_models(items: list[str]) -> dict[str, str]:
    models = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).name or item, item
        if not name or not path:
            raise UserError(f"--models {item!r}: give NAME=DIR or DIR")
        if name in models:
            raise UserError(f"--models: the name {name!r} is given twice; name each model (NAME=DIR)")
        models[name] = path
    return models


def _floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: give comma-separated numbers, e.g. {flag} 2e-5,3e-5") from None
    if not values:
        raise UserError(f"{flag} {text!r}: give at least one value")
    return values


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: give comma-separated integers, e.g. {flag} 1,2,3") from None
    if not values or len(set(values)) != len(values):
        raise UserError(f"{flag} {text!r}: give distinct values")
    return values


# ---------------------------------------------------------------------------- the protocol

def load_tasks(cfg: FinetuneConfig) -> list[tuple]:
    """``(spec, data, teacher_dir)`` per task: read and checked, labels encoded."""
    from ds_distil import tasks as tasks_mod

    loaded = []
    for spec in cfg.tasks:
        data, labels = tasks_mod.load_task(spec, cfg.data)
        spec = tasks_mod.with_labels(spec, labels)
        loaded.append((spec, data, _task_teacher(cfg.teacher, spec) if cfg.teacher else None))
    return loaded


def run_protocol(cfg: FinetuneConfig, dist_info, loaded: list[tuple]) -> dict:
    """Every (task, model, lr, seed) run, then the medians, best rates and retentions."""
    out = Path(cfg.output_dir)
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    runs = []
    for spec, data, teacher_dir in loaded:
        for name, model_dir in cfg.models.items():
            encoded = encode_task(data, spec, model_dir, cfg.max_seq_len, teacher_dir)
            for lr in cfg.learning_rates:
                for seed in cfg.seeds:
                    run_dir = out / "runs" / name / spec.name / f"lr{lr:g}-seed{seed}"
                    done = run_dir / "result.json"
                    if done.is_file():
                        runs.append(json.loads(done.read_text()))
                        continue
                    result = FinetuneRun(cfg, spec, encoded, model_dir, teacher_dir, lr, seed, run_dir,
                                         dist_info).run()
                    result.update(model=name, model_dir=str(model_dir))
                    if dist_info.is_main:
                        _write_json(done, result)
                    runs.append(result)
    results = summarise(cfg, runs)
    if dist_info.is_main:
        _keep_models(cfg, results)
        _write_json(out / "results.json", results)
    return results


def _task_teacher(teacher: str, spec) -> str:
    per_task = Path(teacher) / spec.name
    path = per_task if (per_task / "config.json").is_file() else Path(teacher)
    if not (path / "config.json").is_file():
        raise UserError(f"--teacher {teacher}: neither a model directory nor one holding {spec.name}/config.json; "
                        "give the teacher fine-tuned on this task (ds-distil finetune writes it to OUTPUT/models/NAME/TASK)")
    problems = _encoder_problems(f"--teacher {path}", path)
    if problems:
        raise UserError(*problems)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if getattr(config, "num_labels", None) != spec.num_labels:
        raise UserError(f"--teacher {path}: it has {config.num_labels} output(s), the task {spec.name} needs "
                        f"{spec.num_labels}; give the teacher fine-tuned on {spec.name}")
    return str(path)


@dataclass
class EncodedTask:
    """A task tokenised for one model: ``input_ids`` per example, labels, first-segment lengths."""

    spec: object
    train: object  # datasets.Dataset with input_ids
    dev: dict  # split name -> datasets.Dataset
    labels: dict = field(default_factory=dict)  # split -> np.ndarray
    segments: dict = field(default_factory=dict)  # split -> np.ndarray: tokens of the first segment
    pad_id: int = 0
    tokenizer_dir: str = ""


def encode_task(data, spec, model_dir: str, max_seq_len: int, teacher_dir: str | None) -> EncodedTask:
    """Tokenise every split with the model's tokenizer (pairs truncated longest-first)."""
    import numpy as np

    from ds_distil.data import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    limit = min(max_seq_len, _position_limit(model_dir))
    if teacher_dir:
        _check_same_vocabulary(tokenizer, load_tokenizer(teacher_dir), model_dir, teacher_dir)

    def tokenise(batch):
        pair = batch["text_b"] if "text_b" in batch else None
        enc = tokenizer(batch["text_a"], pair, truncation="longest_first" if pair else True, max_length=limit,
                        return_token_type_ids=True)
        # Tokens of "[CLS] a [SEP]": token type 0; the rest is the second segment.
        segments = [len(t) - sum(t) for t in enc["token_type_ids"]]
        return {"input_ids": enc["input_ids"], "segment_a": segments}

    encoded = {}
    for split, dataset in data.items():
        encoded[split] = dataset.map(tokenise, batched=True, remove_columns=[c for c in dataset.column_names
                                                                           if c != "label"])
    result = EncodedTask(spec=spec, train=encoded["train"], dev={s: encoded[s] for s in spec.dev_splits},
                         pad_id=tokenizer.pad_token_id or 0, tokenizer_dir=model_dir)
    for split, dataset in encoded.items():
        result.labels[split] = np.asarray(dataset["label"], dtype=np.float32 if spec.regression else np.int64)
        result.segments[split] = np.asarray(dataset["segment_a"], dtype=np.int64)
    return result


def _position_limit(model_dir: str) -> int:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    limit = config.get("max_position_embeddings") or 512
    if config.get("model_type") in ("roberta", "xlm-roberta"):
        limit -= 2  # RoBERTa's positions start after the padding index
    return int(limit)


def _check_same_vocabulary(student_tok, teacher_tok, student_dir, teacher_dir) -> None:
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        raise UserError(f"--teacher {teacher_dir}: its tokenizer differs from {student_dir}'s "
                        f"({len(teacher_tok)} vs {len(student_tok)} tokens); task-specific distillation needs "
                        "the same vocabulary (a student built from this teacher has it)")


class ClassifyCollator:
    """Pads a micro-batch; labels and token types come from per-example arrays (picklable)."""

    def __init__(self, labels, segments, pad_id: int):
        self.labels, self.segments, self.pad_id = labels, segments, pad_id

    def __call__(self, rows: list[dict], indices: list[int], epoch: int) -> dict:
        import numpy as np
        import torch

        width = max((len(r["input_ids"]) for r in rows), default=1)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        types = np.zeros((len(rows), width), dtype=np.int64)
        for i, (row, index) in enumerate(zip(rows, indices)):
            n = len(row["input_ids"])
            ids[i, :n], mask[i, :n] = row["input_ids"], 1
            types[i, self.segments[index]:n] = 1
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
                "token_type_ids": torch.from_numpy(types), "labels": torch.from_numpy(self.labels[indices]),
                "indices": torch.tensor(indices, dtype=torch.long)}


# ---------------------------------------------------------------------------- one run

def classifier_objective(model, regression: bool, temperature: float):
    """The ``nn.Module`` the engine trains: the classifier and its loss sums in one forward.

    As with the student of ``ds-distil train``, the loss lives inside ``forward`` so the
    engine owns everything that has gradients; the teacher's logits come in as a tensor.
    (Built by a function so that ``ds-distil --help`` does not import torch.)
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    accepts_types = accepts_token_types(model)

    class Objective(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids, labels, teacher_logits=None):
            """Sums over the micro-batch: the task loss, the soft-target loss, the hits."""
            extra = {"token_type_ids": token_type_ids} if accepts_types else {}
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits.float()
            sums = {"logits": logits.detach()}
            if regression:
                sums["task"] = F.mse_loss(logits.squeeze(-1), labels.float(), reduction="sum")
                if teacher_logits is not None:
                    sums["ce"] = F.mse_loss(logits, teacher_logits.float(), reduction="sum")
                sums["hits"] = torch.zeros((), device=logits.device)
                return sums
            sums["task"] = F.cross_entropy(logits, labels, reduction="sum")
            sums["hits"] = (logits.argmax(-1) == labels).sum().float()
            if teacher_logits is not None:
                t = temperature
                sums["ce"] = F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(teacher_logits.float() / t, -1),
                                      reduction="sum", log_target=True) * t * t
            return sums

    return Objective()


def accepts_token_types(model) -> bool:
    return "token_type_ids" in inspect.signature(model.forward).parameters


class ClassifyStep(DistillStep):
    """One optimizer step of fine-tuning: the teacher's class logits (if any), then the student's.

    The same contract as :class:`DistillStep` (whose cross-rank skip of non-finite steps it
    inherits): losses are sums normalised by the global batch's example count, so
    gradients do not depend on how the batch is split over ranks and micro-batches.
    """

    def __init__(self, engine, teacher, device, world_size: int, global_batch: int, alpha_task: float,
                 alpha_ce: float):
        import torch

        from ds_distil.metrics import Stopwatch

        self.engine, self.teacher, self.device = engine, teacher, device
        self.world_size, self.global_batch = world_size, global_batch
        self.alpha_task, self.alpha_ce = alpha_task, alpha_ce
        self.teacher_time = Stopwatch(device)
        self.teacher_types = teacher is not None and accepts_token_types(teacher)
        self.nonfinite_steps = torch.zeros((), dtype=torch.int64, device=device)

    def __call__(self, micro_batches, totals: StepTotals, inject_nan: bool = False) -> None:
        import torch

        from ds_distil.distributed import all_reduce_sum

        to = dict(device=self.device, non_blocking=True)
        batches = [{k: v.to(**to) for k, v in mb.items() if k in ("input_ids", "attention_mask", "token_type_ids",
                                                                   "labels")} for mb in micro_batches]
        local = torch.tensor([float(len(mb["labels"])) for mb in micro_batches]).sum()
        tokens = torch.tensor([float(mb["attention_mask"].sum()) for mb in micro_batches]).sum()
        counts = all_reduce_sum(torch.stack([local, local, tokens]).double().to(self.device))
        step_sums = torch.zeros(4, device=self.device)
        nonfinite = torch.zeros(1, device=self.device)
        for i, b in enumerate(batches):
            teacher_logits = self.teacher_logits(b)
            sums = self.engine(b["input_ids"], b["attention_mask"], b["token_type_ids"], b["labels"], teacher_logits)
            loss = self.alpha_task * sums["task"]
            if "ce" in sums:
                loss = loss + self.alpha_ce * sums["ce"]
            loss = loss / counts[0].float()
            if inject_nan:
                loss = loss * float("nan")
            nonfinite += (~torch.isfinite(loss.detach())).float()
            if i == len(batches) - 1:
                loss = self.skip_together(loss, nonfinite)
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            self.engine.step()
            zero = sums["task"].new_zeros(())
            step_sums += torch.stack([sums["task"].detach(), sums.get("ce", zero).detach(), zero,
                                      sums["hits"].detach()]).float()
        kept = nonfinite == 0
        totals.sums += torch.where(kept, step_sums, 0.0)
        totals.counts += torch.where(kept, counts, 0.0)
        self.nonfinite_steps += (~kept).long().squeeze(0)
        totals.steps += 1
        totals.tokens = totals.tokens + counts[2]
        totals.sequences += self.global_batch

    def teacher_logits(self, b: dict):
        import torch

        if self.teacher is None:
            return None
        extra = {"token_type_ids": b["token_type_ids"]} if self.teacher_types else {}
        with self.teacher_time, torch.inference_mode():
            logits = self.teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"], **extra).logits
        return logits.float().clone()  # a normal tensor: inference tensors cannot enter autograd


class FinetuneRun(Trainer):
    """One fine-tuning run, driven by :meth:`Trainer.fit` (the one step loop of ds-distil).

    It builds what ``fit`` uses (engine, batches, step, writer, guards) for a classifier
    and replaces the MLM-specific parts: the loss columns, the evaluation (the task's
    metrics on its dev splits) and saving (the fine-tuned model, not a resumable
    checkpoint: a run is short, and an interrupted comparison restarts the run).
    """

    def __init__(self, cfg: FinetuneConfig, spec, encoded: EncodedTask, model_dir: str, teacher_dir: str | None,
                 lr: float, seed: int, run_dir: Path, dist_info):
        import deepspeed
        import torch
        from transformers import AutoModelForSequenceClassification

        from ds_distil import ds_config
        from ds_distil.batching import GlobalBatchSampler
        from ds_distil.config import TrainConfig
        from ds_distil.distributed import PreemptionSignal
        from ds_distil.metrics import MetricsWriter
        from ds_distil.trainer import FaultInjection, SkipTracker, _device, skip_nonfinite_updates

        self.ft, self.spec, self.encoded, self.lr, self.seed = cfg, spec, encoded, lr, seed
        self.dist, self.is_main = dist_info, dist_info.is_main
        self.out = self.ckpt_root = self.resume_root = run_dir
        if self.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        _barrier_all()
        self.preemption = PreemptionSignal(signals=())
        self.faults = FaultInjection.from_env(dist_info.rank)

        raw_ds = ds_config.load_ds_config(cfg.deepspeed_config)
        world = dist_info.world_size
        micro = cfg.micro_batch_size or max(1, cfg.batch_size // world)
        raw_ds = ds_config.with_batch_and_lr(raw_ds, global_batch=cfg.batch_size, micro_batch=micro, lr=lr)
        self.batch = ds_config.batch_arithmetic(raw_ds, world, source=cfg.deepspeed_config)
        self.precision = ds_config.check_precision_supported(raw_ds, cfg.deepspeed_config)
        lengths = [len(ids) for ids in encoded.train["input_ids"]]
        if len(lengths) < self.batch["global_batch"]:
            raise UserError(f"{spec.name}: the train split has {len(lengths)} examples, fewer than one batch of "
                            f"{self.batch['global_batch']}; lower --batch-size")
        import numpy as np

        self.sampler = GlobalBatchSampler(np.asarray(lengths, dtype=np.int64), self.batch["global_batch"],
                                          self.batch["micro_batch"], world, dist_info.rank, seed=seed)
        self.max_steps = max(1, math.floor(cfg.epochs * self.sampler.steps_per_epoch))
        self.cfg = _RunSettings(TrainConfig(max_steps=self.max_steps, seed=seed, log_interval=cfg.log_interval,
                                            warmup_fraction=cfg.warmup_fraction, checkpoint_interval=0,
                                            num_workers=0, progress_bar=False), str(run_dir))
        self.collator = ClassifyCollator(encoded.labels["train"], encoded.segments["train"], encoded.pad_id)
        self.data = type("TrainData", (), {"train": encoded.train})  # what Trainer._batches reads

        self.device = _device(dist_info.local_rank)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)
        torch.manual_seed(seed)  # the classifier head's initialisation, the same on every rank
        model = _quietly(AutoModelForSequenceClassification.from_pretrained, model_dir, num_labels=spec.num_labels,
                         problem_type="regression" if spec.regression else "single_label_classification",
                         local_files_only=True)
        self.model = model
        self.teacher = None
        if teacher_dir:
            self.teacher = _quietly(AutoModelForSequenceClassification.from_pretrained, teacher_dir,
                                    local_files_only=True, **({"dtype": dtype} if dtype else {}))
            self.teacher.eval().requires_grad_(False).to(self.device)
        objective = classifier_objective(model, spec.regression, cfg.temperature)
        resolved = ds_config.resolve_run_values({"tensorboard": {"enabled": True}, **raw_ds},
                                                total_steps=self.max_steps, output_dir=run_dir, job_name="finetune",
                                                warmup_fraction=cfg.warmup_fraction, source=cfg.deepspeed_config)
        self.ds_resolved = resolved
        self.engine, *_ = deepspeed.initialize(model=objective, model_parameters=list(objective.parameters()),
                                               config=resolved)
        skip_nonfinite_updates(self.engine)
        torch.manual_seed(seed + dist_info.rank)  # dropout
        self.step, self.epoch, self.step_in_epoch = 0, 0, 0
        self.step_fn = ClassifyStep(self.engine, self.teacher, self.device, world, self.batch["global_batch"],
                                    cfg.alpha_task, cfg.alpha_ce if self.teacher is not None else 0.0)
        self.teacher_time = self.step_fn.teacher_time
        self.writer = MetricsWriter(run_dir, self.engine.monitor, enabled=self.is_main, echo=self._echo)
        self.skips = SkipTracker(self.engine, self.cfg.train.max_consecutive_skips, self._fp16_scaler_adapting,
                                 self.device)
        self.final: dict = {}
        self._echo(f"{spec.name}: {Path(model_dir).name} lr {lr:g} seed {seed}: {self.max_steps} steps of "
                   f"{self.batch['global_batch']} examples ({self.batch['micro_batch']}/micro-batch x "
                   f"{self.batch['accumulation_steps']} x {world} ranks), precision {self.precision}"
                   f"{', distilling from ' + teacher_dir if teacher_dir else ''}")

    def run(self) -> dict:
        started = time.perf_counter()
        status = self.fit()
        if status != 0:
            raise UserError(f"{self.out}: fine-tuning stopped with status {status} (see the messages above)")
        result = {"task": self.spec.name, "lr": self.lr, "seed": self.seed, "steps": self.max_steps,
                  "seconds": round(time.perf_counter() - started, 2), **self.final}
        if self.ft.save_models != "none":
            result["saved_model"] = str(self.out / "model")
        self.engine.destroy()  # frees the optimizer's buffers before the next run's engine
        return result

    def _loss_values(self, sums, counts) -> dict:
        n = float(counts[1].clamp(min=1))
        values = {"loss_task": float(sums[0]) / n}
        total = self.ft.alpha_task * values["loss_task"]
        if self.teacher is not None:
            values["loss_ce"] = float(sums[1]) / n
            total += self.ft.alpha_ce * values["loss_ce"]
        if not self.spec.regression:
            values["accuracy"] = float(sums[3]) / n
        return {"loss": total, **values}

    def evaluate(self) -> dict:
        """The task's metrics on each dev split: every rank predicts its share, rank 0 scores."""
        import numpy as np
        import torch
        import torch.distributed as dist

        from ds_distil import tasks
        from ds_distil.data import make_eval_loader

        self.engine.eval()
        metrics = {}
        for split, dataset in self.encoded.dev.items():
            collator = ClassifyCollator(self.encoded.labels[split], self.encoded.segments[split], self.encoded.pad_id)
            loader = make_eval_loader(dataset, collator, self.batch["micro_batch"], self.dist.world_size,
                                      self.dist.rank, num_workers=0)
            indices, outputs = [], []
            with torch.no_grad():
                for b in loader:
                    if len(b["indices"]) == 0:
                        continue
                    sums = self.engine(*(b[k].to(self.device) for k in ("input_ids", "attention_mask",
                                                                       "token_type_ids", "labels")))
                    indices.append(b["indices"].numpy())
                    outputs.append(sums["logits"].float().cpu().numpy())
            mine = (np.concatenate(indices) if indices else np.zeros(0, np.int64),
                    np.concatenate(outputs) if outputs else np.zeros((0, self.spec.num_labels), np.float32))
            gathered = [None] * self.dist.world_size
            if dist.is_initialized() and self.dist.world_size > 1:
                dist.all_gather_object(gathered, mine)
            else:
                gathered = [mine]
            order = np.concatenate([g[0] for g in gathered])
            logits = np.concatenate([g[1] for g in gathered])[np.argsort(order)]
            predictions = logits[:, 0] if self.spec.regression else logits.argmax(-1)
            metrics[split] = tasks.compute_metrics(self.spec, predictions, self.encoded.labels[split])
        self.engine.train()
        self.final = {"metrics": metrics, "score": tasks.task_score(metrics)}
        self.writer.write("Eval", self.step, {f"{s}/{k}": v for s, m in metrics.items() for k, v in m.items()})
        return self.final

    def save(self) -> None:
        """The fine-tuned model as a Hugging Face directory (written atomically by rank 0)."""
        self.skips.verify(self.step_fn.nonfinite_steps)
        if self.ft.save_models == "none":
            return
        params = list(self.model.parameters())
        if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3: gather the full weights first
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                self._save_model()
        else:
            self._save_model()
        _barrier_all()

    def _save_model(self) -> None:
        if not self.is_main:
            return
        from transformers import AutoTokenizer

        from ds_distil.checkpoint import save_hf_atomically

        tokenizer = AutoTokenizer.from_pretrained(self.encoded.tokenizer_dir, local_files_only=True)
        save_hf_atomically(self.model, tokenizer, self.out / "model")


def _barrier_all() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _quietly(load, *args, **kwargs):
    """transformers' loader without its "newly initialized weights" notice (expected: the new head)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return load(*args, **kwargs)
    finally:
        hf_logging.set_verbosity(level)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- summary

def summarise(cfg: FinetuneConfig, runs: list[dict]) -> dict:
    """Per model and task: the median over seeds at each LR, the best LR, and retentions."""
    summary: dict = {}
    for name in cfg.models:
        per_task = {}
        for spec in cfg.tasks:
            mine = [r for r in runs if r["model"] == name and r["task"] == spec.name]
            by_lr = {}
            for r in mine:
                by_lr.setdefault(r["lr"], []).append(r)
            medians = {lr: statistics.median(r["score"] for r in rs) for lr, rs in by_lr.items()}
            best_lr = max(medians, key=medians.get)
            scores = sorted(r["score"] for r in by_lr[best_lr])
            median_run = min(by_lr[best_lr], key=lambda r: (abs(r["score"] - medians[best_lr]), r["seed"]))
            per_task[spec.name] = {"score": medians[best_lr], "best_lr": best_lr, "seed_scores": scores,
                                   "median_seed": median_run["seed"], "metrics": median_run["metrics"],
                                   "median_by_lr": {f"{lr:g}": m for lr, m in medians.items()},
                                   "run_model": median_run.get("saved_model")}
        macro = statistics.fmean(t["score"] for t in per_task.values())
        summary[name] = {"tasks": per_task, "macro": macro}
    reference = next(iter(cfg.models))
    for name, s in summary.items():
        ref = summary[reference]
        s["retention"] = {"macro": s["macro"] / ref["macro"] if ref["macro"] else None,
                          **{t: (v["score"] / ref["tasks"][t]["score"] if ref["tasks"][t]["score"] else None)
                             for t, v in s["tasks"].items()}}
    return {"reference": reference, "protocol": {
        "learning_rates": list(cfg.learning_rates), "seeds": list(cfg.seeds), "epochs": cfg.epochs,
        "batch_size": cfg.batch_size, "max_seq_len": cfg.max_seq_len, "teacher": cfg.teacher,
        "selection": "median over seeds at each learning rate; the best median is reported (dev sets)"},
        "models": summary, "runs": runs}


def _keep_models(cfg: FinetuneConfig, results: dict) -> None:
    """Copy each median run's model to ``models/NAME/TASK``; with "best", drop the rest."""
    out = Path(cfg.output_dir)
    if cfg.save_models == "none":
        return
    for name, s in results["models"].items():
        for task, t in s["tasks"].items():
            source = t.get("run_model")
            if not source or not Path(source).is_dir():
                continue
            target = out / "models" / name / task
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(source, target)
            t["model"] = str(target)
    if cfg.save_models == "best":
        for r in results["runs"]:
            if r.get("saved_model") and Path(r["saved_model"]).is_dir():
                shutil.rmtree(r["saved_model"])


def format_tables(results: dict) -> str:
    """The paper's Table 1: one row per task, one column per model; retention vs the reference."""
    models = results["models"]
    reference = results["reference"]
    tasks = list(next(iter(models.values()))["tasks"])
    width = max(12, *(len(n) + 8 for n in models))
    head = f"{'task (metric)':<22}" + "".join(f"{n:>{width}}" for n in models)
    lines = [head, "-" * len(head)]
    for task in tasks:
        metric = "/".join(next(iter(models.values()))["tasks"][task]["metrics"][
            next(iter(next(iter(models.values()))["tasks"][task]["metrics"]))].keys())
        cells = []
        for name, s in models.items():
            t = s["tasks"][task]
            retention = s["retention"][task]
            cells.append(f"{t['score']:.1f}" + (f" ({retention:.0%})" if name != reference and retention else ""))
        lines.append(f"{task + ' (' + metric + ')':<22}" + "".join(f"{c:>{width}}" for c in cells))
    cells = [f"{s['macro']:.1f}" + (f" ({s['retention']['macro']:.0%})" if n != reference and s['retention']['macro']
                                    else "") for n, s in models.items()]
    lines.append(f"{'macro score':<22}" + "".join(f"{c:>{width}}" for c in cells))
    p = results["protocol"]
    lines.append(f"median of {len(p['seeds'])} seed(s) at the best of {len(p['learning_rates'])} learning rate(s) "
                 f"(dev sets); in brackets: retention vs {reference}")
    return "\n".join(lines)
