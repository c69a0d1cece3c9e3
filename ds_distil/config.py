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

from ds_distil.errors import UserError, output_path_problem


@dataclass
class LossConfig:
    alpha_ce: float = 5.0
    """Weight of L_ce, the soft-target KL between teacher and student (0 = off)."""
    alpha_mlm: float = 2.0
    """Weight of L_mlm, the student's masked-language-modelling cross-entropy."""
    alpha_cos: float = 1.0
    """Weight of L_cos, 1 - cosine between student and teacher last hidden states."""
    alpha_clm: float = 2.0
    """Weight of L_clm, the next-token cross-entropy, for causal-LM students (GPT-2, Llama;
    the reference's alpha_clm); alpha_mlm is the masked-LM students' weight."""
    alpha_mse: float = 0.0
    """Weight of L_mse, the squared error between student and teacher logits summed over the
    vocabulary, mean over the L_ce positions (the reference's alpha_mse; 0 = off)."""
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
    freeze_position_embeddings: bool = False
    """Keep the student's learned position embeddings as initialised (from the teacher),
    as the reference's --freeze_pos_embs did for DistilRoBERTa and DistilGPT2; students with
    rotary positions (Llama-style, ModernBERT) have none and are refused."""
    peak_tflops: float | None = None
    """Device peak in TFLOP/s that the logged MFU divides by (dense matmuls at the run's
    precision, per device); null = measured once at start on CPU, looked up per GPU model
    (ds_distil.metrics.KNOWN_PEAKS; measured for GPUs missing from it)."""


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
    """HF directory of the teacher; null = plain MLM pretraining (alpha_ce = alpha_cos = 0).
    An empty string is refused rather than read as null (it is more often a path that a
    template left blank than a request to drop the teacher)."""
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
        parts = key.strip().split(".")
        if not all(part.strip() for part in parts):
            what = f"key {key!r} has an empty part" if key.strip() else "no key before ="
            raise UserError(f"override {item!r}: {what}; write KEY=VALUE with a dotted key, e.g. "
                            "train.max_steps=100 (see --describe-config)")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        node = raw
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
        if not isinstance(raw, dict):
            raise UserError(f"{path}: a run config is a JSON object {{\"student\": ..., \"data\": ...}}, "
                            f"not {type(raw).__name__}; see --describe-config")
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
    weights = ("alpha_ce", "alpha_mlm", "alpha_clm", "alpha_cos", "alpha_mse")
    for name in weights:
        value = getattr(loss, name)
        if not math.isfinite(value) or value < 0:
            problems.append(f"loss.{name}: {value} must be a finite number >= 0")
    # Only the student's own LM term counts: alpha_clm means nothing to a masked student.
    from ds_distil.modeling import model_objective

    objective = model_objective(cfg.student) if cfg.student else None
    lm_weight = {"masked": ("alpha_mlm",), "causal": ("alpha_clm",)}.get(objective, ("alpha_mlm", "alpha_clm"))
    effective = ("alpha_ce", *lm_weight, "alpha_cos", "alpha_mse")
    if all(getattr(loss, name) == 0 for name in effective):
        problems.append(f"loss: {', '.join(effective)} are all 0; set at least one above 0")
    if not (loss.temperature > 0 and math.isfinite(loss.temperature)):
        problems.append(f"loss.temperature: {loss.temperature} must be > 0 (the recipe uses 2.0)")
    if loss.ce_positions not in ("all", "mlm"):
        problems.append(f"loss.ce_positions: {loss.ce_positions!r} must be \"all\" or \"mlm\"")
    if cfg.teacher is None and (loss.alpha_ce > 0 or loss.alpha_cos > 0 or loss.alpha_mse > 0):
        problems.append("teacher: null (plain MLM/CLM pretraining) needs loss.alpha_ce=0, loss.alpha_cos=0 and "
                        "loss.alpha_mse=0, or name a teacher directory")
    if not 0 < masking.mlm_probability < 1:
        problems.append(f"masking.mlm_probability: {masking.mlm_probability} must be in (0, 1) (recipe: 0.15)")
    fractions = (masking.mask_fraction, masking.random_fraction, masking.keep_fraction)
    if any(f < 0 or f > 1 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        problems.append(f"masking: mask_fraction + random_fraction + keep_fraction = {sum(fractions):g}; "
                        "each must be in [0, 1] and they must sum to 1 (recipe: 0.8/0.1/0.1)")
    if masking.smoothing is not None and not (math.isfinite(masking.smoothing) and masking.smoothing >= 0):
        problems.append(f"masking.smoothing: {masking.smoothing} must be a finite number >= 0 or null")
    if train.max_steps is not None and train.max_steps < 1:
        problems.append(f"train.max_steps: {train.max_steps} must be >= 1 (or null to use train.epochs)")
    if train.epochs is not None and not (train.epochs > 0 and math.isfinite(train.epochs)):
        problems.append(f"train.epochs: {train.epochs} must be a finite number > 0")
    if not 0 <= train.seed < 2**63:
        problems.append(f"train.seed: {train.seed} must be in [0, 2**63) (the recipe uses 56)")
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
    if not 0 < train.collective_timeout_s <= MAX_TIMEOUT_S:
        problems.append(f"train.collective_timeout_s: {train.collective_timeout_s} must be > 0 and at most "
                        f"{MAX_TIMEOUT_S:.0e} seconds")
    if train.peak_tflops is not None and not (math.isfinite(train.peak_tflops) and train.peak_tflops > 0):
        problems.append(PEAK_TFLOPS_PROBLEM.format(value=train.peak_tflops))
    if cfg.resume is not None and not cfg.resume.strip():
        problems.append("resume: empty; use \"auto\", \"never\" or a checkpoint path")
    elif cfg.resume not in ("auto", "never", None) and not Path(cfg.resume).exists():
        problems.append(f"resume: {cfg.resume} does not exist; use \"auto\", \"never\" or a checkpoint path")
    for name in PATH_FIELDS:
        value = getattr(cfg, name)
        if value is not None and not value.strip():
            problems.append(EMPTY_PATH[name])
        elif value is not None and not Path(value).exists():
            problems.append(f"{name}: {value} does not exist; check the path (relative paths start "
                            "from the current directory)")
    if cfg.output_dir is not None:
        problems += filter(None, [output_path_problem(cfg.output_dir, "output_dir", "dir")])
    return problems


# Longest collective timeout: torch keeps it as a timedelta in milliseconds.
MAX_TIMEOUT_S = 1e8

PEAK_TFLOPS_PROBLEM = ("train.peak_tflops: {value} must be a finite number > 0, the device's dense matmul peak in "
                       "TFLOP/s at the run's precision (e.g. 989 for an H100 SXM in bf16), or null to measure it on "
                       "CPU / look it up per GPU")

EMPTY_PATH = {
    "student": "student: empty; give the student's directory (made by ds-distil init-student)",
    "data": "data: empty; give the directory made by ds-distil prepare",
    "deepspeed_config": "deepspeed_config: empty; give a DeepSpeed JSON (see ds_configs/)",
    "teacher": "teacher: empty string; give the teacher's directory, or null for plain MLM pretraining "
               "(with loss.alpha_ce=0 and loss.alpha_cos=0)",
}


# ---------------------------------------------------------------------------- preflight

def preflight(cfg: RunConfig, world_size: int, accelerator=None) -> list[str]:
    """Problems with the inputs a run config names, found before any model loads.

    Everything a start would refuse before its first step, short of loading weights: the
    DeepSpeed JSON (schema, batch, precision, optimizer and scheduler), the models'
    config.json (architecture, positions, vocabulary) and the headers of their weight
    files, tokenizers, the prepared data (intact, non-empty splits, at least one global
    batch), the run length against the warm-up, and the checkpoint to resume from.
    Inputs already reported missing by :func:`validate` are skipped; each problem names
    its file, key and value and says how to fix it.
    """
    ds, problems = _deepspeed(cfg, world_size, accelerator)
    models, found = model_problems(cfg)
    problems += found
    # A model already refused (e.g. weights of another model under its config.json) says
    # nothing reliable about its objective: one line per root cause.
    models_refused = any(p.startswith(("teacher:", "student:")) for p in found)
    student_tokenizer = None
    if _exists(cfg.student) and _read_model_config(cfg.student, "student")[0] is not None:
        student_tokenizer, found = _tokenizer(cfg.student, "student")  # it reads config.json too
        problems += found
    problems += pair_problems(cfg, student_tokenizer, models, check_objectives=not models_refused)
    meta = None
    if _exists(cfg.data):
        meta, found = _prepared_data(cfg.data, student_tokenizer)
        problems += found
    if meta is not None:
        problems += positions_problems(cfg, meta, models)
        if ds is not None:
            problems += run_length_problems(cfg, ds, meta, world_size)
    problems += freeze_problems(cfg, models.get("student"))
    problems += resume_problems(cfg, models.get("student"))
    return problems


def _exists(path: str | None) -> bool:
    return isinstance(path, str) and bool(path.strip()) and Path(path).exists()


def deepspeed_problems(cfg: RunConfig, world_size: int, accelerator=None) -> list[str]:
    """The DeepSpeed JSON: syntax, keys removed in 0.19.x, DeepSpeed's own schema, the batch
    arithmetic at ``world_size`` ranks, the precision on this device, the overflow checks,
    the optimizer and scheduler names and parameter types."""
    return _deepspeed(cfg, world_size, accelerator)[1]


def _deepspeed(cfg: RunConfig, world_size: int, accelerator=None) -> tuple[dict | None, list[str]]:
    """(the DeepSpeed JSON when it loads, its problems)."""
    from ds_distil import ds_config

    path = cfg.deepspeed_config
    if not _exists(path):
        return None, []
    if Path(path).is_dir():
        return None, [f"deepspeed_config: {path} is a directory; give the DeepSpeed JSON file (see ds_configs/)"]
    try:
        ds = ds_config.load_ds_config(path)
    except UserError as err:
        return None, err.problems
    except (AttributeError, TypeError):
        # ds_config's own checks assume the optimizer/scheduler blocks are objects.
        found = _block_shape_problems(path)
        return None, found or [f"{path}: not a DeepSpeed config ds-distil can read: compare it with ds_configs/"]
    problems = top_level_problems(ds, path)
    if problems:
        return None, problems  # DeepSpeed's own parser would fail on them with a TypeError
    for check in (lambda: ds_config.validate_with_deepspeed(ds, world_size, source=path),
                  lambda: ds_config.check_precision_supported(ds, path, accelerator)):
        try:
            check()
        except UserError as err:
            problems += err.problems
        except Exception as err:  # noqa: BLE001 - DeepSpeed's parser raises anything on odd input
            problems.append(f"{path}: DeepSpeed cannot read this config ({type(err).__name__}: {_first_line(err)}); "
                            "compare it with ds_configs/")
    problems += overflow_check_problems(ds, path) + optimizer_problems(ds, path) + scheduler_problems(ds, path)
    return ds, problems


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


# Optimizer parameters that DeepSpeed consumes itself before it builds a torch optimizer.
_DS_ADAM_KEYS = ("torch_adam", "adam_w_mode", "fp32_optimizer_states", "foreach")
# Scheduler parameters that may be strings: ds-distil's "auto" and the warm-up curve.
_SCHEDULER_STRINGS = {"warmup_num_steps": ("auto",), "total_num_steps": ("auto",),
                      "warmup_type": ("linear", "log")}


def _block(ds: dict, name: str, source: str) -> tuple[dict | None, list[str]]:
    """(the ``optimizer``/``scheduler`` block with a ``type`` and a params dict, problems)."""
    block = ds.get(name)
    if block is None:
        return None, []
    if not isinstance(block, dict):
        return None, [f"{source}: {name}: expected an object {{\"type\": ..., \"params\": {{...}}}}, "
                      f"got {json.dumps(block)}"]
    kind = block.get("type")
    if not isinstance(kind, str) or not kind.strip():
        return None, [f"{source}: {name}.type: missing or not a name (got {json.dumps(kind)}); "
                      f"e.g. {'AdamW' if name == 'optimizer' else 'WarmupDecayLR'} (see ds_configs/)"]
    params = block.get("params", {})
    if not isinstance(params, dict):
        return None, [f"{source}: {name}.params: expected an object, got {json.dumps(params)}"]
    return block, []


# Top-level blocks that must be JSON objects, and scalars DeepSpeed uses without checking
# their type (a string "5" for gradient_clipping fails at the first step).
OBJECT_BLOCKS = ("optimizer", "scheduler", "fp16", "bf16", "bfloat16", "torch_autocast", "data_types",
                 "zero_optimization", "activation_checkpointing", "flops_profiler", "checkpoint", "tensorboard",
                 "wandb", "csv_monitor", "comet", "aio")
NUMBERS = {"gradient_clipping": (float, 0, "a number >= 0 (the recipe clips at 5.0)"),
           "steps_per_print": (int, 1, "an integer >= 1"),
           "gradient_predivide_factor": (float, 1e-12, "a number > 0")}
FLAGS = ("prescale_gradients", "wall_clock_breakdown", "memory_breakdown", "zero_allow_untested_optimizer",
         "zero_force_ds_cpu_optimizer", "dataloader_drop_last", "dump_state")


def top_level_problems(ds: dict, source: str) -> list[str]:
    """Blocks that are not objects, and numbers or flags of the wrong type, at the top level."""
    problems = []
    for key in OBJECT_BLOCKS:
        if key in ("optimizer", "scheduler"):
            problems += _block(ds, key, source)[1]
        elif key in ds and not isinstance(ds[key], dict):
            example = f" (e.g. \"{key}\": {{\"enabled\": true}})" if key in ("fp16", "bf16", "bfloat16") else ""
            problems.append(f"{source}: {key}: expected an object {{...}}, got {json.dumps(ds[key])}{example}; "
                            "see ds_configs/")
    for key, (kind, low, what) in NUMBERS.items():
        value = ds.get(key)
        if value is None:
            continue
        ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
        if not ok or not value >= low or (kind is float and not math.isfinite(value)):
            problems.append(f"{source}: {key}: {json.dumps(value)} must be {what}")
    for key in FLAGS:
        if key in ds and not isinstance(ds[key], bool):
            problems.append(f"{source}: {key}: {json.dumps(ds[key])} must be true or false (without quotes)")
    return problems


def _block_shape_problems(path: str) -> list[str]:
    """Problems of the optimizer and scheduler blocks of an otherwise readable DeepSpeed JSON."""
    try:
        ds = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(ds, dict):
        return []
    return [p for name in ("optimizer", "scheduler") for p in _block(ds, name, path)[1]]


def _string_params(params: dict, name: str, source: str, allowed: dict) -> list[str]:
    """Parameters given as strings (or lists of strings) where DeepSpeed needs numbers."""
    problems = []
    for key, value in params.items():
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, str) and item not in allowed.get(key, ()):
                try:
                    float(item)
                    fix = "write the number without quotes"
                except ValueError:
                    fix = ("use one of " + ", ".join(map(json.dumps, allowed[key]))) if key in allowed \
                        else "give a number"
                problems.append(f"{source}: {name}.params.{key}: {json.dumps(value)} is a string; {fix}")
                break
    return problems


