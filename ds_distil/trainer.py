"""``ds-distil train``: the student in a DeepSpeed engine, the teacher beside it, the step loop.

One code path for a single process and for N ranks under any launcher. Per optimizer
step every rank:
  1. takes its ``accumulation_steps`` micro-batches of the global batch (batching.py);
  2. counts the tokens of each loss term over the whole global batch (one small
     all-reduce), so every term is a mean over the global batch however it is split;
  3. per micro-batch: teacher forward under inference mode (frozen, outside the engine),
     student forward + loss sums inside the engine, backward, ``engine.step()``.
Host syncs happen only on log steps (and the checks of the reliability guards).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from ds_distil.config import RunConfig, describe, load_run_config
from ds_distil.errors import UserError

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: checkpointed on SIGUSR1/SIGTERM, requeue and resume


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="run config JSON (see --describe-config)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="overrides of the run config, e.g. train.max_steps=100 loss.alpha_cos=0")
    parser.add_argument("--describe-config", action="store_true", help="print every config key and exit")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment wins.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)


def run(args) -> int:
    if args.describe_config:
        print(describe())
        return 0
    if not args.config and not args.overrides:
        raise UserError("no run config: pass --config RUN.json (see --describe-config)")
    cfg = load_run_config(args.config, args.overrides)
    return train(cfg)


def train(cfg: RunConfig) -> int:
    """Run (or resume) training; returns the process exit status."""
    from ds_distil.distributed import setup_distributed, teardown_distributed

    # DeepSpeed 0.19 calls torch collectives that torch 2.13 flags as deprecated, every step.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    dist_info = setup_distributed(cfg.train.collective_timeout_s)
    try:
        trainer = Trainer(cfg, dist_info)
        return trainer.fit()
    finally:
        teardown_distributed()


@dataclass
class StepTotals:
    """Device-side running sums between two log points (read only when logging)."""

    sums: object  # tensor [ce, mlm, cos, mlm_hits]
    counts: object  # tensor [ce, mlm, cos]
    steps: int = 0
    tokens: int = 0
    sequences: int = 0


class Trainer:
    def __init__(self, cfg: RunConfig, dist_info):
        import torch

        from ds_distil import checkpoint, data, ds_config
        from ds_distil.batching import GlobalBatchSampler
        from ds_distil.masking import MaskingCollator

        self.cfg, self.dist = cfg, dist_info
        self.is_main = dist_info.is_main
        self.out = Path(cfg.output_dir)
        self.ckpt_root = self.out / "checkpoints"
        self.out.mkdir(parents=True, exist_ok=True)
        self.stop_signal = None

        # -- DeepSpeed config and the batch arithmetic, derived once and printed.
        self.ds_cfg = ds_config.load_ds_config(cfg.deepspeed_config)
        self.batch = ds_config.batch_arithmetic(self.ds_cfg, dist_info.world_size, source=cfg.deepspeed_config)
        ds_config.validate_with_deepspeed(self.ds_cfg, dist_info.world_size, source=cfg.deepspeed_config)
        self.precision = ds_config.check_precision_supported(self.ds_cfg, cfg.deepspeed_config)

        # -- Data: memory-mapped Arrow shared by all ranks; masks depend on (seed, epoch, index).
        self.data = data.load_prepared(cfg.data)
        self.tokenizer = _load_tokenizer(cfg.student)
        data.check_tokenizer_matches(self.data.meta, self.tokenizer, cfg.data)
        self.sampler = GlobalBatchSampler(self.data.lengths("train"), self.batch["global_batch"],
                                          self.batch["micro_batch"], dist_info.world_size, dist_info.rank,
                                          seed=cfg.train.seed)
        self.collator = MaskingCollator.from_prepared(self.data, self.tokenizer, seed=cfg.train.seed,
                                                      **dataclasses.asdict(cfg.masking))
        self.max_steps = cfg.train.max_steps or max(1, math.floor((cfg.train.epochs or 3) * self.sampler.steps_per_epoch))

        # -- Models: the student inside the engine, the teacher frozen beside it.
        self.device = _device(dist_info.local_rank)
        self.compute_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision, torch.float32)
        self.teacher = self._load_teacher()
        self.need_ce, self.need_cos = needed_terms(self.teacher, cfg.loss)
        self.resume_tag, resume_state = self._find_resume(checkpoint)
        self.engine = self._build_engine(resume_state)
        self.step, self.epoch, self.step_in_epoch = 0, 0, 0
        if self.resume_tag:
            self._resume(checkpoint, resume_state)
        elif cfg.train.seed is not None:
            torch.manual_seed(cfg.train.seed + dist_info.rank)

        from ds_distil.metrics import MetricsWriter

        self.step_fn = DistillStep(self.engine, self.teacher, self.cfg.loss, self.device, self.dist.world_size,
                                   self.batch["global_batch"])
        self.teacher_time = self.step_fn.teacher_time
        self.writer = MetricsWriter(self.out, self.engine.monitor, enabled=self.is_main, echo=self._echo)
        self._write_resolved_config()

    # ------------------------------------------------------------------ building

    def _load_teacher(self):
        from ds_distil.modeling import load_masked_lm
        from ds_distil.surgery import teacher_fingerprint

        if self.cfg.teacher is None:
            return None
        teacher = load_masked_lm(self.cfg.teacher, dtype=self.compute_dtype)
        teacher.eval().requires_grad_(False).to(self.device)
        student_cfg = _read_json(Path(self.cfg.student) / "config.json")
        problems = []
        if teacher.config.vocab_size != student_cfg.get("vocab_size"):
            problems.append(f"teacher {self.cfg.teacher} has vocab_size {teacher.config.vocab_size} but student "
                            f"{self.cfg.student} has {student_cfg.get('vocab_size')}: build the student from this "
                            "teacher with `ds-distil init-student`")
        student_width = student_cfg.get("dim", student_cfg.get("hidden_size"))
        if self.cfg.loss.alpha_cos > 0 and teacher.config.hidden_size != student_width:
            problems.append(f"teacher hidden size {teacher.config.hidden_size} != student {student_width}: L_cos "
                            "needs equal widths; set loss.alpha_cos=0 or use a student of the teacher's width")
        if problems:
            raise UserError(*problems)
        layer_map = Path(self.cfg.student) / "layer_map.json"
        if layer_map.is_file():
            recorded = _read_json(layer_map).get("teacher_fingerprint")
            if recorded and recorded != teacher_fingerprint(teacher):
                self._echo(f"warning: {self.cfg.student} was not built from teacher {self.cfg.teacher} "
                           "(fingerprints differ); distillation still runs but the initialisation is not the teacher's")
        return teacher

    def _find_resume(self, checkpoint):
        """Which checkpoint to resume from (None: fresh run), and its saved state."""
        cfg = self.cfg
        if cfg.resume == "never":
            if checkpoint.complete_tags(self.ckpt_root):
                raise UserError(f"{self.ckpt_root}: holds checkpoints but resume is \"never\"; choose another "
                                "output_dir or set resume=auto")
            return None, None
        if cfg.resume == "auto":
            tag = checkpoint.latest_complete(self.ckpt_root, warn=self._echo)
        else:
            path = Path(cfg.resume)
            self.ckpt_root, tag = (path, checkpoint.latest_complete(path, warn=self._echo)) \
                if (path / checkpoint.LATEST).exists() else (path.parent, path.name)
        if tag is None:
            return None, None
        return tag, checkpoint.read_state(self.ckpt_root, tag)

    def _build_engine(self, resume_state):
        import deepspeed

        from ds_distil import checkpoint, ds_config
        from ds_distil.modeling import StudentObjective, load_masked_lm

        student = load_masked_lm(self.cfg.student)
        model = StudentObjective(student, self.cfg.loss.temperature)
        # Every loss term and the throughput go to TensorBoard unless the JSON turns it off.
        with_monitor = {"tensorboard": {"enabled": True}, **self.ds_cfg}
        resolved = ds_config.resolve_run_values(with_monitor, total_steps=self.max_steps, output_dir=self.out,
                                                job_name="train", warmup_fraction=self.cfg.train.warmup_fraction,
                                                source=self.cfg.deepspeed_config)
        zero_stage = resolved.get("zero_optimization", {}).get("stage", 0)
        if resume_state and resume_state["world_size"] != self.dist.world_size and zero_stage > 0:
            # A ZeRO checkpoint only loads at the data-parallel size that wrote it; the
            # universal format loads at any size.
            self._echo(f"world size changed ({resume_state['world_size']} -> {self.dist.world_size}): "
                       "converting the checkpoint to DeepSpeed's universal format")
            if self.is_main:
                checkpoint.to_universal(self.ckpt_root, self.resume_tag)
            _barrier()
            self.resume_tag = f"{self.resume_tag}_universal"
            resolved.setdefault("checkpoint", {})["load_universal"] = True
        self.ds_resolved = resolved
        engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                        if p.requires_grad], config=resolved)
        if self.is_main:
            # What `ds-distil export` needs to rebuild the HF model around the weights.
            student.config.save_pretrained(self.ckpt_root / checkpoint.STUDENT_HF)
            self.tokenizer.save_pretrained(self.ckpt_root / checkpoint.STUDENT_HF)
        return engine

    def _resume(self, checkpoint, state):
        load_path, _ = self.engine.load_checkpoint(str(self.ckpt_root), tag=self.resume_tag)
        if load_path is None:
            raise UserError(f"{self.ckpt_root / self.resume_tag}: DeepSpeed could not load this checkpoint; "
                            "resume from another tag or start a fresh output_dir")
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        same_world = state["world_size"] == self.dist.world_size
        if not (same_world and checkpoint.restore_rng(self.ckpt_root, self.resume_tag.replace("_universal", ""),
                                                      self.dist.rank)):
            import torch

            torch.manual_seed(self.cfg.train.seed + self.dist.rank + self.step)
        self._echo(f"resumed from {self.ckpt_root / self.resume_tag} at step {self.step} "
                   f"(epoch {self.epoch}, step {self.step_in_epoch} of {self.sampler.steps_per_epoch})")

    def _write_resolved_config(self):
        if self.is_main:
            (self.out / "run_config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2))
            (self.out / "ds_config.json").write_text(json.dumps(self.ds_resolved, indent=2))
        b = self.batch
        self._echo(f"batch: {b['micro_batch']} sequences/micro-batch x {b['accumulation_steps']} accumulation "
                   f"x {self.dist.world_size} ranks = {b['global_batch']} sequences/step "
                   f"(<= {b['global_batch'] * self.data.meta['max_seq_len']:,} tokens); "
                   f"{self.sampler.steps_per_epoch} steps/epoch, {self.max_steps} steps; precision {self.precision}; "
                   f"teacher {'on' if self.teacher is not None else 'off (plain MLM)'}")

    # ------------------------------------------------------------------ the loop

    def fit(self) -> int:
        from ds_distil import checkpoint

        self._install_signal_handlers()
        batches = self._batches()
        totals = self._new_totals()
        last_log = time.perf_counter()
        progress = self._progress_bar()
        while self.step < self.max_steps:
            micro_batches = next(batches)
            self.step_fn(micro_batches, totals)
            self.step += 1
            progress.update(1)
            if self.step % self.cfg.train.log_interval == 0 or self.step == self.max_steps:
                self._log(totals, time.perf_counter() - last_log)
                totals, last_log = self._new_totals(), time.perf_counter()
            if self.cfg.train.eval_interval and self.step % self.cfg.train.eval_interval == 0:
                self.evaluate()
            stop = self._stop_requested()
            interval = self.cfg.train.checkpoint_interval
            if stop or self.step == self.max_steps or (interval and self.step % interval == 0):
                self.save(checkpoint)
            if stop:
                self._echo(f"stopping at step {self.step} on signal {stop}: checkpoint saved, exit {PREEMPTED_EXIT}")
                progress.close()
                return PREEMPTED_EXIT
        progress.close()
        if not self.cfg.train.eval_interval or self.step % self.cfg.train.eval_interval:
            self.evaluate()
        self.writer.close()
        return 0

    # ------------------------------------------------------------------ data

    def _batches(self):
        """This rank's micro-batches, a list per optimizer step, across epochs, from the resume point."""
        from ds_distil.data import make_train_loader

        accumulation = self.batch["accumulation_steps"]
        while True:
            loader = make_train_loader(self.data.train, self.sampler, self.collator, self.epoch,
                                       start_step=self.step_in_epoch, num_workers=self.cfg.train.num_workers)
            group = []
            for micro_batch in loader:
                group.append(micro_batch)
                if len(group) == accumulation:
                    self.step_in_epoch += 1
                    yield group
                    group = []
            self.epoch, self.step_in_epoch = self.epoch + 1, 0

    # ------------------------------------------------------------------ reporting

    def _new_totals(self) -> StepTotals:
        import torch

        return StepTotals(sums=torch.zeros(4, device=self.device), counts=torch.zeros(3, dtype=torch.float64))

    def _log(self, totals: StepTotals, seconds: float) -> None:
        from ds_distil.distributed import all_reduce_sum
        from ds_distil.metrics import peak_memory_gib

        sums = all_reduce_sum(totals.sums.clone()).double().cpu()  # the log step's host sync
        counts = totals.counts.clamp(min=1)
        values = {}
        terms = {"ce": (self.need_ce, 0), "mlm": (True, 1), "cos": (self.need_cos, 2)}
        alphas = {"ce": self.cfg.loss.alpha_ce, "mlm": self.cfg.loss.alpha_mlm, "cos": self.cfg.loss.alpha_cos}
        total = 0.0
        for term, (active, i) in terms.items():
            if active:
                values[f"loss_{term}"] = float(sums[i] / counts[i])
                total += alphas[term] * values[f"loss_{term}"]
        values = {"loss": total, **values, "mlm_accuracy": float(sums[3] / counts[1])}
        teacher_seconds = self.teacher_time.pop_seconds()
        grad_norm = self.engine.get_global_grad_norm()
        values.update(lr=self.engine.get_lr()[0], tokens_per_s=totals.tokens / seconds,
                      sequences_per_s=totals.sequences / seconds, teacher_share=teacher_seconds / seconds,
                      peak_mem_gib=peak_memory_gib(self.device), skipped_steps=self.engine.skipped_steps,
                      epoch=self.epoch)
        if grad_norm is not None:
            values["grad_norm"] = float(grad_norm)
        if self.precision == "fp16":
            values["loss_scale"] = float(self.engine._get_optimizer_loss_scale() or 0)
        self.writer.write("Train", self.step, values)

    def evaluate(self) -> dict:
        """Student MLM accuracy and perplexity on the validation split (fixed masks)."""
        import torch

        from ds_distil.data import make_eval_loader
        from ds_distil.distributed import all_reduce_sum

        self.engine.eval()
        sums = torch.zeros(3, dtype=torch.float64)
        loader = make_eval_loader(self.data.validation, self.collator, self.batch["micro_batch"],
                                  self.dist.world_size, self.dist.rank, num_workers=0)
        if self.cfg.train.eval_max_batches:
            loader = itertools.islice(loader, self.cfg.train.eval_max_batches)
        with torch.no_grad():
            for batch in loader:
                labels = batch["labels"]
                rows = batch["target_positions"]  # flat indices of the MLM targets, from the loader
                out = self.engine(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device),
                                  rows.to(self.device), labels.flatten()[rows].to(self.device))
                sums += torch.tensor([float(out["mlm"]), float(out["mlm_hits"]), len(rows)], dtype=torch.float64)
        self.engine.train()
        sums = all_reduce_sum(sums)
        n = max(sums[2].item(), 1)
        result = {"mlm_accuracy": sums[1].item() / n, "perplexity": math.exp(min(sums[0].item() / n, 50)),
                  "targets": int(sums[2].item())}
        self.writer.write("Eval", self.step, result)
        return result

    def save(self, checkpoint) -> None:
        state = {"step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                 "world_size": self.dist.world_size, "zero_stage": self.ds_resolved.get("zero_optimization", {}).get("stage", 0),
                 "run_config": self.cfg.to_dict(), "ds_config": self.ds_resolved, "time": time.time()}
        tag = checkpoint.save(self.engine, self.ckpt_root, self.step, state, self.cfg.train.keep_checkpoints,
                              self.dist.rank)
        self._echo(f"checkpoint {self.ckpt_root / tag}")

    def _progress_bar(self):
        from tqdm import tqdm

        # A bar only on a terminal: in batch logs it would interleave with the log lines.
        show = self.is_main and self.cfg.train.progress_bar and sys.stderr.isatty()
        return tqdm(total=self.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                    disable=not show, file=sys.stderr)

    def _echo(self, message: str) -> None:
        if self.is_main:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stdout)
            sys.stdout.flush()

    # ------------------------------------------------------------------ preemption

    def _install_signal_handlers(self) -> None:
        def request_stop(signum, _frame):
            self.stop_signal = signal.Signals(signum).name

        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, request_stop)

    def _stop_requested(self) -> str | None:
        """Agree across ranks: a signal seen by any rank stops every rank at this boundary."""
        import torch

        from ds_distil.distributed import all_reduce_sum

        flag = all_reduce_sum(torch.tensor([1.0 if self.stop_signal else 0.0]))
        if flag.item() > 0:
            return self.stop_signal or "SIGUSR1/SIGTERM (another rank)"
        return None


