"""Downstream tasks for ``ds-distil finetune``: the nine GLUE tasks, custom tasks, readers, metrics.

A task is a :class:`TaskSpec`: its text column(s), its label set (or regression), the
official metric(s) and its dev split(s). Data comes from local files only, in any of
these layouts (found by :func:`load_task`):

- the GLUE benchmark's own directories: ``GLUE/SST-2/train.tsv``, ``dev.tsv`` (CoLA
  without a header, MNLI with ``dev_matched.tsv`` and ``dev_mismatched.tsv``);
- the GLUE data set of the Hugging Face hub once downloaded: ``glue/sst2/train-*.parquet``,
  ``validation-*.parquet`` (MNLI: ``validation_matched-*``, ``validation_mismatched-*``);
- CSV, TSV, JSON Lines or parquet files named after their split (``train.csv``,
  ``dev.jsonl``/``validation.jsonl``, ...), for custom tasks as well;
- a ``datasets`` DatasetDict saved with ``save_to_disk``.

Every reader is a ``datasets`` loader; every reader returns a DatasetDict whose splits have
``text_a``, optionally ``text_b``, and ``label`` (an int class index, or a float for
regression). Metrics come from scikit-learn and scipy.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from ds_distil.errors import UserError

# Label sets in the order of the GLUE data set on the hub (its integer labels).
BINARY = ("0", "1")
NLI3 = ("entailment", "neutral", "contradiction")
NLI2 = ("entailment", "not_entailment")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    """Short name (``sst2``); also the folder name in the hub's GLUE layout."""
    text_columns: tuple[str, ...]
    """One column (single sentences) or two (sentence pairs), as named in the hub layout."""
    labels: tuple[str, ...] | None
    """Class names in label-index order; None for a regression task."""
    metrics: tuple[str, ...]
    """Official metrics; the task's score is their mean over every dev split."""
    label_column: str = "label"
    """Column of the label, as named in the hub layout."""
    dev_splits: tuple[str, ...] = ("validation",)
    """Evaluation splits, as named in the hub layout."""
    glue_dir: str | None = None
    """Folder name in the GLUE benchmark's own layout (``SST-2``)."""
    tsv_columns: dict = field(default_factory=dict)
    """GLUE TSV layout: hub column -> TSV column (a name, or a position when headerless)."""
    tsv_headerless: bool = False
    """Whether the GLUE TSV files have no header row (CoLA)."""

    @property
    def regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)


GLUE_TASKS = {
    spec.name: spec for spec in (
        TaskSpec("cola", ("sentence",), BINARY, ("matthews",), glue_dir="CoLA", tsv_headerless=True,
                 tsv_columns={"sentence": 3, "label": 1}),
        TaskSpec("sst2", ("sentence",), BINARY, ("accuracy",), glue_dir="SST-2"),
        TaskSpec("mrpc", ("sentence1", "sentence2"), BINARY, ("f1", "accuracy"), glue_dir="MRPC",
                 tsv_columns={"sentence1": "#1 String", "sentence2": "#2 String", "label": "Quality"}),
        TaskSpec("stsb", ("sentence1", "sentence2"), None, ("pearson", "spearman"), glue_dir="STS-B",
                 tsv_columns={"label": "score"}),
        TaskSpec("qqp", ("question1", "question2"), BINARY, ("accuracy", "f1"), glue_dir="QQP",
                 tsv_columns={"label": "is_duplicate"}),
        TaskSpec("mnli", ("premise", "hypothesis"), NLI3, ("accuracy",), glue_dir="MNLI",
                 dev_splits=("validation_matched", "validation_mismatched"),
                 tsv_columns={"premise": "sentence1", "hypothesis": "sentence2", "label": "gold_label"}),
        TaskSpec("qnli", ("question", "sentence"), NLI2, ("accuracy",), glue_dir="QNLI"),
        TaskSpec("rte", ("sentence1", "sentence2"), NLI2, ("accuracy",), glue_dir="RTE"),
        TaskSpec("wnli", ("sentence1", "sentence2"), BINARY, ("accuracy",), glue_dir="WNLI"),
    )
}
# The GLUE benchmark's file names of the dev splits.
GLUE_TSV_SPLITS = {"train": "train", "validation": "dev", "validation_matched": "dev_matched",
                   "validation_mismatched": "dev_mismatched"}
FILE_KINDS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SPLIT_ALIASES = {"validation": ("validation", "dev", "valid", "val"), "train": ("train",)}


def custom_task(name: str, text_columns: tuple[str, ...], label_column: str, task_type: str) -> TaskSpec:
    """A task for any data: its labels are read from the training split (classification)."""
    if not 1 <= len(text_columns) <= 2 or not all(text_columns):
        raise UserError(f"--text-columns {','.join(text_columns)!r}: give one column or two (a sentence pair), "
                        "e.g. --text-columns review or --text-columns question,passage")
    if task_type not in ("classification", "regression"):
        raise UserError(f"--task-type {task_type!r}: use classification or regression")
    metrics = ("pearson", "spearman") if task_type == "regression" else ("accuracy", "f1_macro")
    labels = None if task_type == "regression" else ()  # () = learned from the training split
    return TaskSpec(name, tuple(text_columns), labels, metrics, label_column=label_column)