def optimizer_problems(ds: dict, source: str) -> list[str]:
    """The optimizer block: present, a type DeepSpeed 0.19.8 builds, parameters it accepts.

    Torch optimizers (``torch_adam``, or a ``torch.optim`` class name) are built once on a
    dummy parameter, so a misspelt or out-of-range parameter is caught here.
    """
    import torch
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    if "optimizer" not in ds:
        return [f"{source}: no optimizer block: the student would never be updated; add one, e.g. \"optimizer\": "
                "{\"type\": \"AdamW\", \"params\": {\"lr\": 5e-4, \"torch_adam\": true}} (see ds_configs/)"]
    block, problems = _block(ds, "optimizer", source)
    if block is None:
        return problems
    kind, params = block["type"], block.get("params", {})
    torch_class = getattr(torch.optim, kind, None)
    torch_class = torch_class if isinstance(torch_class, type) and issubclass(torch_class, torch.optim.Optimizer) \
        else None
    if kind.lower() not in DEEPSPEED_OPTIMIZERS and torch_class is None:
        return [f"{source}: optimizer.type {kind!r} is not an optimizer DeepSpeed knows: use AdamW (the recipe's, "
                "see ds_configs/), Adam, Lamb, Lion or Adagrad, or a torch.optim class name such as SGD"]
    problems = _string_params(params, "optimizer", source, {})
    if problems:
        return problems
    if kind.lower() in ("adam", "adamw") and params.get("torch_adam"):
        w_mode = kind.lower() == "adamw" or params.get("adam_w_mode", True)
        torch_class = torch.optim.AdamW if w_mode else torch.optim.Adam
        params = {k: v for k, v in params.items() if k not in _DS_ADAM_KEYS}
    elif kind.lower() in DEEPSPEED_OPTIMIZERS:
        return []  # DeepSpeed's own kernels: built at start only (some compile)
    try:
        torch_class([torch.zeros(1, requires_grad=True)], **params)
    except Exception as err:  # noqa: BLE001 - torch raises TypeError, ValueError...
        return [f"{source}: optimizer {kind} rejects optimizer.params ({_first_line(err)}); fix optimizer.params "
                "(the names and ranges of torch.optim." + torch_class.__name__ + ")"]
    return []


