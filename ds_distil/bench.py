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

For each it reports tokens/s (real tokens) and step time as the median over the timed
steps with their spread (min-max), the teacher's and the student's share of the time,
achieved TFLOP/s (teacher forward and student forward+backward counted separately) and
peak memory; then the speed ratio and the model-FLOP utilisation (MFU) against the bf16
and fp32 matmul peaks measured in the same run (the best over several sizes and repeats,
before and after the steps). Optional sweeps, each point in a child process: step time
against sequence length, peak memory against ZeRO stage, and tokens/s against
micro-batch (up to the largest that fits). From the best tokens/s per device it projects
the wall time of the paper's full run (3 epochs of about 4.3 B tokens) on ``--gpus`` devices.

**Honest numbers.** Other processes' CPU use is measured during every phase (/proc/stat
minus this process); when they took cores the benchmark needed, the report says
"BUSY MACHINE: not a valid measurement" on every MFU, speed-up and projection line and
the JSON records ``"busy": true``. ``--wait-idle S`` first waits up to S seconds for a
quiet machine.

FLOPs are *model* FLOPs (``ds_distil.metrics``), the same count for both formulations:
matmuls of the encoder over each sequence's real tokens (attention included) and of the
MLM head at the rows a loss needs; a backward pass counts twice its forward. Work a
formulation spends on padding or on logits no loss uses is not counted, so the TFLOP/s
ratio is the speed ratio.
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
                   seq_len=128, micro_batch=32, steps=10),
    # A few seconds on 2 CPU cores: the test suite runs it through the CLI.
    "small": Preset(vocab_size=1024, hidden=64, layers=4, heads=2, ffn=256, student_layers=2,
                    seq_len=64, micro_batch=8, steps=5, unk_id=1, cls_id=2, sep_id=3, mask_id=4),
}

# The paper's full run: 3 epochs over English Wikipedia + BookCorpus, about 4.3 B
# WordPiece tokens per epoch (issue #12's figure), for the wall-time projection.
FULL_RUN_EPOCHS = 3
FULL_RUN_TOKENS_PER_EPOCH = 4.3e9


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="base",
                        help="base: BERT-base -> 6-layer DistilBERT; small: a tiny pair for tests (default base)")
    parser.add_argument("--seq-len", type=int, help="longest sequence (default: the preset's, 128 for base)")
    parser.add_argument("--micro-batch", type=int, help="sequences per step (default: the preset's)")
    parser.add_argument("--steps", type=int,
                        help="timed steps per formulation; times are their median (default: the preset's, 10 for base)")
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
    parser.add_argument("--micro-batches", metavar="N,N,...",
                        help="also measure ds-distil's tokens/s at these micro-batches, e.g. 32,64,128,256 "
                             "(one child process each, in increasing order, stopping at the first that runs out "
                             "of memory: the largest that fits)")
    parser.add_argument("--gpus", type=int, default=8,
                        help="devices for the projected wall time of the paper's full run (default 8)")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="before measuring, wait up to this long for other processes to leave the CPUs "
                             "(default 0: measure at once; a busy machine is reported either way)")
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON to this file")