def resolve_tasks(names: str) -> list[TaskSpec]:
    """``sst2,mrpc`` or ``glue`` (all nine) -> specs; unknown names are refused."""
    wanted = [n.strip().lower().replace("-", "") for n in names.split(",") if n.strip()]
    if wanted == ["glue"]:
        return list(GLUE_TASKS.values())
    unknown = [n for n in wanted if n not in GLUE_TASKS]
    if unknown or not wanted:
        raise UserError(f"--task {names!r}: unknown task {', '.join(unknown) or '(none)'}; use one or more of "
                        f"{', '.join(GLUE_TASKS)} (comma-separated), glue for all nine, or --task-type with "
                        "--text-columns for a custom task")
    return [GLUE_TASKS[n] for n in wanted]


# ---------------------------------------------------------------------------- readers

def load_task(spec: TaskSpec, data: str | Path):
    """The task's train and dev splits as a DatasetDict of ``text_a``[, ``text_b``], ``label``.

    ``data`` is a task's directory in any supported layout, or the GLUE root above it.
    """
    data = Path(data)
    if not data.exists():
        raise UserError(f"--data {data}: no such file or directory")
    splits = ("train", *spec.dev_splits)
    if (data / "dataset_dict.json").is_file():
        raw = _load_saved(data, splits)
        return _canonical(spec, raw, columns=None, source=data)
    task_dir = _task_dir(spec, data)
    tsv = _glue_tsv_files(task_dir, splits)
    if tsv:
        raw, columns = _load_glue_tsv(spec, tsv)
        return _canonical(spec, raw, columns, source=task_dir)
    files = _split_files(task_dir, splits)
    kinds = {FILE_KINDS[f.suffix] for paths in files.values() for f in paths}
    if len(kinds) > 1:
        raise UserError(f"{task_dir}: mixes file types ({', '.join(sorted(kinds))}); keep one per task")
    kind = kinds.pop()
    options = {"sep": "\t", "quoting": csv.QUOTE_NONE, "keep_default_na": False} \
        if files["train"][0].suffix == ".tsv" else ({"keep_default_na": False} if kind == "csv" else {})
    raw = _load(kind, {s: [str(f) for f in fs] for s, fs in files.items()}, task_dir, **options)
    return _canonical(spec, raw, columns=None, source=task_dir)


def _task_dir(spec: TaskSpec, data: Path) -> Path:
    """The folder holding the task's files: ``data`` itself, or its GLUE/hub child folder."""
    for child in (spec.glue_dir, spec.name):
        if child and (data / child).is_dir():
            return data / child
    return data


def _glue_tsv_files(task_dir: Path, splits: tuple[str, ...]) -> dict[str, Path]:
    files = {s: task_dir / f"{GLUE_TSV_SPLITS.get(s, s)}.tsv" for s in splits}
    return files if files["train"].is_file() and any(p.is_file() for p in files.values()) and \
        all(p.is_file() for p in files.values()) else {}


def _split_files(task_dir: Path, splits: tuple[str, ...]) -> dict[str, list[Path]]:
    """``{split: [files]}`` by file name: ``train.csv``, ``dev.jsonl``, ``validation-0000-of-0001.parquet``."""
    if not task_dir.is_dir():
        raise UserError(f"--data {task_dir}: expected a directory holding the task's train and dev files")
    candidates = sorted(p for p in task_dir.iterdir() if p.suffix in FILE_KINDS and p.is_file())
    found = {}
    for split in splits:
        names = SPLIT_ALIASES.get(split, (split, split.replace("validation", "dev")))
        matches = [p for p in candidates if any(p.stem == n or p.stem.startswith(n + "-") for n in names)]
        if not matches:
            have = ", ".join(p.name for p in candidates[:8]) or "no data files"
            raise UserError(f"{task_dir}: no {split} split: expected a file named "
                            f"{' or '.join(n + '.{csv,tsv,jsonl,parquet}' for n in names[:2])} "
                            f"(or the GLUE layout's train.tsv/dev.tsv); found {have}")
        found[split] = matches
    return found


def _load(kind: str, data_files: dict, where: Path, **options):
    import datasets

    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(kind, data_files=data_files, **options)
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - pandas/pyarrow raise many types for a bad file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{where}: could not read the {kind} files ({first}); check that they are "
                        "well-formed and use one layout") from None


def _load_saved(path: Path, splits: tuple[str, ...]):
    import datasets

    saved = datasets.load_from_disk(str(path))
    missing = [s for s in splits if s not in saved]
    if missing:
        raise UserError(f"{path}: the saved DatasetDict has no {', '.join(missing)} split (it has "
                        f"{', '.join(saved)}); save it with those split names")
    return datasets.DatasetDict({s: saved[s] for s in splits})


