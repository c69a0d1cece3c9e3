"""The run config of ``ds-distil train``: typed, documented, validated, saved with the run.

A run config is a JSON file of the sections below; every field has a default except the
paths. ``key=value`` overrides on the command line use dotted names
(``loss.alpha_ce=0 train.max_steps=100``). Relative paths are taken from the current
directory. Validation reports every problem at once, naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ds_distil.errors import UserError


@dataclass
class LossConfig:
    alpha_ce: float = 5.0
    """Weight of L_ce, the soft-target KL between teacher and student (0 = off)."""
    alpha_mlm: float = 2.0
    """Weight of L_mlm, the student's masked-language-modelling cross-entropy."""
    alpha_cos: float = 1.0
    """Weight of L_cos, 1 - cosine between student and teacher last hidden states."""
    temperature: float = 2.0
    """Softmax temperature T of L_ce (the term is scaled by T^2)."""
    ce_positions: str = "all"
    """Where L_ce is computed: "all" real tokens (the reference) or "mlm" positions only."""


@dataclass
class MaskingConfig:
    mlm_probability: float = 0.15
    """Share of each sequence's real (non-special) tokens that get an MLM target."""
    mask_fraction: float = 0.8
    """Of the targets, the share replaced by the mask token."""
    random_fraction: float = 0.1
    """Of the targets, the share replaced by a random non-special token."""
    keep_fraction: float = 0.1
    """Of the targets, the share left unchanged (the three fractions sum to 1)."""
    smoothing: float | None = 0.7
    """Select targets with probability ~ count(token)^-smoothing (null = uniform)."""


@dataclass
class TrainConfig:
    max_steps: int | None = None
    """Optimizer steps to run; null = derive from ``epochs``."""
    epochs: float | None = None
    """Passes over the training data when ``max_steps`` is null (default 3 then)."""
    warmup_fraction: float = 0.05
    """Share of the steps over which the learning rate warms up linearly."""
    seed: int = 56
    """Seed of batch order, masking and dropout (the paper's run used 56)."""
    log_interval: int = 10
    """Steps between console lines and TensorBoard points (the only host syncs)."""
    eval_interval: int = 0
    """Steps between validation passes (0 = only at the end)."""
    eval_max_batches: int = 50
    """Validation micro-batches per rank per evaluation (0 = the whole split)."""
    checkpoint_interval: int = 500
    """Steps between checkpoints (0 = only at the end and on preemption)."""
    keep_checkpoints: int = 3
    """How many complete checkpoints to keep (older ones are deleted)."""
    num_workers: int = 1
    """Data-loader worker processes per rank (0 = load in the training process)."""
    max_consecutive_skips: int = 10
    """Stop (exit 3, last checkpoint kept) after this many steps in a row skipped because
    some rank had a non-finite loss or gradient (fp16 loss-scaler skips do not count
    while the scaler can still lower its scale)."""
    collective_timeout_s: float = 600.0
    """Timeout of every collective, DeepSpeed's own process groups included: a dead or
    hung rank makes the others stop (exit 4) after this long instead of hanging."""
    progress_bar: bool = True
    """Show a progress bar on rank 0 (the log lines are printed either way)."""