def run(args: argparse.Namespace) -> int:
    """Measure, print the table, write the JSON; returns the exit status."""
    settings = resolve_settings(args)
    if args.json is not None:
        require_output_path(args.json, "--json", "file")  # before the benchmark runs, not after
    import torch

    if settings["precision"] == "fp16" and _device().type == "cpu":
        raise UserError("--precision fp16: DeepSpeed runs fp16 on GPUs only; use bf16 (the default) on CPUs")
    from ds_distil.distributed import setup_distributed, teardown_distributed

    info = setup_distributed()
    try:
        if info.world_size != 1:
            raise UserError(f"ds-distil bench runs in a single process, not {info.world_size} ranks: "
                            "start it with python/ds-distil, not a launcher")
        waited = wait_for_idle(settings["wait_idle"], _threads(_device()))
        result = benchmark(settings)
        result["load"]["waited_for_idle_s"] = waited
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:
        if not _out_of_memory(err):
            raise
        # The micro-batch sweep's parent reads this exit status as "does not fit".
        print(f"ds-distil bench: out of memory at micro-batch {settings['micro_batch']}, "
              f"seq-len {settings['seq_len']} ({type(err).__name__})", file=sys.stderr)
        return EXIT_OUT_OF_MEMORY
    finally:
        teardown_distributed()
    if settings["seq_lens"] or settings["zero_stages"] or settings["micro_batches"]:
        result.update(sweeps(settings))
        judge_sweeps(result)
    result["projection"] = projection(result, settings["gpus"])
    print(format_report(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


# Exit status of a bench that ran out of device (or host) memory.
EXIT_OUT_OF_MEMORY = 3


def _out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` says memory ran out: torch's OutOfMemoryError (CUDA caching allocator),
    Python's MemoryError, or a RuntimeError of torch's CPU allocator or of a CUDA library."""
    import torch

    text = str(err)
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or any(
        sign in text for sign in ("can't allocate memory", "out of memory", "CUBLAS_STATUS_ALLOC_FAILED"))


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
                "zero_stages": _int_list(args.zero_stages, "--zero-stages"),
                "micro_batches": sorted(set(_int_list(args.micro_batches, "--micro-batches"))),
                "gpus": args.gpus, "wait_idle": args.wait_idle}
    for name in ("micro_batch", "steps", "gpus"):
        if settings[name] < 1:
            raise UserError(f"--{name.replace('_', '-')} {settings[name]}: must be >= 1")
    if settings["warmup"] < 0:
        raise UserError(f"--warmup {settings['warmup']}: must be >= 0")
    if not 0 <= settings["wait_idle"] < float("inf"):
        raise UserError(f"--wait-idle {settings['wait_idle']}: give seconds >= 0 (0: measure at once)")
    if any(n < 1 for n in settings["micro_batches"]):
        raise UserError(f"--micro-batches {args.micro_batches}: every micro-batch must be >= 1")
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
                        max_position_embeddings=preset.max_position, pad_token_id=preset.pad_id,
                        attn_implementation="sdpa")  # PyTorch SDPA (flash / memory-efficient kernels)
    return BertForMaskedLM(config)


def build_student(preset: Preset, seed: int = 1):
    """A DistilBertForMaskedLM: the teacher's width, ``student_layers`` layers, random weights, fp32."""
    import torch
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    torch.manual_seed(seed)
    config = DistilBertConfig(vocab_size=preset.vocab_size, dim=preset.hidden, n_layers=preset.student_layers,
                              n_heads=preset.heads, hidden_dim=preset.ffn, max_position_embeddings=preset.max_position,
                              pad_token_id=preset.pad_id, attn_implementation="sdpa")
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

def step_flops(preset: Preset, batch: dict, ce_positions: str) -> dict:
    """Model FLOPs of one step on ``batch``: teacher forward, student forward+backward
    (``ds_distil.metrics``' count, at each sequence's own length)."""
    from ds_distil.metrics import encoder_flops, head_flops

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


# ---------------------------------------------------------------------- machine load

# Cores other processes may keep busy, beyond those the benchmark leaves free, before a
# measurement is called busy: an idle Linux machine's daemons stay well below it.
BUSY_MARGIN_CORES = 0.25
# Phases shorter than this are judged only as part of the whole run: /proc/stat counts
# in 10 ms ticks, too coarse for a verdict on a fraction of a second.
MIN_JUDGED_S = 1.0
# Device memory that other processes may hold on the benchmark's GPU.
BUSY_GPU_GIB = 2.0


def _cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine since boot, this process's CPU seconds), or None."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal: all but idle and iowait are busy
    # (steal is time other virtual machines on the host took; guest time is in user).
    ticks = [int(x) for x in fields[1:9]]
    busy = sum(ticks[i] for i in (0, 1, 2, 5, 6, 7))
    return busy / os.sysconf("SC_CLK_TCK"), time.process_time()


class MachineLoad:
    """How many cores other processes kept busy, on average, during a ``with`` block.

    The machine's busy CPU time (/proc/stat) minus this process's own (all its threads),
    over the wall time. ``other_cores`` is None where /proc/stat cannot be read.
    """

    def __enter__(self):
        self._start, self._wall = _cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        end = _cpu_seconds()
        self.seconds = time.perf_counter() - self._wall
        self.other_cores = None
        if self._start is not None and end is not None and self.seconds > 0:
            others = (end[0] - self._start[0]) - (end[1] - self._start[1])
            self.other_cores = max(0.0, others / self.seconds)

    def as_dict(self) -> dict:
        return {"seconds": self.seconds, "other_cores": self.other_cores}


def _threads(device) -> int:
    """CPU threads the benchmark keeps busy: torch's on CPU, the launching thread on a GPU."""
    import torch

    return torch.get_num_threads() if device.type == "cpu" else 1


def allowed_other_cores(threads: int) -> float:
    """Other processes' average CPU use below which a measurement with ``threads`` threads is valid."""
    return max(0, (os.cpu_count() or 1) - threads) + BUSY_MARGIN_CORES


def judge_load(phases: dict[str, dict], threads: int, gpu_other_gib: float | None = None) -> dict:
    """The verdict on a run's phases: ``busy`` (None: the load could not be read) and why."""
    allowed = allowed_other_cores(threads)
    measured = {k: v for k, v in phases.items() if v["other_cores"] is not None}
    judged = {k: v for k, v in measured.items() if v["seconds"] >= MIN_JUDGED_S} or measured
    verdict = {"busy": None, "allowed_other_cores": allowed, "threads": threads, "cpu_count": os.cpu_count(),
               "phases": phases, "gpu_other_gib": gpu_other_gib, "reason": "no /proc/stat: load unknown"}
    if judged:
        worst = max(judged, key=lambda k: judged[k]["other_cores"])
        cores = judged[worst]["other_cores"]
        verdict.update(busy=cores > allowed, worst_phase=worst, other_cores=cores,
                       reason=f"other processes kept {cores:.2f} cores busy on average during {worst} "
                              f"({'more' if cores > allowed else 'no more'} than the {allowed:.2f} allowed with "
                              f"{threads} of {os.cpu_count()} cores in use)")
    if gpu_other_gib is not None and gpu_other_gib > BUSY_GPU_GIB:
        verdict["busy"] = True
        verdict["reason"] += f"; other processes hold {gpu_other_gib:.1f} GiB on the GPU"
    return verdict


def gpu_memory_of_others(device) -> float | None:
    """GiB of the GPU's memory held by other processes (and this one's CUDA context), or None on CPU."""
    import torch

    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return (total - free - torch.cuda.memory_reserved(device)) / 2**30


def wait_for_idle(limit_s: float, threads: int) -> float:
    """Wait up to ``limit_s`` seconds for a one-second sample in which the machine is quiet
    enough to measure; returns the seconds waited (the verdict comes from the run itself)."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        with MachineLoad() as load:
            time.sleep(1.0)
        if load.other_cores is None or load.other_cores <= allowed_other_cores(threads):
            break
    return time.perf_counter() - start


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
    """Run ``warmup`` untimed then ``steps`` timed steps, each timed whole.

    Step time, tokens/s and TFLOP/s are medians over the timed steps (a step slowed by a
    burst of other work moves a median little), with the min and max as the spread; the
    teacher's share and the per-model TFLOP/s are over all timed steps together.
    """
    from statistics import median

    memory = PeakMemory(device)
    memory.reset()
    warmup, timed = batches[:settings["warmup"]], batches[settings["warmup"]:]
    for batch in warmup:
        one_step(batch)
    _synchronize(device)
    teacher_time.pop_seconds()
    step_seconds = []
    with MachineLoad() as load:
        for batch in timed:
            start = time.perf_counter()
            one_step(batch)
            _synchronize(device)  # the benchmark's own sync: each step timed whole
            step_seconds.append(time.perf_counter() - start)
    seconds = sum(step_seconds)
    teacher_seconds = teacher_time.pop_seconds()
    flops = [step_flops(preset, b, settings["ce_positions"]) for b in timed]
    tokens = [f["tokens"] for f in flops]
    rates = [n / t for n, t in zip(tokens, step_seconds)]  # batches differ in length: rate per step
    flop_rates = [(f["teacher"] + f["student"]) / t for f, t in zip(flops, step_seconds)]
    teacher_flops, student_flops = sum(f["teacher"] for f in flops), sum(f["student"] for f in flops)
    student_seconds = seconds - teacher_seconds
    return {
        "steps": len(timed),
        "step_seconds": step_seconds,
        "step_tokens": tokens,
        "tokens_per_step": sum(tokens) / len(timed),
        "tokens_per_s": median(rates),
        "tokens_per_s_min": min(rates),
        "tokens_per_s_max": max(rates),
        "step_s": median(step_seconds),
        "step_s_min": min(step_seconds),
        "step_s_max": max(step_seconds),
        "teacher_s": teacher_seconds / len(timed),
        "teacher_share": teacher_seconds / seconds,
        "student_share": student_seconds / seconds,
        "teacher_flop_share": teacher_flops / (teacher_flops + student_flops),
        "tflops": median(flop_rates) / 1e12,
        "teacher_tflops": teacher_flops / max(teacher_seconds, 1e-9) / 1e12,
        "student_tflops": student_flops / max(student_seconds, 1e-9) / 1e12,
        "peak_mem_gib": memory.peak_gib(),
        "peak_mem_of_phase": memory.resettable,  # False: the process's peak so far (reset refused)
        "load": load.as_dict(),
    }


def matmul_peaks(device, repeats: int) -> dict[str, dict[int, float]]:
    """Best GEMM TFLOP/s per precision and size (fp16 on GPUs only: CPUs have no fast fp16)."""
    import torch

    from ds_distil.metrics import matmul_tflops_by_size

    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    if device.type == "cuda":
        dtypes["fp16"] = torch.float16
    sizes = (2048, 4096, 8192) if device.type == "cuda" else (512, 1024, 2048)
    return {p: matmul_tflops_by_size(dtype, device, sizes, repeats) for p, dtype in dtypes.items()}


def benchmark(settings: dict) -> dict:
    """Both formulations (or one) on the same batches, the matmul peaks, the ratio and the load verdict."""
    device = _device()
    if settings["precision"] == "fp16" and device.type == "cpu":
        raise UserError("--precision fp16: DeepSpeed runs fp16 on GPUs only; use bf16 (the default) on CPUs")
    preset = PRESETS[settings["preset"]]
    n = settings["warmup"] + settings["steps"]
    batches = synthetic_batches(preset, settings["seq_len"], settings["micro_batch"], n)
    repeats = 2 if preset.hidden < 256 else 5  # the small preset: a short peak measurement too
    gpu_others = gpu_memory_of_others(device)  # before this process allocates anything
    measure = {"ds-distil": measure_ds_distil, "reference": measure_reference}
    phases, results = {}, {}
    with MachineLoad() as whole:
        with MachineLoad() as load:
            before = matmul_peaks(device, repeats)
        phases["the peak before"] = load.as_dict()
        for name in settings["formulations"]:
            results[name] = measure[name](preset, batches, settings, device)
            results[name]["precision"] = settings["precision"] if name == "ds-distil" else "fp32"
            phases[name] = results[name]["load"]
        # The peak again after the steps, keeping the best per size.
        with MachineLoad() as load:
            after = matmul_peaks(device, repeats)
        phases["the peak after"] = load.as_dict()
    phases["the whole run"] = whole.as_dict()
    by_size = {p: {size: max(before[p][size], after[p][size]) for size in before[p]} for p in before}
    peaks = {p: max(sizes.values()) for p, sizes in by_size.items()}
    peaks.update(datasheet_peaks(device, settings["precision"]))
    for result in results.values():
        result["mfu"] = {p: result["tflops"] / peak for p, peak in peaks.items()}
    verdict = judge_load(phases, _threads(device), gpu_others)
    out = {"machine": machine_info(device), "settings": _public(settings), "model": model_info(preset),
           "busy": verdict["busy"], "load": verdict, "matmul_peak_tflops": peaks,
           "matmul_tflops_by_size": {p: {str(k): v for k, v in sizes.items()} for p, sizes in by_size.items()},
           **results}
    if len(results) == 2:
        out["speedup"] = results["ds-distil"]["tokens_per_s"] / results["reference"]["tokens_per_s"]
    return out


def datasheet_peaks(device, precision: str) -> dict[str, float]:
    """On a GPU the metrics table knows, its data-sheet peak at ``precision`` (the usual MFU base)."""
    import torch

    from ds_distil.metrics import known_peak_tflops

    if device.type != "cuda":
        return {}
    known = known_peak_tflops(torch.cuda.get_device_name(device), precision)
    return {f"{precision} data sheet": known} if known else {}


def _public(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in ("seq_lens", "zero_stages", "micro_batches")}


def model_info(preset: Preset) -> dict:
    import torch

    from ds_distil.modeling import count_parameters

    with torch.device("meta"):  # shapes only: no memory, no time
        teacher, student = build_teacher(preset), build_student(preset)
    return {"preset": asdict(preset), "teacher_parameters": count_parameters(teacher),
            "student_parameters": count_parameters(student),
            "attention": {"teacher": teacher.config._attn_implementation,  # "sdpa": PyTorch's fused kernels
                          "student": student.config._attn_implementation}}


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
    """ds-distil's step, one child process per point: vs sequence length, vs ZeRO stage (peak
    memory) and vs micro-batch (up to the largest that fits)."""
    out = {}
    if settings["seq_lens"]:
        tokens = settings["seq_len"] * settings["micro_batch"]
        out["seq_len_sweep"] = [_child(settings, seq_len=n, micro_batch=max(1, tokens // n))
                                for n in settings["seq_lens"]]
    if settings["zero_stages"]:
        out["zero_sweep"] = [_child(settings, zero_stage=s) for s in settings["zero_stages"]]
    if settings["micro_batches"]:
        rows = []
        for n in settings["micro_batches"]:  # increasing
            rows.append(_child(settings, micro_batch=n))
            if not rows[-1]["fits"]:
                break  # the larger ones will not fit either
        out["micro_batch_sweep"] = rows
    return out


def _child(settings: dict, **changes) -> dict:
    """ds-distil's step measured in a fresh process (its own peak memory, its own engine);
    ``fits`` is False when it ran out of memory."""
    s = {**settings, **changes}
    point = {"seq_len": s["seq_len"], "micro_batch": s["micro_batch"], "zero_stage": s["zero_stage"]}
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
        # Out of memory: the child says so (exit 3), or the kernel's OOM killer ends it.
        if proc.returncode in (EXIT_OUT_OF_MEMORY, -9):
            return {**point, "fits": False}
        if proc.returncode != 0:
            raise RuntimeError(f"bench child failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
        child = json.loads(out.read_text())
    keep = ("tokens_per_step", "tokens_per_s", "tokens_per_s_min", "tokens_per_s_max", "step_s", "step_s_min",
            "step_s_max", "teacher_share", "tflops", "mfu", "peak_mem_gib")
    return {**point, "fits": True, **{k: child["ds-distil"][k] for k in keep}, "busy": child["busy"],
            "load": child["load"]}


def judge_sweeps(result: dict) -> None:
    """The run is busy if any measured point was: every number in the report is then suspect."""
    rows = [r for key in ("seq_len_sweep", "zero_sweep", "micro_batch_sweep") for r in result.get(key, [])]
    if any(r.get("busy") for r in rows):
        result["busy"] = True
        result["load"]["reason"] += "; busy during the sweeps too (see their rows)"


def projection(result: dict, devices: int) -> dict | None:
    """Wall time of the paper's full run (3 epochs x ~4.3 B tokens) on ``devices`` devices like
    this one, from the best ds-distil tokens/s per device measured (the main run or a sweep
    point). Perfect scaling is assumed, so it is a lower bound: no communication, no data
    loading, no evaluation or checkpoints."""
    candidates = []
    if "ds-distil" in result:
        candidates.append({"micro_batch": result["settings"]["micro_batch"], "seq_len": result["settings"]["seq_len"],
                           "tokens_per_s": result["ds-distil"]["tokens_per_s"], "busy": result["busy"]})
    candidates += [r for r in result.get("micro_batch_sweep", []) if r["fits"]]
    if not candidates:
        return None
    best = max(candidates, key=lambda r: r["tokens_per_s"])
    tokens = FULL_RUN_EPOCHS * FULL_RUN_TOKENS_PER_EPOCH
    return {"devices": devices, "device": result["machine"].get("gpu", result["machine"]["device"]),
            "tokens": tokens, "tokens_per_s_per_device": best["tokens_per_s"], "micro_batch": best["micro_batch"],
            "seq_len": best["seq_len"], "hours": tokens / (best["tokens_per_s"] * devices) / 3600,
            "busy": bool(best["busy"]) or bool(result["busy"])}


# ---------------------------------------------------------------------- report

BUSY = "  [BUSY MACHINE: not a valid measurement]"


def format_report(result: dict) -> str:
    """The results as plain-text tables (the JSON holds the same numbers)."""
    busy = bool(result["busy"])
    mark = BUSY if busy else ""
    lines = _header(result)
    names = [n for n in FORMULATIONS if n in result]
    lines += _main_table(result, names, mark)
    if "speedup" in result:
        lines.append(f"\nspeed-up (tokens/s, ds-distil / reference): {result['speedup']:.2f}x{mark}")
    lines += _sweep_tables(result)
    p = result.get("projection")
    if p:
        lines.append(f"\nprojected full run (3 epochs x 4.3 B tokens = {p['tokens'] / 1e9:.1f} B tokens) on "
                     f"{p['devices']} x {p['device']} at {p['tokens_per_s_per_device']:,.0f} tokens/s each "
                     f"(micro-batch {p['micro_batch']}, seq-len {p['seq_len']}, perfect scaling: a lower bound): "
                     f"{_duration(p['hours'])}{BUSY if p['busy'] else ''}")
    if busy:
        lines.append(f"\nBUSY MACHINE: not a valid measurement: {result['load']['reason']}. Rerun on an idle "
                     "machine (--wait-idle SECONDS waits for one).")
    return "\n".join(lines)


def _header(result: dict) -> list[str]:
    m, s, load = result["machine"], result["settings"], result["load"]
    sizes = next(iter(result["matmul_tflops_by_size"].values()))
    state = {True: "BUSY MACHINE: not a valid measurement", False: "quiet", None: "unknown"}[result["busy"]]
    lines = [f"ds-distil bench: preset {s['preset']}, seq-len {s['seq_len']}, micro-batch {s['micro_batch']}, "
             f"median of {s['steps']} timed steps after {s['warmup']} warm-up, ZeRO {s['zero_stage']}, "
             f"L_ce at {s['ce_positions']} positions; attention: {result['model']['attention']['student']}",
             f"machine: {m['cpu']} ({m['threads']} threads), {m.get('gpu', m['device'])}; torch {m['torch']}, "
             f"deepspeed {m['deepspeed']}, transformers {m['transformers']}; {m['date']}",
             "matmul peak (best of sizes " + "/".join(sizes) + ", repeated, before and after the steps): "
             + ", ".join(f"{p} {v:.3f}" for p, v in result["matmul_peak_tflops"].items()) + " TFLOP/s",
             f"machine load: {state}: {load['reason']}"]
    if s["steps"] < 5:
        lines.append(f"note: only {s['steps']} timed steps: too few for a stable median (10 or more)")
    return lines + [""]


def _main_table(result: dict, names: list[str], mark: str) -> list[str]:
    def spread(r, key, fmt):
        return f"{fmt.format(r[key + '_min'])}-{fmt.format(r[key + '_max'])}"

    rows = [("precision", lambda r: r["precision"]),
            ("tokens/s (median)", lambda r: f"{r['tokens_per_s']:,.0f}"),
            ("tokens/s min-max", lambda r: spread(r, "tokens_per_s", "{:,.0f}")),
            ("step time s (median)", lambda r: f"{r['step_s']:.3f}"),
            ("step time s min-max", lambda r: spread(r, "step_s", "{:.3f}")),
            ("tokens/step (mean)", lambda r: f"{r['tokens_per_step']:,.0f}"),
            ("teacher share of time", lambda r: f"{r['teacher_share']:.0%}"),
            ("teacher share of FLOPs", lambda r: f"{r['teacher_flop_share']:.0%}"),
            ("TFLOP/s (median)", lambda r: f"{r['tflops']:.3f}"),
            ("TFLOP/s teacher fwd", lambda r: f"{r['teacher_tflops']:.3f}"),
            ("TFLOP/s student fwd+bwd", lambda r: f"{r['student_tflops']:.3f}"),
            ("peak memory (GiB)", lambda r: f"{r['peak_mem_gib']:.2f}"),
            ("other processes' cores", lambda r: _cores(r["load"]["other_cores"]))]
    rows += [(f"MFU vs {p} peak", lambda r, p=p: f"{r['mfu'][p]:.0%}") for p in result["matmul_peak_tflops"]]
    lines = [f"{'':28}" + "".join(f"{n:>16}" for n in names)]
    for label, cell in rows:
        lines.append(f"{label:28}" + "".join(f"{cell(result[n]):>16}" for n in names)
                     + (mark if label.startswith("MFU") else ""))
    return lines


def _sweep_tables(result: dict) -> list[str]:
    lines = []
    peak = _main_peak(result)
    if "seq_len_sweep" in result:
        lines.append("\nds-distil step vs sequence length (tokens per step held constant; medians):")
        lines.append(f"{'seq-len':>8}{'micro':>7}{'tokens':>8}{'step s':>9}{'tokens/s':>10}{'teacher':>9}"
                     f"{'MFU ' + peak:>12}  load")
        for r in result["seq_len_sweep"]:
            lines.append(f"{r['seq_len']:>8}{r['micro_batch']:>7}{r['tokens_per_step']:>8,.0f}{r['step_s']:>9.3f}"
                         f"{r['tokens_per_s']:>10,.0f}{r['teacher_share']:>9.0%}{r['mfu'][peak]:>12.0%}  {_state(r)}")
    if "zero_sweep" in result:
        lines.append("\nds-distil peak memory vs ZeRO stage (1 rank, one process per stage):")
        lines.append(f"{'stage':>6}{'peak GiB':>10}{'step s':>9}  load")
        for r in result["zero_sweep"]:
            lines.append(f"{r['zero_stage']:>6}{r['peak_mem_gib']:>10.2f}{r['step_s']:>9.3f}  {_state(r)}")
    if "micro_batch_sweep" in result:
        lines += _micro_batch_table(result["micro_batch_sweep"], peak)
    return lines


def _micro_batch_table(rows: list[dict], peak: str) -> list[str]:
    lines = [f"\nds-distil tokens/s vs micro-batch (seq-len {rows[0]['seq_len']}; medians, min-max):",
             f"{'micro':>7}{'tokens/s':>10}{'min-max':>16}{'step s':>9}{'MFU ' + peak:>12}{'peak GiB':>10}  load"]
    for r in rows:
        if not r["fits"]:
            lines.append(f"{r['micro_batch']:>7}  out of memory")
            continue
        spread = f"{r['tokens_per_s_min']:,.0f}-{r['tokens_per_s_max']:,.0f}"
        lines.append(f"{r['micro_batch']:>7}{r['tokens_per_s']:>10,.0f}{spread:>16}{r['step_s']:>9.3f}"
                     f"{r['mfu'][peak]:>12.0%}{r['peak_mem_gib']:>10.2f}  {_state(r)}")
    fitting = [r for r in rows if r["fits"]]
    if fitting:
        best = max(fitting, key=lambda r: r["tokens_per_s"])
        lines.append(f"largest micro-batch that fits (of those tried): {fitting[-1]['micro_batch']}; "
                     f"best tokens/s at micro-batch {best['micro_batch']}" + (BUSY if best["busy"] else ""))
    return lines


def _main_peak(result: dict) -> str:
    """The measured peak the sweeps' MFU is shown against: ds-distil's precision where measured."""
    precision = result["settings"]["precision"]
    return precision if precision in result["matmul_peak_tflops"] else "bf16"


def _state(row: dict) -> str:
    return {True: "BUSY", False: "quiet", None: "unknown"}[row["busy"]]


def _cores(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.2f}"


def _duration(hours: float) -> str:
    return f"{hours:,.1f} hours" if hours < 72 else f"{hours / 24:,.1f} days ({hours:,.0f} hours)"


def main(argv: list[str] | None = None) -> int:
    """``python -m ds_distil.bench``: the same as ``ds-distil bench`` (one error path: the CLI's)."""
    from ds_distil.cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
