"""Helpers that write configs and run ``ds-distil train`` for real, in child processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import child_env


def write_ds_config(path: Path, *, global_batch: int = 8, micro_batch: int = 8, precision: str = "fp32",
                    zero_stage: int = 0, lr: float = 1e-3, total_steps: int | str = "auto",
                    warmup_steps: int | str = "auto", tensorboard: bool = True) -> Path:
    cfg = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.98], "eps": 1e-6,
                                                   "weight_decay": 0.0, "torch_adam": True}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": lr,
                                                          "warmup_num_steps": warmup_steps,
                                                          "total_num_steps": total_steps,
                                                          "warmup_type": "linear"}},
        "gradient_clipping": 5.0,
        "zero_optimization": {"stage": zero_stage},
        "steps_per_print": 100000,
    }
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    if tensorboard:
        cfg["tensorboard"] = {"enabled": True, "output_path": "ignored", "job_name": "ignored"}
    path.write_text(json.dumps(cfg, indent=1))
    return path


def write_run_config(path: Path, *, student, data, ds_config, output_dir, teacher=None, steps: int = 10,
                     log_interval: int = 1, checkpoint_interval: int = 0, **sections) -> Path:
    cfg = {"student": str(student), "data": str(data), "deepspeed_config": str(ds_config),
           "output_dir": str(output_dir), "teacher": str(teacher) if teacher else None,
           "train": {"max_steps": steps, "log_interval": log_interval, "checkpoint_interval": checkpoint_interval,
                     "num_workers": 0, "progress_bar": False, "eval_max_batches": 4, "seed": 3}}
    if teacher is None:
        cfg["loss"] = {"alpha_ce": 0.0, "alpha_cos": 0.0, "alpha_mlm": 1.0}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(json.dumps(cfg, indent=1))
    return path


def train(config: Path, *overrides: str, ranks: int = 1, timeout: float = 300, port: int | None = None,
          check: bool = True) -> subprocess.CompletedProcess:
    """Run ``ds-distil train`` as one process, or under the deepspeed launcher with ``ranks``."""
    if ranks == 1:
        cmd = [sys.executable, "-m", "ds_distil", "train", "--config", str(config), *overrides]
    else:
        from ds_distil.distributed import free_port

        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
               "--master_addr", "127.0.0.1", "--master_port", str(port or free_port()),
               "--module", "ds_distil", "train", "--config", str(config), *overrides]
    result = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"training failed (exit {result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result


def metrics(output_dir: Path, group: str = "Train") -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["group"] == group]


def losses_by_step(output_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(output_dir)}