def _load_glue_tsv(spec: TaskSpec, files: dict[str, Path]):
    """The GLUE benchmark's TSV files: no quoting (sentences hold quote marks), CoLA headerless."""
    options = {"sep": "\t", "quoting": csv.QUOTE_NONE, "keep_default_na": False}
    if spec.tsv_headerless:
        width = max(v for v in spec.tsv_columns.values()) + 1
        options.update(header=None, column_names=[f"c{i}" for i in range(width)])
        columns = {k: f"c{v}" for k, v in spec.tsv_columns.items()}
    else:
        columns = dict(spec.tsv_columns)
    raw = _load("csv", {s: str(p) for s, p in files.items()}, next(iter(files.values())).parent, **options)
    return raw, columns


def _canonical(spec: TaskSpec, raw, columns: dict | None, source: Path):
    """Rename to ``text_a``/``text_b``/``label`` and turn labels into class indices (or floats)."""
    import datasets

    columns = columns or {}
    wanted = {"text_a": columns.get(spec.text_columns[0], spec.text_columns[0]),
              "label": columns.get(spec.label_column, spec.label_column)}
    if len(spec.text_columns) == 2:
        wanted["text_b"] = columns.get(spec.text_columns[1], spec.text_columns[1])
    labels = spec.labels
    if labels == ():  # a custom classification task: its label set is the training split's
        labels = tuple(sorted({_label_text(v) for v in _column(raw["train"], wanted["label"], "train", source)}))
        if len(labels) < 2:
            raise UserError(f"{source}: the train split has {len(labels)} distinct label(s) in column "
                            f"{wanted['label']!r}; classification needs at least two (or use --task-type regression)")
    out = {}
    for split, table in raw.items():
        texts = {k: [_text(v) for v in _column(table, c, split, source)] for k, c in wanted.items() if k != "label"}
        values = _column(table, wanted["label"], split, source)
        out[split] = datasets.Dataset.from_dict({**texts, "label": _encode_labels(values, labels, split, source,
                                                                                  wanted["label"])})
    return datasets.DatasetDict(out), labels


def _column(table, name: str, split: str, source: Path) -> list:
    if name not in table.column_names:
        raise UserError(f"{source}: the {split} split has no column {name!r} (it has "
                        f"{', '.join(map(str, table.column_names))}); name the right one with "
                        "--text-columns / --label-column")
    if len(table) == 0:
        raise UserError(f"{source}: the {split} split is empty")
    return table[name]


def _text(value) -> str:
    return "" if value is None else str(value)


def _label_text(value) -> str:
    """A label as text: 1, 1.0 and "1" are the same class."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _encode_labels(values: list, labels: tuple[str, ...] | None, split: str, source: Path, column: str) -> list:
    if labels is None:  # regression
        out = []
        for i, v in enumerate(values):
            try:
                out.append(float(v))
            except (TypeError, ValueError):
                raise UserError(f"{source}: {split} row {i + 1}: label {v!r} in column {column!r} is not a number, "
                                "but the task is a regression; use --task-type classification for class "
                                "labels") from None
            if not math.isfinite(out[-1]):
                raise UserError(f"{source}: {split} row {i + 1}: label {v!r} in column {column!r} is not finite")
        return out
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for i, v in enumerate(values):
        key = _label_text(v)
        if key not in index and isinstance(v, int) and 0 <= v < len(labels):
            key = labels[v]  # the hub's layout: integer labels index the class names
        if key not in index:
            raise UserError(f"{source}: {split} row {i + 1}: label {v!r} in column {column!r} is outside the "
                            f"label set {{{', '.join(labels)}}}; fix the row or the label column")
        out.append(index[key])
    return out


def with_labels(spec: TaskSpec, labels: tuple[str, ...] | None) -> TaskSpec:
    """``spec`` with the label set a custom task learned from its data."""
    return replace(spec, labels=labels)


# ---------------------------------------------------------------------------- metrics

def compute_metrics(spec: TaskSpec, predictions, labels) -> dict[str, float]:
    """The task's official metrics (in %, as GLUE reports them) of ``predictions`` vs ``labels``.

    Classification: predictions are class indices; regression: real values.
    """
    import numpy as np
    from scipy import stats
    from sklearn import metrics as skm

    predictions, labels = np.asarray(predictions), np.asarray(labels)
    out = {}
    for name in spec.metrics:
        if name == "accuracy":
            value = skm.accuracy_score(labels, predictions)
        elif name == "f1":
            value = skm.f1_score(labels, predictions, pos_label=1, average="binary", zero_division=0.0)
        elif name == "f1_macro":
            value = skm.f1_score(labels, predictions, average="macro", zero_division=0.0)
        elif name == "matthews":
            value = skm.matthews_corrcoef(labels, predictions)
        elif name in ("pearson", "spearman"):
            if np.std(predictions) == 0 or np.std(labels) == 0:
                value = 0.0  # a constant prediction correlates with nothing
            else:
                value = (stats.pearsonr if name == "pearson" else stats.spearmanr)(predictions, labels)[0]
        else:
            raise ValueError(f"unknown metric {name}")
        out[name] = 100.0 * float(value)
    return out


def task_score(metrics_by_split: dict[str, dict[str, float]]) -> float:
    """One number per task: the mean of its metrics over its dev splits (GLUE's convention)."""
    values = [v for split in metrics_by_split.values() for v in split.values()]
    return sum(values) / len(values)
