"""What a run reports: one console line per log interval, TensorBoard, and metrics.jsonl.

TensorBoard goes through DeepSpeed's monitor (the ``tensorboard`` block of the DeepSpeed
JSON, pointed at the run's output directory by the trainer); DeepSpeed 0.19 no longer
logs the training loss itself, so every value here is written explicitly. metrics.jsonl
holds the same points for scripts and tests.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


class Stopwatch:
    """Accumulates the time of a code region without a host sync.

    On CUDA it records events and reads them only when asked (at log steps); on CPU
    the work is synchronous, so wall-clock time is exact.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._pairs: list = []
        self._seconds = 0.0
        self._start = None

    def __enter__(self):
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._start = start
        else:
            self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pairs.append((self._start, end))
        else:
            self._seconds += time.perf_counter() - self._start

    def pop_seconds(self) -> float:
        """Seconds accumulated since the last call (synchronises on CUDA: log steps only)."""
        if self.cuda and self._pairs:
            self._pairs[-1][1].synchronize()
            self._seconds += sum(s.elapsed_time(e) for s, e in self._pairs) / 1000.0
            self._pairs.clear()
        seconds, self._seconds = self._seconds, 0.0
        return seconds


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: device memory on CUDA, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsWriter:
    """Rank 0's sink: console line, TensorBoard (DeepSpeed monitor) and metrics.jsonl."""

    # Console columns: (key, label, format)
    CONSOLE = (("loss", "loss", ".4f"), ("loss_ce", "ce", ".4f"), ("loss_mlm", "mlm", ".4f"),
               ("loss_cos", "cos", ".4f"), ("loss_task", "task", ".4f"),
               ("accuracy", "acc", ".1%"), ("lr", "lr", ".2e"), ("grad_norm", "gnorm", ".3f"),
               ("tokens_per_s", "tok/s", ",.0f"), ("teacher_share", "teacher", ".0%"),
               ("peak_mem_gib", "mem GiB", ".2f"))

    def __init__(self, output_dir: Path, monitor, enabled: bool, echo=print):
        self.enabled = enabled
        self.monitor = monitor
        self.echo = echo
        self._file = open(Path(output_dir) / "metrics.jsonl", "a") if enabled else None

    def write(self, group: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"group": group, "step": step, **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.monitor is not None and getattr(self.monitor, "enabled", False):
            self.monitor.write_events([(f"{group}/{k}", float(v), step) for k, v in values.items()
                                       if isinstance(v, (int, float))])
        if group == "Train":
            parts = [f"step {step}"]
            parts += [f"{label} {values[k]:{fmt}}" for k, label, fmt in self.CONSOLE if k in values]
            if values.get("skipped_steps"):
                parts.append(f"skipped {values['skipped_steps']:.0f}")
            self.echo(" | ".join(parts))
        else:
            self.echo(f"{group.lower()} @ step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