def scheduler_problems(ds: dict, source: str) -> list[str]:
    """The scheduler block: a type DeepSpeed 0.19.8 knows and no string where a number goes
    (the parameters are tried against the run length in :func:`run_length_problems`)."""
    import torch
    from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES

    block, problems = _block(ds, "scheduler", source)
    if block is None:
        return problems
    kind = block["type"]
    if kind not in VALID_LR_SCHEDULES and not isinstance(getattr(torch.optim.lr_scheduler, kind, None), type):
        return [f"{source}: scheduler.type {kind!r} is not a scheduler DeepSpeed knows: use "
                f"{', '.join(VALID_LR_SCHEDULES)} (ds_configs/ use WarmupDecayLR), or a torch.optim.lr_scheduler "
                "class name"]
    return _string_params(block.get("params", {}), "scheduler", source, _SCHEDULER_STRINGS)


def _scheduler_build_problems(resolved: dict, source: str) -> list[str]:
    """Build the scheduler DeepSpeed would build, around a dummy optimizer, and take one step."""
    import torch
    from deepspeed.runtime import lr_schedules

    block = resolved.get("scheduler")
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        return []
    kind, params = block["type"], block.get("params", {})
    cls = getattr(lr_schedules, kind) if kind in lr_schedules.VALID_LR_SCHEDULES else \
        getattr(torch.optim.lr_scheduler, kind)
    from deepspeed.utils import logger

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    level = logger.level
    logger.setLevel("ERROR")  # a scheduler read before its first step warns: this one is a dummy
    try:
        cls(optimizer, **params).step()
    except Exception as err:  # noqa: BLE001 - the schedulers raise TypeError, ValueError, KeyError...
        return [f"{source}: scheduler {kind} rejects scheduler.params ({_first_line(err)}); fix scheduler.params "
                "(see ds_configs/ for WarmupDecayLR's)"]
    finally:
        logger.setLevel(level)
    return []


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


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


