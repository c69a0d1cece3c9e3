"""``ds-distil bench``: the training step against the reference formulation, same models, same batches.

Two formulations of one DistilBERT distillation step run in one process, on the same
weights and the same synthetic batches:

- **ds-distil**: exactly what ``ds-distil train`` runs, ``trainer.DistillStep`` around a
  real DeepSpeed engine (teacher forward in the compute precision under inference mode,
  student forward + loss sums + backward + ``engine.step()``);
- **reference**: the published DistilBERT code written plainly, fp32, both models
  projecting every position to the full vocabulary, L_ce over all real tokens, a torch
  AdamW step (``ReferenceStep`` and ``reference_losses`` below; the tests compare the fast
  losses against them).

For each it reports tokens/s (real tokens), step time, the teacher's and the student's
share of it, achieved TFLOP/s (teacher forward and student forward+backward counted
separately) and peak memory; then the speed ratio and the model-FLOP utilisation (MFU)
against the bf16 and fp32 matmul peaks measured in the same run. Optional sweeps: step
time against sequence length (in process) and peak memory against ZeRO stage (one child
process per stage, since peak memory is per process).

FLOPs are *model* FLOPs, the same count for both formulations: matmuls of the encoder
over each sequence's real tokens (attention included) and of the MLM head at the rows a
loss needs; a backward pass counts twice its forward. Work a formulation spends on
padding or on logits no loss uses is not counted, so the TFLOP/s ratio is the speed ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ds_distil.errors import UserError, require_output_path

FORMULATIONS = ("ds-distil", "reference")


@dataclass(frozen=True)
class Preset:
    """Teacher (BERT) shape, student depth and the default run size."""

    vocab_size: int
    hidden: int
    layers: int
    heads: int
    ffn: int
    student_layers: int
    seq_len: int
    micro_batch: int
    steps: int
    # Special token ids (bert-base-uncased's for the base preset): never drawn as tokens.
    pad_id: int = 0
    unk_id: int = 100
    cls_id: int = 101
    sep_id: int = 102
    mask_id: int = 103
    max_position: int = 512


PRESETS = {
    # BERT-base -> DistilBERT (6 layers); random weights are enough for speed.
    "base": Preset(vocab_size=30522, hidden=768, layers=12, heads=12, ffn=3072, student_layers=6,
                   seq_len=128, micro_batch=32, steps=3),
    # A few seconds on 2 CPU cores: the test suite runs it through the CLI.
    "small": Preset(vocab_size=1024, hidden=64, layers=4, heads=2, ffn=256, student_layers=2,
                    seq_len=64, micro_batch=8, steps=2, unk_id=1, cls_id=2, sep_id=3, mask_id=4),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="base",
                        help="base: BERT-base -> 6-layer DistilBERT; small: a tiny pair for tests (default base)")
    parser.add_argument("--seq-len", type=int, help="longest sequence (default: the preset's, 128 for base)")
    parser.add_argument("--micro-batch", type=int, help="sequences per step (default: the preset's)")
    parser.add_argument("--steps", type=int, help="timed steps per formulation (default: the preset's)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing (default 1)")
    parser.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=0,
                        help="ZeRO stage of ds-distil's engine (default 0: one rank has nothing to shard)")
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16",
                        help="ds-distil's compute precision (default bf16; fp16 needs a GPU)")
    parser.add_argument("--ce-positions", choices=("all", "mlm"), default="all",
                        help="where L_ce is computed, in both formulations (default all real tokens)")
    parser.add_argument("--only", choices=FORMULATIONS, help="measure one formulation only")
    parser.add_argument("--seq-lens", metavar="N,N,...",
                        help="also time ds-distil's step at these sequence lengths, e.g. 64,128,256,512 "
                             "(same tokens per step: micro-batch x seq-len held constant)")
    parser.add_argument("--zero-stages", metavar="S,S,...",
                        help="also measure ds-distil's peak memory at these ZeRO stages, e.g. 0,1,2,3 "
                             "(one child process per stage, single rank)")
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON to this file")


def run(args: argparse.Namespace) -> int:
    """Measure, print the table, write the JSON; returns the exit status."""
    settings = resolve_settings(args)
    if args.json is not None:
        require_output_path(args.json, "--json", "file")  # before the benchmark runs, not after
    if settings["precision"] == "fp16" and _device().type == "cpu":
        raise UserError("--precision fp16: DeepSpeed runs fp16 on GPUs only; use bf16 (the default) on CPUs")
    from ds_distil.distributed import setup_distributed, teardown_distributed

    info = setup_distributed()
    try:
        if info.world_size != 1:
            raise UserError(f"ds-distil bench runs in a single process, not {info.world_size} ranks: "
                            "start it with python/ds-distil, not a launcher")
        result = benchmark(settings)
    finally:
        teardown_distributed()
    if settings["seq_lens"] or settings["zero_stages"]:
        result.update(sweeps(settings))
    print(format_report(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def resolve_settings(args: argparse.Namespace) -> dict:
    """The run's settings from the preset and the flags, checked."""
    preset = PRESETS[args.preset]
    seq_len = preset.seq_len if args.seq_len is None else args.seq_len
    settings = {"preset": args.preset, "seq_len": seq_len,
                "micro_batch": preset.micro_batch if args.micro_batch is None else args.micro_batch,
                "steps": preset.steps if args.steps is None else args.steps, "warmup": args.warmup,
                "zero_stage": args.zero_stage,
                "precision": args.precision, "ce_positions": args.ce_positions,
                "formulations": [args.only] if args.only else list(FORMULATIONS),
                "seq_lens": _int_list(args.seq_lens, "--seq-lens"),
                "zero_stages": _int_list(args.zero_stages, "--zero-stages")}
    for name in ("micro_batch", "steps"):
        if settings[name] < 1:
            raise UserError(f"--{name.replace('_', '-')} {settings[name]}: must be >= 1")
    if settings["warmup"] < 0:
        raise UserError(f"--warmup {settings['warmup']}: must be >= 0")
    for n in [seq_len, *settings["seq_lens"]]:
        if not 16 <= n <= preset.max_position:
            raise UserError(f"sequence length {n}: must be in 16..{preset.max_position} (the models' positions)")
    bad = [s for s in settings["zero_stages"] if s not in (0, 1, 2, 3)]
    if bad:
        raise UserError(f"--zero-stages {args.zero_stages}: stages are 0, 1, 2 or 3")
    return settings