def needed_terms(teacher, loss_cfg) -> tuple[bool, bool]:
    """Whether L_ce and L_cos are computed (they need a teacher and a weight above 0)."""
    return teacher is not None and loss_cfg.alpha_ce > 0, teacher is not None and loss_cfg.alpha_cos > 0


class DistillStep:
    """One optimizer step: teacher forward, student forward/backward through the engine.

    Shared by the trainer and ``ds-distil bench``, so the benchmark measures exactly the
    step that training runs.
    """

    def __init__(self, engine, teacher, loss_cfg, device, world_size: int, global_batch: int):
        from ds_distil.losses import LossWeights
        from ds_distil.metrics import Stopwatch

        self.engine, self.teacher, self.device = engine, teacher, device
        self.world_size, self.global_batch = world_size, global_batch
        self.ce_positions = loss_cfg.ce_positions
        self.need_ce, self.need_cos = needed_terms(teacher, loss_cfg)
        self.weights = LossWeights(loss_cfg.alpha_ce, loss_cfg.alpha_mlm, loss_cfg.alpha_cos, loss_cfg.temperature)
        self.teacher_time = Stopwatch(device)

    def __call__(self, micro_batches, totals: StepTotals) -> None:
        """One optimizer step over this rank's micro-batches of the global batch."""
        import torch

        from ds_distil.distributed import all_reduce_sum
        from ds_distil.losses import weighted_total

        prepared = [self.prepare(mb) for mb in micro_batches]
        # Token counts of the global batch: every term is normalised by them, not by
        # per-rank means, so gradients do not depend on how the batch is split.
        counts = all_reduce_sum(torch.stack([p["counts"] for p in prepared]).sum(0))
        counts_dev = counts.to(self.device, non_blocking=True)
        global_counts = {"ce": counts_dev[0], "mlm": counts_dev[1], "cos": counts_dev[2]}
        for p in prepared:
            teacher_hidden, teacher_logits = self.teacher_outputs(p)
            sums = self.engine(p["input_ids"], p["attention_mask"], p["rows"], p["row_targets"],
                               teacher_hidden, teacher_logits)
            loss = weighted_total(sums, global_counts, self.weights)
            # DeepSpeed averages gradients over data-parallel ranks and (by default) divides
            # by the accumulation steps; our loss is already a global-batch mean.
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            self.engine.step()
            zero = loss.new_zeros((), dtype=torch.float32)
            totals.sums += torch.stack([sums.get("ce", zero).detach().float(), sums["mlm"].detach().float(),
                                        sums.get("cos", zero).detach().float(), sums["mlm_hits"].float()])
        totals.counts += counts
        totals.steps += 1
        totals.tokens += int(counts[2])
        totals.sequences += self.global_batch

    def prepare(self, batch: dict) -> dict:
        """Rows each head loss needs and the token counts, computed on the CPU (no device sync)."""
        import torch

        labels, mask = batch["labels"], batch["attention_mask"]
        targets = labels != -100
        select = mask.bool() if (self.need_ce and self.ce_positions == "all") else targets
        rows = select.flatten().nonzero().squeeze(1)
        counts = torch.tensor([int(select.sum()) if self.need_ce else 0, int(targets.sum()), int(mask.sum())],
                              dtype=torch.float64)
        to = dict(device=self.device, non_blocking=True)
        return {"input_ids": batch["input_ids"].to(**to), "attention_mask": mask.to(**to),
                "rows": rows.to(**to), "row_targets": labels.flatten()[rows].to(**to), "counts": counts}

    def teacher_outputs(self, p: dict):
        """The teacher's last hidden states and its logits at the loss rows, under inference mode."""
        import torch

        from ds_distil.modeling import encode, project

        if self.teacher is None:
            return None, None
        with self.teacher_time, torch.inference_mode():
            hidden = encode(self.teacher, p["input_ids"], p["attention_mask"])
            logits = project(self.teacher, hidden.reshape(-1, hidden.shape[-1]).index_select(0, p["rows"])) \
                if self.need_ce else None
        # Inference tensors cannot be saved for backward: hand the losses normal copies.
        return (hidden.clone() if self.need_cos else None), (logits.clone() if logits is not None else None)


def _device(local_rank: int):
    import torch
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        return torch.device("cpu")
    accelerator.set_device(local_rank)
    return torch.device(accelerator.device_name(local_rank))


def _barrier():
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: cannot read ({err})")


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: no tokenizer found ({str(err).splitlines()[0]}); the student directory "
                        "must hold the teacher's tokenizer files (ds-distil init-student copies them)")