def model_problems(cfg: RunConfig) -> tuple[dict, list[str]]:
    """({role: config.json} of the student and teacher ds-distil can use, problems).

    Reads config.json (the architecture must be one the trainer supports) and only the
    headers of the weight files (present, not truncated, shapes that fit config.json,
    compared with the model built on the meta device); no tensor is loaded. A model of
    an unsupported architecture or without usable weight files is left out of the
    returned configs, so that the pair checks do not report a consequence of it (a GPT-2
    teacher is "unsupported", not "another width"); one whose weights do not fit its
    config.json stays in, since its config.json is what the pair checks compare.
    """
    from ds_distil.modeling import architecture_problem, weights_problem, weights_shape_problem

    models, problems = {}, []
    for role in ("student", "teacher"):
        directory = getattr(cfg, role)
        if not _exists(directory):
            continue
        config, found = _read_model_config(directory, role)
        if config is not None:
            problem = architecture_problem(config, Path(directory) / "config.json") or weights_problem(directory)
            found = [f"{role}: {problem}"] if problem else []
            if not problem:
                models[role] = config  # its config.json is good for the pair checks
                shapes = weights_shape_problem(directory)
                found = [f"{role}: {shapes}"] if shapes else []
        problems += found
    return models, problems


def _width(config: dict):
    from ds_distil.modeling import hidden_size

    return hidden_size(config)


