"""DeepSpeed JSON configs: load, check, derive the batch arithmetic, fill in run values.

A DeepSpeed config is the user's file, so every problem is reported as a
:class:`~ds_distil.errors.UserError` that names the file and the key. Checks run in two
layers: cheap ones here without importing DeepSpeed (JSON syntax, keys that DeepSpeed
0.19.x removed, likely typos, batch sizes, precision), and
:func:`validate_with_deepspeed`, which runs DeepSpeed's own config class (pydantic
models for every sub-block) at a given data-parallel world size.

The shipped configs (``ds_configs/``) state ``train_batch_size`` and
``train_micro_batch_size_per_gpu`` and let the world size decide the gradient
accumulation, so one file serves 1 to 64 nodes. Their scheduler leaves
``warmup_num_steps`` / ``total_num_steps`` as ``"auto"``: :func:`resolve_run_values`
fills them from the run length, and points the TensorBoard monitor at the run's
output directory.
"""

from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path

from ds_distil.errors import UserError

# Top-level blocks DeepSpeed 0.19.x rejects, with what to use instead.
REMOVED_TOP_LEVEL_KEYS = {
    "compression_training": "the compression library is gone since 0.19.7 (build the student with "
                            "`ds-distil init-student` instead of layer_reduction)",
    "amp": "use the 'fp16' or 'bf16' block",
    "sparse_gradients": "remove it (embedding gradients are reduced dense)",
    "elasticity": "set train_batch_size and train_micro_batch_size_per_gpu directly",
    "progressive_layer_drop": "remove it",
    "curriculum_learning": "remove it (or use data_efficiency.data_sampling.curriculum_learning)",
    "nebula": "remove it (checkpoints are saved with torch.save)",
    "quantize_training": "remove it",
    "eigenvalue": "remove it",
    "sparse_attention": "remove it",
    "graph_harvesting": "remove it",
}

# Keys DeepSpeed knows at top level (a subset). DeepSpeed ignores unknown top-level keys
# silently, so a near miss of one of these ("gradient_cliping") would quietly fall back
# to a default; we reject near misses and let other unknown keys through.
KNOWN_TOP_LEVEL_KEYS = (
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "steps_per_print", "wall_clock_breakdown", "memory_breakdown", "dump_state",
    "optimizer", "scheduler", "gradient_clipping", "prescale_gradients",
    "gradient_predivide_factor", "communication_data_type", "fp16", "bf16", "bfloat16",
    "torch_autocast", "data_types", "zero_optimization", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "activation_checkpointing", "flops_profiler", "checkpoint",
    "tensorboard", "wandb", "csv_monitor", "comet", "aio", "dataloader_drop_last",
)

# Scheduler parameters a shipped config leaves to the run length.
AUTO_SCHEDULER_KEYS = ("warmup_num_steps", "total_num_steps")

CPU_CONFIG_HINT = "ds_configs/cpu_bf16.json (or a bf16 config)"


def load_ds_config(path: str | Path) -> dict:
    """Read a DeepSpeed JSON config and run the checks that need no DeepSpeed import.

    Raises UserError for a missing file, invalid JSON (with line and column), duplicate
    keys, keys removed in DeepSpeed 0.19.x and likely misspellings of known keys.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: DeepSpeed config not found: pass an existing file "
                        "(the shipped ones are in ds_configs/)") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read the DeepSpeed config: {err.strerror}") from None
    try:
        cfg = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}") from None
    except _DuplicateKey as dup:
        raise UserError(f"{path}: key '{dup.key}' appears twice in one block: keep one") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: a DeepSpeed config must be a JSON object {{...}}, "
                        f"not {type(cfg).__name__}")
    problems = [f"{path}: {p}" for p in _static_problems(cfg)]
    if problems:
        raise UserError(*problems)
    return cfg


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """json object hook: DeepSpeed refuses duplicate keys too, so fail here first."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _static_problems(cfg: dict) -> list[str]:
    """Problems found without DeepSpeed: removed keys, misplaced clipping, near-miss keys."""
    problems = []
    for key, advice in REMOVED_TOP_LEVEL_KEYS.items():
        if key in cfg:
            problems.append(f"'{key}' was removed in DeepSpeed 0.19.x and is rejected: {advice}")
    params = (cfg.get("optimizer") or {}).get("params") or {}
    if isinstance(params, dict) and "max_grad_norm" in params:
        problems.append("optimizer.params.max_grad_norm is rejected by DeepSpeed 0.19.x: "
                        "remove it and set top-level 'gradient_clipping' instead")
    for key in cfg:
        if key in KNOWN_TOP_LEVEL_KEYS or key in REMOVED_TOP_LEVEL_KEYS:
            continue
        close = difflib.get_close_matches(key, KNOWN_TOP_LEVEL_KEYS, n=1, cutoff=0.85)
        if close:
            problems.append(f"unknown key '{key}' (DeepSpeed would ignore it): did you mean '{close[0]}'?")
    return problems


def _positive_int(cfg: dict, key: str, source: str) -> int | None:
    value = cfg.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{source}: {key}={value!r} must be a positive integer")
    return value


