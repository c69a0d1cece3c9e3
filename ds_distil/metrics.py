"""What a run reports: one console line per log interval, TensorBoard, and metrics.jsonl.

TensorBoard goes through DeepSpeed's monitor (the ``tensorboard`` block of the DeepSpeed
JSON, pointed at the run's output directory by the trainer); DeepSpeed 0.19 no longer
logs the training loss itself, so every value here is written explicitly. metrics.jsonl
holds the same points for scripts and tests.

Also the model-FLOP accounting shared by the trainer's log and ``ds-distil bench``: FLOPs
per token of the teacher's forward and the student's forward + backward, counted apart,
and the device peak they are compared with (``MFUMeter``, ``mfu_meter``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
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
               ("loss_clm", "clm", ".4f"), ("loss_cos", "cos", ".4f"), ("loss_mse", "mse", ".4f"), ("loss_task", "task", ".4f"),
               ("accuracy", "acc", ".1%"), ("lr", "lr", ".2e"), ("grad_norm", "gnorm", ".3f"),
               ("tokens_per_s", "tok/s", ",.0f"), ("mfu", "MFU", ".1%"), ("teacher_share", "teacher", ".0%"),
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


# ---------------------------------------------------------------------- model FLOPs and MFU
#
# Model FLOPs count the matmuls a formulation *needs* (the convention of the PaLM paper's
# MFU): the encoder over each sequence's real tokens, attention included, and the MLM head
# at the rows a loss uses; a backward pass is twice its forward. Padding, logits no loss
# reads and recomputation are not counted, so MFU compares implementations fairly.
# Embedding look-ups, LayerNorms, softmax and the optimizer are left out: they are a few
# percent of BERT-sized models' FLOPs.


def encoder_flops(hidden: int, ffn: int, layers: int, lengths, kv_hidden: int | None = None,
                  mlp_matrices: int = 2) -> float:
    """Forward matmul FLOPs of ``layers`` transformer layers over sequences of the given real lengths.

    ``kv_hidden``: the width of K and V (smaller than ``hidden`` under grouped-query
    attention); ``mlp_matrices``: 2 for a plain FFN, 3 for a gated one (SwiGLU, GeGLU).
    """
    kv = hidden if kv_hidden is None else kv_hidden
    per_token = 4 * hidden * hidden + 4 * hidden * kv + 2 * mlp_matrices * hidden * ffn  # Q, O; K, V; the FFN
    return float(sum(layers * (n * per_token + 4 * n * n * hidden) for n in lengths))  # + QK^T and AV


def head_flops(hidden: int, vocab: int, rows: float, transform: bool = True) -> float:
    """Forward matmul FLOPs of the LM head at ``rows`` rows: the vocabulary projection, after
    a dense transform in the masked-LM heads (BERT's; GPT-2 and Llama have none)."""
    return float(rows * ((2 * hidden * hidden if transform else 0) + 2 * hidden * vocab))


# model_type values whose FFN is gated (three matrices' worth of FLOPs) and whose head is
# the vocabulary projection alone; both are next-token (causal) models but ModernBERT.
GATED_FFN = ("llama", "mistral", "qwen2", "qwen3", "modernbert")
CAUSAL = ("gpt2", "llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelShape:
    """The sizes model FLOPs depend on."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int
    kv_hidden: int | None = None  # K/V width under grouped-query attention (None: = hidden)
    mlp_matrices: int = 2  # 3 for a gated FFN
    head_transform: bool = True  # a dense layer before the vocabulary projection
    causal: bool = False  # predicts the next token at every position

    @classmethod
    def of(cls, config) -> "ModelShape":
        """From a model config (a transformers config object or its dict): BERT, RoBERTa,
        DistilBERT, ModernBERT, GPT-2 and Llama-style names."""
        def get(key):
            return config.get(key) if isinstance(config, dict) else getattr(config, key, None)

        def first(*keys, default=None):
            for key in keys:  # BERT names first, then DistilBERT's, then GPT-2's
                if get(key) is not None:
                    return int(get(key))
            if default is not None:
                return default
            raise ValueError(f"model config has none of {', '.join(keys)}")

        hidden = first("hidden_size", "dim", "n_embd")
        model_type = get("model_type") or ""
        kv_heads, heads = get("num_key_value_heads"), first("num_attention_heads", "n_heads", "n_head", default=1)
        head_dim = get("head_dim") or hidden // heads
        return cls(layers=first("num_hidden_layers", "n_layers", "n_layer"), hidden=hidden,
                   intermediate=first("intermediate_size", "hidden_dim", "n_inner", default=4 * hidden),
                   vocab=first("vocab_size"), kv_hidden=int(kv_heads * head_dim) if kv_heads else None,
                   mlp_matrices=3 if model_type in GATED_FFN else 2,
                   head_transform=model_type not in CAUSAL, causal=model_type in CAUSAL)


def forward_flops_per_token(shape: ModelShape, seq_len: float, head_fraction: float) -> float:
    """Forward model FLOPs per real token of one model.

    ``seq_len``: the length attention runs over (its cost per token grows with it; see
    :func:`attention_length`); ``head_fraction``: the share of real tokens the LM head
    projects to the vocabulary (1.0 when L_ce covers every real token or the model predicts
    every next token, about the MLM probability when only the masked positions need
    logits, 0 for no head).
    """
    encoder = encoder_flops(shape.hidden, shape.intermediate, shape.layers, [seq_len], shape.kv_hidden,
                            shape.mlp_matrices) / seq_len
    return encoder + head_flops(shape.hidden, shape.vocab, head_fraction, shape.head_transform)


def distill_flops_per_token(student: ModelShape, teacher: ModelShape | None, seq_len: float, head_fraction: float,
                            teacher_head: bool = True) -> dict[str, float]:
    """Model FLOPs per real token of one distillation step, counted apart: ``teacher`` (its
    forward; 0 without a teacher) and ``student`` (forward + backward = 3 x forward).

    Both heads project the same rows (``trainer.DistillStep`` selects them once);
    ``teacher_head`` is False when no loss needs the teacher's logits (alpha_ce = 0).
    """
    teacher_flops = 0.0
    if teacher is not None:
        teacher_flops = forward_flops_per_token(teacher, seq_len, head_fraction if teacher_head else 0.0)
    return {"teacher": teacher_flops, "student": 3.0 * forward_flops_per_token(student, seq_len, head_fraction)}


def attention_length(meta: dict) -> float:
    """The sequence length that makes per-token attention FLOPs exact for prepared data.

    A sequence of n tokens costs n^2 in attention, so the per-token cost is set by
    E[n^2] / E[n] over the training sequences (from meta.json's length histogram), which
    is longer than the mean length. Falls back on the mean, then on the maximum length.
    """
    histogram = meta.get("length_histogram") or {}
    lengths, counts = histogram.get("lengths"), histogram.get("counts")
    if lengths and counts and len(lengths) == len(counts) and sum(counts) > 0:
        return sum(c * n * n for n, c in zip(lengths, counts)) / sum(c * n for n, c in zip(lengths, counts))
    train = (meta.get("splits") or {}).get("train") or {}
    if train.get("sequences"):
        return train["tokens"] / train["sequences"]
    return float(meta["max_seq_len"])


# Dense (no sparsity) peak TFLOP/s of GPU models from their vendors' data sheets, per
# precision: bf16/fp16 on tensor cores, fp32 without TF32 (torch's default for matmuls).
# Matched against torch.cuda.get_device_name() in order, most specific name first.
KNOWN_PEAKS = (
    (r"\bH100\b.*\bPCIe\b", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    (r"\bH100\b.*\bNVL\b", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    (r"\bH100\b", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),  # SXM: "NVIDIA H100 80GB HBM3"
    (r"\bH200\b.*\bNVL\b", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    (r"\bG?H200\b", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),  # H200 SXM and GH200
    (r"\bA100\b", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    (r"\bL40S\b", {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6}),
    (r"\bL4\b", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
    (r"\bA10\b", {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2}),  # not A100, not A10G
    (r"\bV100\b.*\bPCIE\b", {"fp16": 112.0, "fp32": 14.0}),  # no bf16 on Volta
    (r"\bV100\b", {"fp16": 125.0, "fp32": 15.7}),
)


def known_peak_tflops(device_name: str, precision: str) -> float | None:
    """The data-sheet dense peak of a GPU model at ``precision`` (bf16, fp16, fp32), or None."""
    import re

    for pattern, peaks in KNOWN_PEAKS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return peaks.get(precision)
    return None


PRECISION_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def matmul_tflops_by_size(dtype, device: torch.device, sizes=(512, 1024, 2048), repeats: int = 3) -> dict[int, float]:
    """Best achieved TFLOP/s of square GEMMs in ``dtype``, per size, over ``repeats`` timings.

    Every timing runs the same FLOPs (smaller sizes loop more), enough for the clock and,
    on CUDA, for the launch overhead not to matter. The best of several timings is kept:
    interference only ever slows a timing down.
    """
    largest = max(sizes)
    best = {}
    # A private generator: the trainer measures after restoring a checkpoint's RNG state,
    # and drawing from the global one would shift every later dropout mask.
    generator = torch.Generator(device=device).manual_seed(0)
    for size in sizes:
        a = torch.randn(size, size, device=device, generator=generator).to(dtype)
        b = torch.randn(size, size, device=device, generator=generator).to(dtype)
        loops = (largest // size) ** 3 * (8 if device.type == "cuda" else 1)
        a @ b  # warm-up: library dispatch, packing buffers
        best[size] = 0.0
        for _ in range(repeats):
            _synchronize(device)
            start = time.perf_counter()
            for _ in range(loops):
                a @ b
            _synchronize(device)
            best[size] = max(best[size], loops * 2 * size**3 / (time.perf_counter() - start) / 1e12)
    return best


def matmul_peak_tflops(dtype, device: torch.device, sizes=(512, 1024, 2048), repeats: int = 3) -> float:
    """The machine's matmul peak in ``dtype``: the best over several sizes and repeats."""
    return max(matmul_tflops_by_size(dtype, device, sizes, repeats).values())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_peak_override(value) -> None:
    """``train.peak_tflops`` must be a finite number > 0 or None (the config's one-line error otherwise)."""
    import math

    from ds_distil.config import PEAK_TFLOPS_PROBLEM
    from ds_distil.errors import UserError

    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UserError(PEAK_TFLOPS_PROBLEM.format(value=value))


def device_peak_tflops(precision: str, device: torch.device, override: float | None = None) -> tuple[float, str]:
    """(peak TFLOP/s of one device at ``precision``, where the number comes from).

    In order: the run config's ``train.peak_tflops``; on CUDA, the data-sheet peak of the
    GPU model (:data:`KNOWN_PEAKS`); otherwise measured here, once (CPUs, whose peak
    depends on cores, threads and vector units, and GPUs missing from the table). The CPU
    measurement is short (sizes up to 1024) so that every run can afford it at start.
    """
    check_peak_override(override)
    if override is not None:
        return float(override), "train.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        known = known_peak_tflops(name, precision)
        if known is not None:
            return known, f"data sheet of {name}"
    dtype = getattr(torch, PRECISION_DTYPES[precision])
    sizes = (2048, 4096, 8192) if device.type == "cuda" else (256, 512, 1024)
    return matmul_peak_tflops(dtype, device, sizes), f"measured ({precision} matmul on {device.type})"


class MFUMeter:
    """Model FLOP/s and MFU of training, per device, for the log lines and TensorBoard.

    Built once at start (the peak may be measured then); calling it on a log step costs
    a few multiplications, no device work.
    """

    def __init__(self, flops_per_token: dict[str, float], peak_tflops: float, peak_source: str):
        self.flops_per_token = flops_per_token
        self.peak_tflops, self.peak_source = peak_tflops, peak_source

    def __call__(self, tokens: float, seconds: float, world_size: int) -> dict[str, float]:
        """Extra log values for ``tokens`` real tokens (all ranks together) in ``seconds``.

        ``tflops_teacher`` and ``tflops_student`` are per device and over the whole wall
        time, so they add up: their sum over the peak is ``mfu``.
        """
        tokens_per_s = tokens / max(seconds, 1e-9) / world_size  # per device
        teacher = self.flops_per_token["teacher"] * tokens_per_s / 1e12
        student = self.flops_per_token["student"] * tokens_per_s / 1e12
        return {"tflops_teacher": teacher, "tflops_student": student, "mfu": (teacher + student) / self.peak_tflops}

    def describe(self) -> str:
        f = self.flops_per_token
        return (f"MFU against {self.peak_tflops:.3g} TFLOP/s per device ({self.peak_source}); model FLOPs per "
                f"token: teacher forward {f['teacher'] / 1e6:,.1f} M, student forward+backward "
                f"{f['student'] / 1e6:,.1f} M")


def mfu_meter(cfg, student_config, teacher_config, data_meta: dict, precision: str, device: torch.device) -> MFUMeter:
    """The trainer's :class:`MFUMeter` from the run config, the models' configs and meta.json.

    The heads project every real token when L_ce covers all of them or the student is a
    causal LM (a target at every position), else only the MLM positions (about
    ``masking.mlm_probability`` of the tokens), as ``DistillStep`` does.
    """
    has_teacher = teacher_config is not None
    # The teacher's logits are computed for L_ce and L_mse (trainer.needed_terms).
    need_ce = has_teacher and (cfg.loss.alpha_ce > 0 or getattr(cfg.loss, "alpha_mse", 0) > 0)
    student = ModelShape.of(student_config)
    every_token = student.causal or (need_ce and cfg.loss.ce_positions == "all")
    head_fraction = 1.0 if every_token else cfg.masking.mlm_probability
    per_token = distill_flops_per_token(student, ModelShape.of(teacher_config) if has_teacher else None,
                                        attention_length(data_meta), head_fraction, teacher_head=need_ce)
    peak, source = device_peak_tflops(precision, device, cfg.train.peak_tflops)
    return MFUMeter(per_token, peak, source)