@dataclass
class RunConfig:
    student: str
    """HF directory of the student (made by ``ds-distil init-student``), or of the model
    to pretrain when there is no teacher."""
    data: str
    """Directory made by ``ds-distil prepare``."""
    deepspeed_config: str
    """DeepSpeed JSON (see ds_configs/): precision, ZeRO stage, batch, optimizer, schedule."""
    output_dir: str
    """Where checkpoints, TensorBoard logs and the resolved config go."""
    teacher: str | None = None
    """HF directory of the teacher; null = plain MLM pretraining (alpha_ce = alpha_cos = 0)."""
    resume: str = "auto"
    """"auto" resumes from output_dir's latest complete checkpoint, "never" refuses to
    start over one, or a checkpoint directory/tag path to resume from."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss weights and temperature."""
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    """Dynamic masking."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Length, logging, checkpoints, seeds."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PATH_FIELDS = ("student", "data", "deepspeed_config", "teacher")


def field_docs(cls) -> dict[str, str]:
    """Field docstrings of a config dataclass, read from its source (for --help-config)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cls))
    docs, body = {}, tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def describe() -> str:
    """Every key of the run config with its default and docstring."""
    lines = []

    def walk(cls, prefix: str):
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(_resolve(cls, f)):
                walk(_resolve(cls, f), f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else "(required)"
            lines.append(f"{prefix}{f.name} = {json.dumps(default) if default != '(required)' else default}\n    {docs.get(f.name, '')}")

    walk(RunConfig, "")
    return "\n".join(lines)


def _resolve(cls, f) -> typing.Any:
    return typing.get_type_hints(cls)[f.name]


def _check_value(key: str, value, hint, problems: list[str]):
    """Coerce ``value`` to ``hint`` (int/float/str/bool/Optional) or record a problem."""
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        problems.append(f"{key}: null is not allowed; give a value")
        return None
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif base is str:
        if isinstance(value, str):
            return value
    problems.append(f"{key}: expected {base.__name__}, got {json.dumps(value)}")
    return None


def _build(cls, raw: dict, prefix: str, problems: list[str]):
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'}: expected an object, got {json.dumps(raw)}")
        return None
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {prefix}{near[0]}?)" if near else f" (valid keys: {', '.join(names)})"
            problems.append(f"{prefix}{key}: unknown key{hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        hint = _resolve(cls, f)
        key = prefix + f.name
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, raw.get(f.name, {}), key + ".", problems) or hint()
        elif f.name in raw:
            before = len(problems)
            value = _check_value(key, raw[f.name], hint, problems)
            # A value of the wrong type is reported once; the default stands in for it
            # so that the range checks can still report every other problem.
            if len(problems) > before and f.default is not dataclasses.MISSING:
                value = f.default
            kwargs[f.name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{key}: missing; it is required ({field_docs(cls).get(f.name, '')})")
            kwargs[f.name] = None
    try:
        return cls(**kwargs)
    except TypeError:
        return None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` overrides; values are JSON when they parse, else strings."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not key=value (e.g. train.max_steps=100)")
        key, text = item.split("=", 1)
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = value
    return raw


def read_run_config(path: str | None, overrides: list[str] = ()) -> tuple[RunConfig | None, list[str]]:
    """Read, override and validate a run config: (config, every problem found).

    The config is returned even when it has problems (a default stands in for each bad
    value), so that the other inputs can still be checked and reported in the same go.
    """
    raw: dict = {}
    source = path or "command line"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{path}: run config not found; pass an existing JSON file to --config")
        try:
            raw = json.loads(p.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}")
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"{path}: cannot read the run config ({err})")
    raw = apply_overrides(raw, list(overrides))
    problems: list[str] = []
    cfg = _build(RunConfig, raw, "", problems)
    if cfg is not None:
        problems.extend(validate(cfg))
    return cfg, [f"{source}: {p}" for p in problems]


def load_run_config(path: str | None, overrides: list[str] = ()) -> RunConfig:
    """Read, override and validate a run config; raises UserError listing every problem."""
    cfg, problems = read_run_config(path, overrides)
    if problems:
        raise UserError(*problems)
    return cfg


def check_run(path: str | None, overrides: list[str] = (), world_size: int = 1, accelerator=None) -> RunConfig:
    """The run config, once it and every input it names are known good for ``world_size`` ranks.

    Reports everything wrong at once (UserError, one problem per line): the run config,
    the DeepSpeed JSON, the teacher/student pair, tokenizers, data and the checkpoint to
    resume from. Reads JSON and tokenizer files only; no model weights are loaded.
    """
    cfg, problems = read_run_config(path, overrides)
    if cfg is not None:
        problems.extend(preflight(cfg, world_size, accelerator))
    if problems:
        raise UserError(*problems)
    return cfg


def validate(cfg: RunConfig) -> list[str]:
    """Range and consistency checks; each problem names its key and the fix."""
    problems = []
    loss, masking, train = cfg.loss, cfg.masking, cfg.train
    for name in ("alpha_ce", "alpha_mlm", "alpha_cos"):
        value = getattr(loss, name)
        if not math.isfinite(value) or value < 0:
            problems.append(f"loss.{name}: {value} must be a finite number >= 0")
    if loss.alpha_ce == 0 and loss.alpha_mlm == 0 and loss.alpha_cos == 0:
        problems.append("loss: alpha_ce, alpha_mlm and alpha_cos are all 0; set at least one above 0")
    if not (loss.temperature > 0 and math.isfinite(loss.temperature)):
        problems.append(f"loss.temperature: {loss.temperature} must be > 0 (the recipe uses 2.0)")
    if loss.ce_positions not in ("all", "mlm"):
        problems.append(f"loss.ce_positions: {loss.ce_positions!r} must be \"all\" or \"mlm\"")
    if cfg.teacher is None and (loss.alpha_ce > 0 or loss.alpha_cos > 0):
        problems.append("teacher: null (plain MLM pretraining) needs loss.alpha_ce=0 and loss.alpha_cos=0, "
                        "or name a teacher directory")
    if not 0 < masking.mlm_probability < 1:
        problems.append(f"masking.mlm_probability: {masking.mlm_probability} must be in (0, 1) (recipe: 0.15)")
    fractions = (masking.mask_fraction, masking.random_fraction, masking.keep_fraction)
    if any(f < 0 or f > 1 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        problems.append(f"masking: mask_fraction + random_fraction + keep_fraction = {sum(fractions):g}; "
                        "each must be in [0, 1] and they must sum to 1 (recipe: 0.8/0.1/0.1)")
    if masking.smoothing is not None and masking.smoothing < 0:
        problems.append(f"masking.smoothing: {masking.smoothing} must be >= 0 or null")
    if train.max_steps is not None and train.max_steps < 1:
        problems.append(f"train.max_steps: {train.max_steps} must be >= 1 (or null to use train.epochs)")
    if train.epochs is not None and not train.epochs > 0:
        problems.append(f"train.epochs: {train.epochs} must be > 0")
    if not 0 <= train.warmup_fraction < 1:
        problems.append(f"train.warmup_fraction: {train.warmup_fraction} must be in [0, 1)")
    for name in ("log_interval", "keep_checkpoints"):
        if getattr(train, name) < 1:
            problems.append(f"train.{name}: {getattr(train, name)} must be >= 1")
    for name in ("eval_interval", "checkpoint_interval", "num_workers", "eval_max_batches"):
        if getattr(train, name) < 0:
            problems.append(f"train.{name}: {getattr(train, name)} must be >= 0")
    if train.max_consecutive_skips < 1:
        problems.append(f"train.max_consecutive_skips: {train.max_consecutive_skips} must be >= 1")
    if not train.collective_timeout_s > 0:
        problems.append(f"train.collective_timeout_s: {train.collective_timeout_s} must be > 0")
    if cfg.resume not in ("auto", "never", None) and not Path(cfg.resume).exists():
        problems.append(f"resume: {cfg.resume} does not exist; use \"auto\", \"never\" or a checkpoint path")
    for name in PATH_FIELDS:
        value = getattr(cfg, name)
        if value is not None and not Path(value).exists():
            problems.append(f"{name}: {value} does not exist; check the path (relative paths start "
                            "from the current directory)")
    return problems


# ---------------------------------------------------------------------------- preflight

def preflight(cfg: RunConfig, world_size: int, accelerator=None) -> list[str]:
    """Problems with the inputs a run config names, found before any model loads.

    Inputs already reported missing by :func:`validate` are skipped; each problem names
    its file, key and value and says how to fix it.
    """
    problems = deepspeed_problems(cfg, world_size, accelerator)
    student_tokenizer = None
    if _exists(cfg.student):
        student_tokenizer, found = _tokenizer(cfg.student, "student")
        problems += found
    problems += pair_problems(cfg, student_tokenizer)
    if _exists(cfg.data):
        problems += data_problems(cfg.data, student_tokenizer)
    if cfg.resume not in ("auto", "never", None) and Path(cfg.resume).exists():
        problems += resume_problems(cfg.resume)
    return problems


def _exists(path: str | None) -> bool:
    return path is not None and Path(path).exists()


def deepspeed_problems(cfg: RunConfig, world_size: int, accelerator=None) -> list[str]:
    """The DeepSpeed JSON: syntax, keys removed in 0.19.x, DeepSpeed's own schema, the batch
    arithmetic at ``world_size`` ranks, the precision on this device, the overflow checks."""
    from ds_distil import ds_config

    path = cfg.deepspeed_config
    if not _exists(path):
        return []
    try:
        ds = ds_config.load_ds_config(path)
    except UserError as err:
        return err.problems
    problems = []
    for check in (lambda: ds_config.validate_with_deepspeed(ds, world_size, source=path),
                  lambda: ds_config.check_precision_supported(ds, path, accelerator)):
        try:
            check()
        except UserError as err:
            problems += err.problems
    return problems + overflow_check_problems(ds, path)


def overflow_check_problems(ds: dict, source: str) -> list[str]:
    """Settings under which DeepSpeed 0.19.8 would apply a step with inf/NaN gradients.

    ZeRO stages 1 and 2 find non-finite gradients through ``bf16.check_grad_overflow``
    (bf16) or the gradient norm (fp32); with those off, the trainer could not make every
    rank skip a bad step.
    """
    zero = ds.get("zero_optimization") or {}
    if not isinstance(zero, dict) or zero.get("stage", 0) not in (1, 2):
        return []
    bf16 = ds.get("bf16") or ds.get("bfloat16") or {}
    fp16 = ds.get("fp16") or {}
    if isinstance(bf16, dict) and bf16.get("enabled") and bf16.get("check_grad_overflow") is False:
        return [f"{source}: bf16.check_grad_overflow=false: DeepSpeed would apply steps with inf/NaN gradients "
                "under ZeRO-1/2; remove the key (ds-distil skips such steps on every rank and needs the check)"]
    fp32 = not (isinstance(bf16, dict) and bf16.get("enabled")) and not (isinstance(fp16, dict) and fp16.get("enabled"))
    if fp32 and zero.get("compute_grad_norm") is False:
        return [f"{source}: zero_optimization.compute_grad_norm=false: in fp32 DeepSpeed then applies steps with "
                "inf/NaN gradients; remove the key (ds-distil skips such steps on every rank and needs the norm)"]
    return []


def _read_model_config(directory: str, role: str) -> tuple[dict | None, list[str]]:
    """``config.json`` of a model directory, or a problem naming it."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return None, [f"{role}: {directory} has no config.json: pass a Hugging Face model directory "
                      f"({'made by ds-distil init-student' if role == 'student' else 'the teacher saved with save_pretrained()'})"]
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, [f"{path}: unreadable model config ({err}): restore the file, or save the model again "
                      "with save_pretrained()"]
    if not isinstance(config, dict):
        return None, [f"{path}: not a model config (a JSON object is expected)"]
    return config, []


def _width(config: dict):
    return config.get("hidden_size", config.get("dim"))


def pair_problems(cfg: RunConfig, student_tokenizer=None) -> list[str]:
    """Teacher and student disagree: vocabulary, tokenizer, or widths when L_cos is on."""
    student = teacher = None
    problems = []
    if _exists(cfg.student):
        student, found = _read_model_config(cfg.student, "student")
        problems += found
    if cfg.teacher is not None and _exists(cfg.teacher):
        teacher, found = _read_model_config(cfg.teacher, "teacher")
        problems += found
    if student is None or teacher is None:
        return problems
    fix = f"build the student from this teacher: ds-distil init-student --teacher {cfg.teacher}"
    if student.get("vocab_size") != teacher.get("vocab_size"):
        problems.append(f"student: {cfg.student} has vocab_size {student.get('vocab_size')} but teacher {cfg.teacher} "
                        f"has {teacher.get('vocab_size')}: distillation needs one vocabulary; {fix}")
    if cfg.loss.alpha_cos > 0 and _width(student) != _width(teacher):
        problems.append(f"loss.alpha_cos: {cfg.loss.alpha_cos} needs equal hidden sizes, but teacher {cfg.teacher} "
                        f"has {_width(teacher)} and student {cfg.student} has {_width(student)}: set "
                        f"loss.alpha_cos=0, or {fix} (it keeps the teacher's width)")
    if student_tokenizer is not None and _has_tokenizer_files(cfg.teacher):
        problems += _tokenizer_pair_problems(student_tokenizer, cfg, fix)
    return problems


def _has_tokenizer_files(directory: str) -> bool:
    return any((Path(directory) / name).is_file() for name in ("tokenizer.json", "vocab.txt", "vocab.json"))


def _tokenizer(directory: str, role: str):
    """(tokenizer, problems) of a model directory; AutoTokenizer reads small files only."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True), []
    except Exception as err:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError...
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        return None, [f"{role}: {directory}: no usable tokenizer ({reason}); the student directory must hold "
                      "the teacher's tokenizer files (ds-distil init-student copies them)"]


def _tokenizer_pair_problems(student, cfg: RunConfig, fix: str) -> list[str]:
    from ds_distil.data import tokenizer_fingerprint

    teacher, problems = _tokenizer(cfg.teacher, "teacher")
    if teacher is None:
        return problems
    if tokenizer_fingerprint(student) != tokenizer_fingerprint(teacher):
        return [f"student: {cfg.student} has another tokenizer than teacher {cfg.teacher} (token ids would mean "
                f"different tokens to the two models): {fix}, or copy the teacher's tokenizer files into it"]
    return []


def data_problems(data_dir: str, tokenizer) -> list[str]:
    """Prepared data: readable, intact (every split opens with its recorded row count),
    and tokenised by the student's tokenizer."""
    from ds_distil import data

    try:
        prepared = data.load_prepared(data_dir)
        if tokenizer is not None:
            data.check_tokenizer_matches(prepared.meta, tokenizer, data_dir)
    except UserError as err:
        return [f"data: {p}" for p in err.problems]
    return []


def resume_problems(resume: str) -> list[str]:
    """A checkpoint named by ``resume`` must be complete (``auto`` falls back instead)."""
    from ds_distil import checkpoint

    root, tag = checkpoint.resolve_resume(resume, warn=lambda _: None)
    if tag is None:
        return [f"resume: {resume} holds no complete checkpoint; name a checkpoint directory or tag, or use \"auto\""]
    try:
        checkpoint.read_state(root, tag)
    except UserError as err:
        return [f"resume: {p}" for p in err.problems]
    return []