def batch_arithmetic(cfg: dict, world_size: int, source: str | Path = "DeepSpeed config") -> dict:
    """Micro-batch, accumulation steps and global batch at ``world_size`` data-parallel ranks.

    Follows DeepSpeed's rules (any two of train_batch_size, train_micro_batch_size_per_gpu
    and gradient_accumulation_steps determine the third) but refuses the cases DeepSpeed
    would round down or assert on, naming the key to change.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    source = str(source)
    train = _positive_int(cfg, "train_batch_size", source)
    micro = _positive_int(cfg, "train_micro_batch_size_per_gpu", source)
    accum = _positive_int(cfg, "gradient_accumulation_steps", source)

    if train is None and micro is None:
        raise UserError(f"{source}: set train_batch_size (the global batch in sequences) and "
                        "train_micro_batch_size_per_gpu")
    if train is not None and micro is None:
        # DeepSpeed: no accumulation unless it is given.
        accum = accum or 1
        micro = _split(train, accum, world_size, source, "gradient_accumulation_steps")
    elif train is None:
        accum = accum or 1
        train = micro * accum * world_size
    elif accum is None:
        accum = _split(train, micro, world_size, source, "train_micro_batch_size_per_gpu")
    elif train != micro * accum * world_size:
        raise UserError(f"{source}: train_batch_size={train} != train_micro_batch_size_per_gpu ({micro}) x "
                        f"gradient_accumulation_steps ({accum}) x world size ({world_size}) = "
                        f"{micro * accum * world_size}: remove gradient_accumulation_steps and let "
                        "DeepSpeed derive it from the world size")
    return {"micro_batch": micro, "accumulation_steps": accum, "global_batch": train,
            "world_size": world_size}


def _split(train: int, per_rank: int, world_size: int, source: str, key: str) -> int:
    """train_batch_size / (per_rank x world_size), refusing remainders DeepSpeed would drop."""
    if train % per_rank:
        raise UserError(f"{source}: train_batch_size={train} is not a multiple of {key}={per_rank}: "
                        "change one of them")
    slots = train // per_rank
    if slots % world_size:
        raise UserError(f"{source}: train_batch_size={train} does not split over {world_size} ranks "
                        f"with {key}={per_rank} ({slots} is not a multiple of {world_size}): run on a "
                        f"number of ranks that divides {slots}, or change {key}")
    return slots // world_size


def precision(cfg: dict, source: str | Path = "DeepSpeed config") -> str:
    """``"fp16"``, ``"bf16"`` or ``"fp32"``, from the fp16 / bf16 (alias bfloat16) blocks."""
    enabled = []
    for name, block_keys in (("fp16", ("fp16",)), ("bf16", ("bf16", "bfloat16"))):
        for key in block_keys:
            block = cfg.get(key)
            if block is None:
                continue
            flag = block.get("enabled", False) if isinstance(block, dict) else None
            if not isinstance(flag, bool):
                raise UserError(f"{source}: {key}.enabled must be true or false, got {flag!r}")
            if flag:
                enabled.append(name)
    if len(enabled) > 1:
        raise UserError(f"{source}: fp16.enabled and bf16.enabled are both true: enable one")
    return enabled[0] if enabled else "fp32"


def check_precision_supported(cfg: dict, source: str | Path = "DeepSpeed config",
                              accelerator=None) -> str:
    """Refuse a precision the accelerator cannot train in; returns the precision.

    fp16 needs a GPU: DeepSpeed's CPU accelerator either rejects it ("Type fp16 is not
    supported on your device") or, on CPUs with fp16 kernels, would run a loss-scaled
    fp16 path nobody tests, so ds-distil refuses fp16 on the CPU accelerator outright.
    """
    if accelerator is None:
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator()
    prec = precision(cfg, source)
    device = accelerator.device_name()
    if prec == "fp16" and (device == "cpu" or not accelerator.is_fp16_supported()):
        raise UserError(f"{source}: fp16 is not supported on this device ({device}): "
                        f"use {CPU_CONFIG_HINT}")
    if prec == "bf16" and not accelerator.is_bf16_supported():
        raise UserError(f"{source}: bf16 is not supported on this device ({device}, e.g. a V100): "
                        "use ds_configs/fp16_zero1.json or ds_configs/fp16_zero2.json")
    return prec


# Pydantic model of a DeepSpeed sub-block -> the config key it parses, so that an error
# located at ("overlap_comm",) can be reported as zero_optimization.overlap_comm.
_MODEL_KEYS = {
    "DeepSpeedZeroConfig": "zero_optimization",
    "DeepSpeedZeroOffloadParamConfig": "zero_optimization.offload_param",
    "DeepSpeedZeroOffloadOptimizerConfig": "zero_optimization.offload_optimizer",
    "DeepSpeedFP16Config": "fp16",
    "DeepSpeedBF16Config": "bf16",
    "DeepSpeedMonitorConfig": "",
    "TensorBoardConfig": "tensorboard",
    "WandbConfig": "wandb",
    "CSVConfig": "csv_monitor",
    "CometConfig": "comet",
    "CommsConfig": "comms_logger",
    "DeepSpeedFlopsProfilerConfig": "flops_profiler",
}


def validate_with_deepspeed(cfg: dict, world_size: int, source: str | Path = "DeepSpeed config"):
    """Parse ``cfg`` with DeepSpeed's own ``DeepSpeedConfig`` as if ``world_size`` ranks ran it.

    Returns the DeepSpeedConfig. Its pydantic errors, removed-key errors and batch
    assertions become UserError lines that name the file and the key. Needs no process
    group (see :func:`_config_at_world_size`).
    """
    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfigError

    source = str(source)
    batch_arithmetic(cfg, world_size, source)  # clearer messages than DeepSpeed's assert
    try:
        return _config_at_world_size(copy.deepcopy(cfg), world_size)
    except pydantic.ValidationError as err:
        prefix = _MODEL_KEYS.get(err.title, "")
        lines = []
        for e in err.errors():
            key = ".".join(str(p) for p in (([prefix] if prefix else []) + list(e["loc"])))
            fix = ("DeepSpeed rejects unknown keys: remove it or fix its spelling"
                   if e["type"] == "extra_forbidden" else f"got {e.get('input')!r}")
            lines.append(f"{source}: {key or err.title}: {e['msg']} ({fix})")
        raise UserError(*lines) from None
    except (DeepSpeedConfigError, AssertionError, ValueError) as err:
        raise UserError(f"{source}: DeepSpeed rejects this config: {err}") from None


def _config_at_world_size(cfg: dict, world_size: int):
    """DeepSpeedConfig evaluated at a given data-parallel world size.

    DeepSpeedConfig takes its world size from the initialised process group; without
    one, ``dist.get_rank()`` fails before the ``mpu`` argument is even consulted and
    the world size falls back to 1. A subclass whose ``world_size`` attribute is a
    read-only property gives DeepSpeed's unmodified constructor the size we ask for.
    """
    from deepspeed.runtime.config import DeepSpeedConfig

    class _AtWorldSize(DeepSpeedConfig):
        world_size = property(lambda self: self._forced_world_size, lambda self, value: None)

        def __init__(self, config: dict, size: int):
            self._forced_world_size = size
            super().__init__(config)

    return _AtWorldSize(cfg, world_size)


def resolve_run_values(cfg: dict, *, total_steps: int, output_dir: str | Path, job_name: str,
                       warmup_fraction: float = 0.05, source: str | Path = "DeepSpeed config") -> dict:
    """A copy of ``cfg`` with the values that depend on the run filled in.

    - scheduler ``total_num_steps`` / ``warmup_num_steps`` left as ``"auto"`` become the
      run's optimizer steps and ``warmup_fraction`` of them (at least 1); explicit
      numbers are kept;
    - the TensorBoard monitor writes to ``output_dir/tensorboard/job_name``.
    """
    if total_steps < 1:
        raise UserError(f"the run has {total_steps} optimizer steps: it needs at least one "
                        "(more data, more epochs or a smaller train_batch_size)")
    out = copy.deepcopy(cfg)
    params = (out.get("scheduler") or {}).get("params")
    if isinstance(params, dict):
        auto = {"total_num_steps": total_steps,
                "warmup_num_steps": max(1, round(warmup_fraction * total_steps))}
        for key in AUTO_SCHEDULER_KEYS:
            if params.get(key, "auto") == "auto":
                params[key] = auto[key]
        if "total_num_steps" in params and params["warmup_num_steps"] > params["total_num_steps"]:
            raise UserError(f"{source}: scheduler.params.warmup_num_steps={params['warmup_num_steps']} "
                            f"exceeds total_num_steps={params['total_num_steps']}: lower it or set \"auto\"")
    if "tensorboard" in out:
        out["tensorboard"] = {**out["tensorboard"], "output_path": str(Path(output_dir) / "tensorboard"),
                              "job_name": job_name}
    return out


def with_batch_and_lr(cfg: dict, *, global_batch: int | None = None, micro_batch: int | None = None,
                      lr: float | None = None) -> dict:
    """A copy of ``cfg`` with another global batch, micro-batch and/or peak learning rate.

    The accumulation steps are left to DeepSpeed (derived from the two batch sizes and the
    world size); the learning rate goes to the optimizer and to the scheduler's peak.
    """
    out = copy.deepcopy(cfg)
    if global_batch is not None:
        out["train_batch_size"] = int(global_batch)
        out.pop("gradient_accumulation_steps", None)
    if micro_batch is not None:
        out["train_micro_batch_size_per_gpu"] = int(micro_batch)
        out.pop("gradient_accumulation_steps", None)
    if lr is not None:
        out.setdefault("optimizer", {}).setdefault("params", {})["lr"] = float(lr)
        params = (out.get("scheduler") or {}).get("params")
        if isinstance(params, dict):
            for key in ("warmup_max_lr", "max_lr"):  # WarmupLR/WarmupDecayLR, OneCycle-style
                if key in params:
                    params[key] = float(lr)
    return out