def pair_problems(cfg: RunConfig, student_tokenizer=None, models: dict | None = None,
                  check_objectives: bool = True) -> list[str]:
    """Teacher and student disagree: vocabulary, tokenizer, or widths when L_cos is on."""
    problems = []
    if models is None:
        models, problems = model_problems(cfg)
    student, teacher = models.get("student"), models.get("teacher")
    if student is None or teacher is None:
        return problems
    fix = f"build the student from this teacher: ds-distil init-student --teacher {cfg.teacher}"
    from ds_distil.modeling import model_objective

    objectives = {"student": model_objective(cfg.student), "teacher": model_objective(cfg.teacher)}
    if check_objectives and None not in objectives.values() and objectives["student"] != objectives["teacher"]:
        # Vocabulary and width lines would only be consequences of this one.
        return problems + [f"teacher: {cfg.teacher} is a {objectives['teacher']} LM but student {cfg.student} is a "
                           f"{objectives['student']} LM: distillation needs one objective; {fix}"]
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

    if not Path(directory).is_dir():
        return None, []  # reported by model_problems (no config.json)
    if not _has_tokenizer_files(directory):
        # AutoTokenizer would build some default tokenizer instead of failing.
        return None, [f"{role}: {directory} has no tokenizer files (tokenizer.json, vocab.txt or vocab.json): "
                      + ("copy the teacher's tokenizer files into it (ds-distil init-student copies them)"
                         if role == "student" else "save the teacher's tokenizer there (tokenizer.save_pretrained)")]
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
    """Prepared data: readable, intact (every split opens with its recorded row count, none
    empty), and tokenised by the student's tokenizer."""
    return _prepared_data(data_dir, tokenizer)[1]