def _int_list(text: str | None, flag: str) -> list[int]:
    if not text:
        return []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated integers, e.g. 64,128,256")


# ---------------------------------------------------------------------- models and batches

def build_teacher(preset: Preset, seed: int = 0):
    """A BertForMaskedLM of the preset's shape, random weights (deterministic in ``seed``), fp32."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=preset.vocab_size, hidden_size=preset.hidden, num_hidden_layers=preset.layers,
                        num_attention_heads=preset.heads, intermediate_size=preset.ffn,
                        max_position_embeddings=preset.max_position, pad_token_id=preset.pad_id)
    return BertForMaskedLM(config)


def build_student(preset: Preset, seed: int = 1):
    """A DistilBertForMaskedLM: the teacher's width, ``student_layers`` layers, random weights, fp32."""
    import torch
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    torch.manual_seed(seed)
    config = DistilBertConfig(vocab_size=preset.vocab_size, dim=preset.hidden, n_layers=preset.student_layers,
                              n_heads=preset.heads, hidden_dim=preset.ffn, max_position_embeddings=preset.max_position,
                              pad_token_id=preset.pad_id)
    return DistilBertForMaskedLM(config)


def synthetic_batches(preset: Preset, seq_len: int, micro_batch: int, count: int, seed: int = 0) -> list[dict]:
    """``count`` masked micro-batches the way training builds them.

    Random non-special token ids in [CLS] ... [SEP] sequences of varied length
    (uniform in seq_len/4 .. seq_len), grouped by length by the trainer's sampler, masked by
    its collator (15% targets, 80/10/10, padding to a multiple of 8).
    """
    import numpy as np

    from ds_distil.batching import GlobalBatchSampler
    from ds_distil.masking import MaskingCollator

    rng = np.random.default_rng(seed)
    pool = max(count, 16) * micro_batch  # a larger pool than needed so length groups are tight
    lengths = rng.integers(max(8, seq_len // 4), seq_len + 1, size=pool)
    first = max(preset.pad_id, preset.unk_id, preset.cls_id, preset.sep_id, preset.mask_id) + 1
    sequences = [np.concatenate(([preset.cls_id], rng.integers(first, preset.vocab_size, size=n - 2),
                                 [preset.sep_id])) for n in lengths]
    sampler = GlobalBatchSampler(lengths, micro_batch, micro_batch, seed=seed)
    collator = MaskingCollator(preset.vocab_size, [preset.unk_id, preset.cls_id, preset.sep_id], preset.mask_id,
                               preset.pad_id, smoothing=None, seed=seed, pad_to_multiple_of=8)
    batches = []
    for _, micro_batches in sampler.iter_epoch(0):
        indices = micro_batches[0]
        batches.append(collator([{"input_ids": sequences[i]} for i in indices], indices, epoch=0))
        if len(batches) == count:
            break
    return batches


# ---------------------------------------------------------------------- FLOPs

def encoder_flops(hidden: int, ffn: int, layers: int, lengths) -> float:
    """Forward matmul FLOPs of ``layers`` transformer layers over sequences of the given real lengths."""
    per_token = 8 * hidden * hidden + 4 * hidden * ffn  # Q, K, V, output projections; the FFN
    return float(sum(layers * (n * per_token + 4 * n * n * hidden) for n in lengths))  # + QK^T and AV


def head_flops(hidden: int, vocab: int, rows: int) -> float:
    """Forward matmul FLOPs of the MLM head (transform + vocabulary projection) at ``rows`` rows."""
    return float(rows * (2 * hidden * hidden + 2 * hidden * vocab))


def step_flops(preset: Preset, batch: dict, ce_positions: str) -> dict:
    """Model FLOPs of one step on ``batch``: teacher forward, student forward+backward."""
    mask = batch["attention_mask"]
    lengths = mask.sum(1).tolist()
    real = int(mask.sum())
    targets = int((batch["labels"] != -100).sum())
    ce_rows = real if ce_positions == "all" else targets
    teacher = encoder_flops(preset.hidden, preset.ffn, preset.layers, lengths) + \
        head_flops(preset.hidden, preset.vocab_size, ce_rows)
    student_forward = encoder_flops(preset.hidden, preset.ffn, preset.student_layers, lengths) + \
        head_flops(preset.hidden, preset.vocab_size, max(ce_rows, targets))
    return {"teacher": teacher, "student": 3.0 * student_forward, "tokens": real}


# ---------------------------------------------------------------------- the reference formulation

def reference_losses(student_logits, teacher_logits, student_hidden, teacher_hidden, attention_mask, labels,
                     temperature: float = 2.0, ce_positions: str = "all") -> dict:
    """L_ce, L_mlm and L_cos as the published DistilBERT code computes them (means).

    Full ``[batch, length, vocab]`` logits of both models, fp32: L_ce = T^2 * KL(softmax(t/T)
    || softmax(s/T)) with "batchmean" over the selected positions (all real tokens, or the
    MLM positions), L_mlm = cross-entropy at the MLM positions, L_cos = mean of 1 - cos
    over real tokens.
    """
    import torch.nn.functional as F

    real = attention_mask.bool()
    select = real if ce_positions == "all" else labels != -100
    s_sel, t_sel = student_logits[select], teacher_logits[select]
    ce = F.kl_div(F.log_softmax(s_sel / temperature, dim=-1), F.softmax(t_sel / temperature, dim=-1),
                  reduction="batchmean") * temperature**2
    mlm = F.cross_entropy(student_logits.reshape(-1, student_logits.shape[-1]), labels.reshape(-1),
                          ignore_index=-100)
    cos = (1.0 - F.cosine_similarity(student_hidden[real], teacher_hidden[real], dim=-1)).mean()
    return {"ce": ce, "mlm": mlm, "cos": cos}


class ReferenceStep:
    """One step of the reference: fp32 teacher under no_grad, full-logit losses, AdamW, clipping."""

    def __init__(self, teacher, student, loss_cfg, device, lr: float = 5e-4, clip: float = 5.0):
        import torch

        from ds_distil.metrics import Stopwatch

        self.teacher, self.student, self.loss_cfg, self.clip = teacher, student, loss_cfg, clip
        self.device = device
        self.optimizer = torch.optim.AdamW(student.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0)
        self.teacher_time = Stopwatch(device)

    def __call__(self, batch: dict) -> dict:
        import torch

        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        labels = batch["labels"].to(self.device)
        with self.teacher_time, torch.no_grad():
            t = self.teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        s = self.student(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        c = self.loss_cfg
        terms = reference_losses(s.logits, t.logits, s.hidden_states[-1], t.hidden_states[-1], mask, labels,
                                 c.temperature, c.ce_positions)
        loss = c.alpha_ce * terms["ce"] + c.alpha_mlm * terms["mlm"] + c.alpha_cos * terms["cos"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.clip)
        self.optimizer.step()
        return {k: v.detach() for k, v in terms.items()}


# ---------------------------------------------------------------------- measuring

class PeakMemory:
    """Peak memory of a phase: device memory on CUDA, peak resident set (VmHWM) on CPU.

    On CPU the kernel's high-water mark is reset through /proc/self/clear_refs (Linux >= 4.0),
    so each phase reports its own peak; where that is refused, the peak is the process's so far.
    """

    def __init__(self, device):
        self.device = device
        self.resettable = True

    def reset(self) -> None:
        import gc

        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        _release_freed_memory()
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.resettable = False

    def peak_gib(self) -> float:
        import torch

        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
        except OSError:
            pass
        from ds_distil.metrics import peak_memory_gib

        return peak_memory_gib(self.device)


def _release_freed_memory() -> None:
    """Hand memory freed by the previous phase back to the OS (glibc keeps it otherwise), so
    the next phase's peak resident set is its own."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(dtype, device, seconds: float = 1.0, size: int = 2048) -> float:
    """Best achieved TFLOP/s of square ``size`` GEMMs in ``dtype`` (the machine's matmul peak)."""
    import torch

    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b  # warm-up: library dispatch, packing buffers
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(4 if device.type == "cuda" else 1):
            a @ b
        _synchronize(device)
        elapsed = time.perf_counter() - start
        best = max(best, (4 if device.type == "cuda" else 1) * 2 * size**3 / elapsed / 1e12)
    return best


def _device():
    import torch
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        return torch.device("cpu")
    return torch.device(accelerator.device_name(0))


def ds_config(micro_batch: int, zero_stage: int, precision: str) -> dict:
    """The DeepSpeed JSON of the benchmark: the recipe's optimizer and clipping, one rank."""
    cfg = {
        "train_batch_size": micro_batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        # torch's fused AdamW (one kernel over all tensors): the fastest update on CPU.
        "optimizer": {"type": "AdamW", "params": {"lr": 5e-4, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.0,
                                                   "torch_adam": True, "fused": True}},
        "gradient_clipping": 5.0,
        "zero_optimization": {"stage": zero_stage},
        "steps_per_print": 10**9,
    }
    if precision in ("bf16", "fp16"):
        cfg[precision] = {"enabled": True}
    return cfg


def measure_ds_distil(preset: Preset, batches: list[dict], settings: dict, device) -> dict:
    """Time ``trainer.DistillStep`` on a real DeepSpeed engine over ``batches``."""
    import deepspeed
    import torch

    from ds_distil.config import LossConfig
    from ds_distil.modeling import StudentObjective
    from ds_distil.trainer import DistillStep, StepTotals

    loss_cfg = LossConfig(ce_positions=settings["ce_positions"])
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings["precision"], torch.float32)
    teacher = build_teacher(preset).to(dtype=dtype, device=device).eval().requires_grad_(False)
    model = StudentObjective(build_student(preset), loss_cfg.temperature)
    micro_batch = len(batches[0]["input_ids"])
    config = ds_config(micro_batch, settings["zero_stage"], settings["precision"])
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config)
    step = DistillStep(engine, teacher, loss_cfg, device, world_size=1, global_batch=micro_batch)

    def one_step(batch):
        totals = StepTotals(sums=torch.zeros(4, device=device), counts=torch.zeros(3, dtype=torch.float64))
        step([batch], totals)
        return totals

    try:
        result = _time_steps(one_step, step.teacher_time, preset, batches, settings, device)
        return {**result, "deepspeed_config": config}
    finally:
        engine.destroy()
        del engine, model, teacher, step


def measure_reference(preset: Preset, batches: list[dict], settings: dict, device) -> dict:
    """Time ``ReferenceStep`` (fp32, full logits) over ``batches``."""
    from ds_distil.config import LossConfig

    loss_cfg = LossConfig(ce_positions=settings["ce_positions"])
    teacher = build_teacher(preset).to(device).eval().requires_grad_(False)
    student = build_student(preset).to(device).train()
    step = ReferenceStep(teacher, student, loss_cfg, device)
    return _time_steps(step, step.teacher_time, preset, batches, settings, device)


def _time_steps(one_step, teacher_time, preset: Preset, batches: list[dict], settings: dict, device) -> dict:
    """Run ``warmup`` untimed then ``steps`` timed steps; throughput, shares, FLOP/s, peak memory."""
    memory = PeakMemory(device)
    memory.reset()
    warmup, timed = batches[:settings["warmup"]], batches[settings["warmup"]:]
    for batch in warmup:
        one_step(batch)
    _synchronize(device)
    teacher_time.pop_seconds()
    step_seconds = []
    cpu_start = time.process_time()
    for batch in timed:
        start = time.perf_counter()
        one_step(batch)
        _synchronize(device)  # the benchmark's own sync: each step timed whole
        step_seconds.append(time.perf_counter() - start)
    seconds = sum(step_seconds)
    teacher_seconds = teacher_time.pop_seconds()
    flops = [step_flops(preset, b, settings["ce_positions"]) for b in timed]
    tokens = sum(f["tokens"] for f in flops)
    teacher_flops, student_flops = sum(f["teacher"] for f in flops), sum(f["student"] for f in flops)
    student_seconds = seconds - teacher_seconds
    return {
        "steps": len(timed),
        "tokens_per_step": tokens / len(timed),
        "tokens_per_s": tokens / seconds,
        "step_s": seconds / len(timed),
        "step_seconds": step_seconds,
        "teacher_s": teacher_seconds / len(timed),
        "teacher_share": teacher_seconds / seconds,
        "student_share": student_seconds / seconds,
        "teacher_flop_share": teacher_flops / (teacher_flops + student_flops),
        "tflops": (teacher_flops + student_flops) / seconds / 1e12,
        "teacher_tflops": teacher_flops / max(teacher_seconds, 1e-9) / 1e12,
        "student_tflops": student_flops / max(student_seconds, 1e-9) / 1e12,
        "peak_mem_gib": memory.peak_gib(),
        "peak_mem_of_phase": memory.resettable,  # False: the process's peak so far (reset refused)
        "cpu_busy": _cpu_busy(time.process_time() - cpu_start, seconds),
    }


def _cpu_busy(cpu_seconds: float, wall_seconds: float) -> float:
    """Share of the wall time this process's threads were on a CPU (1.0: the machine was
    ours alone; lower: other processes took cores and every number here is too low)."""
    import torch

    return cpu_seconds / max(wall_seconds * torch.get_num_threads(), 1e-9)


def benchmark(settings: dict) -> dict:
    """Both formulations (or one) on the same batches, plus the matmul peaks and the ratio."""
    import torch

    device = _device()
    if settings["precision"] == "fp16" and device.type == "cpu":
        raise UserError("--precision fp16: DeepSpeed runs fp16 on GPUs only; use bf16 (the default) on CPUs")
    preset = PRESETS[settings["preset"]]
    n = settings["warmup"] + settings["steps"]
    batches = synthetic_batches(preset, settings["seq_len"], settings["micro_batch"], n)
    seconds = 0.3 if preset.hidden < 256 else 2.0  # the small preset: a short peak measurement too
    size = 8192 if device.type == "cuda" else 2048  # large enough to reach the peak
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    peaks = {p: matmul_peak_tflops(dtype, device, seconds, size) for p, dtype in dtypes.items()}
    measure = {"ds-distil": measure_ds_distil, "reference": measure_reference}
    results = {}
    for name in settings["formulations"]:
        results[name] = measure[name](preset, batches, settings, device)
        results[name]["precision"] = settings["precision"] if name == "ds-distil" else "fp32"
    # The peak again after the steps, keeping the best: on a shared machine one of the two
    # measurements may have been slowed down by other processes.
    peaks = {p: max(peaks[p], matmul_peak_tflops(dtype, device, seconds, size)) for p, dtype in dtypes.items()}
    for result in results.values():
        result["mfu"] = {p: result["tflops"] / peak for p, peak in peaks.items()}
    out = {"machine": machine_info(device), "settings": _public(settings), "model": model_info(preset),
           "matmul_peak_tflops": peaks, **results}
    if len(results) == 2:
        out["speedup"] = results["ds-distil"]["tokens_per_s"] / results["reference"]["tokens_per_s"]
    return out


def _public(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in ("seq_lens", "zero_stages")}


def model_info(preset: Preset) -> dict:
    import torch

    from ds_distil.modeling import count_parameters

    with torch.device("meta"):  # shapes only: no memory, no time
        teacher, student = build_teacher(preset), build_student(preset)
    return {"preset": asdict(preset), "teacher_parameters": count_parameters(teacher),
            "student_parameters": count_parameters(student)}


def machine_info(device) -> dict:
    import deepspeed
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"device": str(device), "cpu": cpu, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ---------------------------------------------------------------------- sweeps

def sweeps(settings: dict) -> dict:
    """Step time against sequence length and peak memory against ZeRO stage (ds-distil only)."""
    out = {}
    if settings["seq_lens"]:
        tokens = settings["seq_len"] * settings["micro_batch"]
        out["seq_len_sweep"] = [_child(settings, seq_len=n, micro_batch=max(1, tokens // n))
                                for n in settings["seq_lens"]]
    if settings["zero_stages"]:
        out["zero_sweep"] = [_child(settings, zero_stage=s) for s in settings["zero_stages"]]
    return out


def _child(settings: dict, **changes) -> dict:
    """ds-distil's step measured in a fresh process (its own peak memory, its own engine)."""
    s = {**settings, **changes}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "ds_distil.bench", "--preset", s["preset"], "--seq-len", str(s["seq_len"]),
               "--micro-batch", str(s["micro_batch"]), "--steps", str(s["steps"]), "--warmup", str(s["warmup"]),
               "--zero-stage", str(s["zero_stage"]), "--precision", s["precision"],
               "--ce-positions", s["ce_positions"], "--only", "ds-distil", "--json", str(out)]
        # A fresh single-process world: not the rank variables this process set for itself.
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"bench child failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
        child = json.loads(out.read_text())
    keep = ("tokens_per_step", "tokens_per_s", "step_s", "teacher_share", "tflops", "mfu", "peak_mem_gib",
            "cpu_busy")
    return {"seq_len": s["seq_len"], "micro_batch": s["micro_batch"], "zero_stage": s["zero_stage"],
            **{k: child["ds-distil"][k] for k in keep}}


# ---------------------------------------------------------------------- report

def format_report(result: dict) -> str:
    """The results as a plain-text table (the JSON holds the same numbers)."""
    m, s = result["machine"], result["settings"]
    lines = [f"ds-distil bench: preset {s['preset']}, seq-len {s['seq_len']}, micro-batch {s['micro_batch']}, "
             f"{s['steps']} timed steps after {s['warmup']} warm-up, ZeRO {s['zero_stage']}, "
             f"L_ce at {s['ce_positions']} positions",
             f"machine: {m['cpu']} ({m['threads']} threads), {m['device']}; torch {m['torch']}, "
             f"deepspeed {m['deepspeed']}, transformers {m['transformers']}; {m['date']}",
             "matmul peak: " + ", ".join(f"{p} {v:.3f} TFLOP/s" for p, v in result["matmul_peak_tflops"].items()),
             ""]
    rows = [("precision", "{}", "precision"), ("tokens/s", "{:,.0f}", "tokens_per_s"),
            ("step time (s)", "{:.3f}", "step_s"), ("tokens/step", "{:,.0f}", "tokens_per_step"),
            ("teacher share of time", "{:.0%}", "teacher_share"),
            ("student share of time", "{:.0%}", "student_share"),
            ("teacher share of FLOPs", "{:.0%}", "teacher_flop_share"),
            ("TFLOP/s (all)", "{:.3f}", "tflops"), ("TFLOP/s teacher fwd", "{:.3f}", "teacher_tflops"),
            ("TFLOP/s student fwd+bwd", "{:.3f}", "student_tflops"),
            ("peak memory (GiB)", "{:.2f}", "peak_mem_gib"), ("CPU busy (1 = machine ours)", "{:.2f}", "cpu_busy")]
    names = [n for n in FORMULATIONS if n in result]
    lines.append(f"{'':28}" + "".join(f"{n:>14}" for n in names))
    for label, fmt, key in rows:
        lines.append(f"{label:28}" + "".join(f"{fmt.format(result[n][key]):>14}" for n in names))
    for peak in result["matmul_peak_tflops"]:
        lines.append(f"{'MFU vs ' + peak + ' peak':28}" + "".join(f"{result[n]['mfu'][peak]:>14.0%}" for n in names))
    if "speedup" in result:
        lines.append(f"\nspeed-up (tokens/s, ds-distil / reference): {result['speedup']:.2f}x")
    # Tiny models leave threads idle by themselves; BERT-sized ones keep them busy when alone.
    if m["device"] == "cpu" and s["preset"] != "small" and min(result[n]["cpu_busy"] for n in names) < 0.9:
        lines.append("warning: other processes shared the CPU during this run (CPU busy < 0.9): "
                     "times are too long, rerun on an idle machine")
    if "seq_len_sweep" in result:
        lines.append("\nds-distil step vs sequence length (tokens per step held constant):")
        lines.append(f"{'seq-len':>8}{'micro':>7}{'tokens':>8}{'step s':>9}{'tokens/s':>10}{'teacher':>9}"
                     f"{'MFU bf16':>10}{'CPU busy':>10}")
        for r in result["seq_len_sweep"]:
            lines.append(f"{r['seq_len']:>8}{r['micro_batch']:>7}{r['tokens_per_step']:>8,.0f}{r['step_s']:>9.3f}"
                         f"{r['tokens_per_s']:>10,.0f}{r['teacher_share']:>9.0%}{r['mfu']['bf16']:>10.0%}"
                         f"{r['cpu_busy']:>10.2f}")
    if "zero_sweep" in result:
        lines.append("\nds-distil peak memory vs ZeRO stage (1 rank, one process per stage):")
        lines.append(f"{'stage':>6}{'peak GiB':>10}{'step s':>9}{'CPU busy':>10}")
        for r in result["zero_sweep"]:
            lines.append(f"{r['zero_stage']:>6}{r['peak_mem_gib']:>10.2f}{r['step_s']:>9.3f}{r['cpu_busy']:>10.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m ds_distil.bench``: the same as ``ds-distil bench`` (one error path: the CLI's)."""
    from ds_distil.cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