def _prepared_data(data_dir: str, tokenizer) -> tuple[dict | None, list[str]]:
    """(meta.json of the prepared data when it is usable, its problems)."""
    from ds_distil import data

    found = empty_split_problems(data_dir)
    if found:
        return None, found
    try:
        prepared = data.load_prepared(data_dir)
        if tokenizer is not None:
            data.check_tokenizer_matches(prepared.meta, tokenizer, data_dir)
    except UserError as err:
        return None, [f"data: {p}" for p in err.problems]
    return prepared.meta, []


def empty_split_problems(data_dir: str) -> list[str]:
    """Empty training or validation splits, from meta.json and the Arrow files' row counts.

    Found before ``datasets`` opens the data (it fails on an empty split with an
    IndexError); anything else wrong with the directory is left to ``load_prepared``.
    """
    meta_file = Path(data_dir) / "meta.json"
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        recorded = {name: meta["splits"][name]["sequences"] for name in ("train", "validation")}
    except (OSError, ValueError, KeyError, TypeError):
        return []
    problems = []
    for name, expected in recorded.items():
        rows = _arrow_rows(Path(data_dir) / name)
        if rows is None or rows > 0 or not isinstance(expected, int):
            continue
        where = f"data: {Path(data_dir) / name}"
        if expected > 0:
            problems.append(f"{where}: holds 0 sequences but meta.json records {expected} (a truncated or replaced "
                            "file): prepare it again (ds-distil prepare --force)")
        elif name == "train":
            problems.append(f"{where}: the training split is empty (0 sequences): prepare the data again from a "
                            "corpus with text (ds-distil prepare --force)")
        else:
            problems.append(f"{where}: the validation split is empty (0 sequences), and training ends with an "
                            "evaluation on it: prepare the data again with --validation-fraction above 0 (e.g. 0.01)")
    return problems


def _arrow_rows(split_dir: Path) -> int | None:
    """Rows in a saved split's Arrow files (their record batches, memory-mapped), None if unreadable."""
    import pyarrow as pa

    try:
        state = json.loads((split_dir / "state.json").read_text(encoding="utf-8"))
        rows = 0
        for entry in state["_data_files"]:
            with pa.memory_map(str(split_dir / entry["filename"])) as source:
                rows += sum(batch.num_rows for batch in pa.ipc.open_stream(source))
        return rows
    except Exception:  # noqa: BLE001 - a damaged split is load_prepared's to report, with its own message
        return None


def positions_problems(cfg: RunConfig, meta: dict, models: dict) -> list[str]:
    """The prepared sequences must fit each model's position embeddings and vocabulary."""
    from ds_distil.modeling import max_positions

    longest = meta.get("max_seq_len")
    vocab = (meta.get("tokenizer") or {}).get("vocab_size")
    short, small = [], []
    for role, config in models.items():
        limit, size = max_positions(config), config.get("vocab_size")
        if isinstance(longest, int) and limit is not None and longest > limit:
            short.append((limit, f"{role} {getattr(cfg, role)} has {limit}"))
        if isinstance(vocab, int) and isinstance(size, int) and not isinstance(size, bool) and vocab > size:
            small.append(f"{role} {getattr(cfg, role)} has vocab_size {size}")
    problems = []
    if short:  # one line for both models: one fix serves them
        models_text = " and ".join(text for _, text in short)
        problems.append(f"data: {cfg.data} was prepared with max_seq_len {longest}, but {models_text} "
                        f"positions (max_position_embeddings in config.json): prepare the data again with "
                        f"--max-seq-len {min(n for n, _ in short)} or less")
    if small:
        problems.append(f"data: {cfg.data} holds token ids up to {vocab - 1}, but {' and '.join(small)}: use models of "
                        "this tokenizer, or prepare the data with the models' own tokenizer")
    return problems


def freeze_problems(cfg: RunConfig, student: dict | None) -> list[str]:
    """``train.freeze_position_embeddings`` needs a student with a learned position table."""
    from ds_distil.models import class_of, family_of

    found = family_of(student) if cfg.train.freeze_position_embeddings and isinstance(student, dict) else None
    if found is None or found.position_table is not None:
        return []
    return [f"train.freeze_position_embeddings: student {cfg.student} ({class_of(student)}) has rotary positions, "
            "no position embeddings to freeze; set train.freeze_position_embeddings=false"]


def run_length_problems(cfg: RunConfig, ds: dict, meta: dict, world_size: int) -> list[str]:
    """At least one global batch in the training split; the warm-up inside the run; the
    scheduler built as DeepSpeed will build it, with the run's values filled in."""
    from ds_distil import ds_config

    source = cfg.deepspeed_config
    try:
        batch = ds_config.batch_arithmetic(ds, world_size, source=source)
    except (UserError, ValueError):
        return []  # reported by deepspeed_problems
    sequences = ((meta.get("splits") or {}).get("train") or {}).get("sequences")
    if not isinstance(sequences, int):
        return []
    steps_per_epoch = sequences // batch["global_batch"]
    if steps_per_epoch == 0:
        return [f"{source}: train_batch_size={batch['global_batch']} is larger than the training split "
                f"({sequences} sequences in {Path(cfg.data) / 'train'}): lower train_batch_size or prepare more data"]
    total = cfg.train.max_steps or max(1, math.floor((cfg.train.epochs or 3) * steps_per_epoch))
    try:
        resolved = ds_config.resolve_run_values(ds, total_steps=total, output_dir=cfg.output_dir or ".",
                                                job_name="train", warmup_fraction=cfg.train.warmup_fraction,
                                                source=source)
    except UserError as err:
        return err.problems
    except (TypeError, ValueError):
        return []  # a parameter of the wrong type: reported by scheduler_problems
    params = (ds.get("scheduler") or {}).get("params") if isinstance(ds.get("scheduler"), dict) else None
    warmup = params.get("warmup_num_steps") if isinstance(params, dict) else None
    if isinstance(warmup, (int, float)) and not isinstance(warmup, bool) and warmup > total:
        return [f"{source}: scheduler.params.warmup_num_steps={warmup} is longer than the run ({total} steps): "
                "the learning rate would still be warming up at the end; lower it, or set it to \"auto\" "
                f"(train.warmup_fraction of the run, now {cfg.train.warmup_fraction})"]
    if scheduler_problems(ds, source):
        return []
    return _scheduler_build_problems(resolved, source)


# Config keys that fix a model's tensor shapes: a checkpoint only loads into a student
# that agrees on all of them.
SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "dim", "num_hidden_layers", "n_layers",
              "num_attention_heads", "n_heads", "intermediate_size", "hidden_dim", "max_position_embeddings",
              "type_vocab_size", "n_layer", "n_embd", "n_head", "n_positions", "num_key_value_heads")


def resume_problems(cfg: RunConfig, student_config: dict | None = None) -> list[str]:
    """The checkpoint a start would resume from: complete (when named explicitly), allowed
    (``resume=never``) and written for this student (else DeepSpeed fails to load it)."""
    from ds_distil import checkpoint

    own = Path(cfg.output_dir) / "checkpoints" if _exists(cfg.output_dir) and Path(cfg.output_dir).is_dir() else None
    if cfg.resume == "never":
        if own is not None and checkpoint.complete_tags(own):
            return [f"resume: \"never\", but {own} holds checkpoints; choose another output_dir or set resume=auto"]
        return []
    if cfg.resume == "auto":
        if own is None:
            return []
        root, tag, key = own, checkpoint.latest_complete(own, warn=lambda _: None), "output_dir"
        if tag is None:
            return []
    else:
        if not _exists(cfg.resume):
            return []  # reported by validate
        root, tag = checkpoint.resolve_resume(cfg.resume, warn=lambda _: None)
        key = "resume"
        if tag is None:
            return [f"resume: {cfg.resume} holds no complete checkpoint; name a checkpoint directory or tag, "
                    "or use \"auto\""]
        try:
            checkpoint.read_state(root, tag)
        except UserError as err:
            return [f"resume: {p}" for p in err.problems]
    return _other_student_problems(root, tag, cfg, student_config, key)


def _other_student_problems(root: Path, tag: str, cfg: RunConfig, student: dict | None, key: str) -> list[str]:
    """A checkpoint whose student (``student_hf/config.json``) has other shapes than ``cfg.student``."""
    from ds_distil import checkpoint

    saved_file = Path(root) / checkpoint.STUDENT_HF / "config.json"
    if student is None or not saved_file.is_file():
        return []
    try:
        saved = json.loads(saved_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return []
    if not isinstance(saved, dict):
        return []
    differ = [k for k in SHAPE_KEYS if saved.get(k) != student.get(k)]
    if not differ:
        return []
    what = ", ".join(f"{k} {json.dumps(saved.get(k))} there, {json.dumps(student.get(k))} here" for k in differ[:3])
    where = Path(root) / tag
    if key == "output_dir":
        return [f"output_dir: {cfg.output_dir} holds checkpoints of another student ({where}: {what}), which "
                f"student {cfg.student} cannot resume from: choose another output_dir for this student (the "
                "checkpoints there are intact)"]
    return [f"resume: {where} is a checkpoint of another student ({what}) than {cfg.student}: name a checkpoint "
            "of this student, or resume=auto with another output_dir"]
