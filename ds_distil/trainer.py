"""``ds-distil train``: the student in a DeepSpeed engine, the teacher beside it, the step loop.

One code path for a single process and for N ranks under any launcher, and for both
objectives: masked LMs (BERT, RoBERTa: L_mlm at masked positions) and causal LMs (GPT-2,
Llama: L_clm, the next-token cross-entropy at every position that has a next token).
Only the collator differs (masking.make_collator); L_ce and L_cos are the same code.
Per optimizer step every rank:
  1. takes its ``accumulation_steps`` micro-batches of the global batch (batching.py);
  2. counts the tokens of each loss term over the whole global batch (one small
     all-reduce), so every term is a mean over the global batch however it is split;
  3. per micro-batch: teacher forward under inference mode (frozen, outside the engine),
     student forward + loss sums inside the engine, backward, ``engine.step()``.
Host syncs happen only on log steps, plus one small all-reduce per step for the guards.

Reliability guards (README, "Reliability"):
- a non-finite loss on any rank poisons the last micro-batch's loss on every rank (an
  all-reduce of a device flag, no host sync), so every rank's optimizer skips that step
  together and DeepSpeed counts it in ``skipped_steps``; ``train.max_consecutive_skips``
  skips in a row stop the run without saving over the last good checkpoint;
- SIGUSR1/SIGTERM (SLURM's warning) on any rank: every rank checkpoints at the next step
  boundary and exits with :data:`~ds_distil.distributed.EXIT_PREEMPTED` (75);
- a failed or timed-out collective (a rank died or hangs): the surviving ranks say which
  checkpoint to resume from and exit with :data:`EXIT_RANK_LOST`;
- every input is checked before a model loads (:func:`ds_distil.config.check_run`).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from ds_distil.config import RunConfig, check_run, describe
from ds_distil.distributed import EXIT_PREEMPTED  # 75: checkpointed on SIGUSR1/SIGTERM, requeue and resume
from ds_distil.errors import UserError

EXIT_NONFINITE = 3  # train.max_consecutive_skips steps in a row had a non-finite loss or gradient
EXIT_RANK_LOST = 4  # a collective failed or timed out: a rank died, hangs, or the network failed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="run config JSON (see --describe-config)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="overrides of the run config, e.g. train.max_steps=100 loss.alpha_cos=0")
    parser.add_argument("--describe-config", action="store_true", help="print every config key and exit")
    parser.add_argument("--check", action="store_true",
                        help="check the run config, DeepSpeed JSON, teacher/student pair, tokenizers, data and "
                             "checkpoint from their files (no model is loaded) and exit: 0 if the run can start, "
                             "2 with every problem listed")
    parser.add_argument("--world-size", type=int, default=None,
                        help="with --check: the number of ranks to check the batch arithmetic for "
                             "(default: the launcher's, 1 outside one)")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment wins.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)


def run(args) -> int:
    if args.describe_config:
        print(describe())
        return 0
    if not args.config and not args.overrides:
        raise UserError("no run config: pass --config RUN.json (see --describe-config)")
    world_size, local_rank = _launch_geometry(args.world_size)
    try:
        cfg = check_run(args.config, args.overrides, world_size)
    except UserError as err:
        # Every rank checks (a path may be missing on one node only), one rank per node reports.
        raise err if local_rank == 0 else UserError() from None
    if args.check:
        print(f"ds-distil train: {args.config or 'the command line'}: ok for {world_size} rank(s)")
        return 0
    return train(cfg)


def _launch_geometry(world_size: int | None) -> tuple[int, int]:
    """(world size, local rank) the launcher gives this process, without touching the environment."""
    from ds_distil.distributed import discover_launcher_env

    env = dict(os.environ)
    discover_launcher_env(env)
    if world_size is not None and world_size < 1:
        raise UserError(f"--world-size {world_size}: give the number of ranks (at least 1)")
    return world_size or int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])


def train(cfg: RunConfig) -> int:
    """Run (or resume) training; returns the process exit status."""
    from ds_distil.checkpoint import is_collective_error
    from ds_distil.distributed import PreemptionSignal, setup_distributed, teardown_distributed

    # DeepSpeed 0.19 calls torch collectives that torch 2.13 flags as deprecated, every step.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    # Installed before anything slow, so a signal during start-up is not lost either.
    preemption = PreemptionSignal((signal.SIGUSR1, signal.SIGTERM)).install()
    dist_info = setup_distributed(cfg.train.collective_timeout_s)
    _bound_every_group(cfg.train.collective_timeout_s)
    status = None
    try:
        status = Trainer(cfg, dist_info, preemption).fit()
        return status
    except Exception as err:
        if not is_collective_error(err):
            raise
        status = EXIT_RANK_LOST
        _report_rank_lost(dist_info.rank, "before training started", err, Path(cfg.output_dir) / "checkpoints")
        return status
    finally:
        preemption.uninstall()
        if status in (0, EXIT_NONFINITE, EXIT_PREEMPTED):
            teardown_distributed()  # every rank got here: the closing barrier is safe
        else:
            _abandon_process_group()


def _bound_every_group(timeout_s: float) -> None:
    """Give the process groups DeepSpeed creates later the collective timeout too.

    ``init_process_group`` applies the timeout to the default group only; DeepSpeed's
    data-parallel (and ZeRO) groups come from ``new_group()`` without one, which falls
    back to torch's 30-minute (gloo) / 10-minute (NCCL) default: a rank stuck in their
    collectives (the gradient-norm all-reduce) would wait that long for a dead peer.
    """
    from datetime import timedelta

    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timedelta(seconds=timeout_s)
    if hasattr(c10d, "default_pg_nccl_timeout"):
        c10d.default_pg_nccl_timeout = timedelta(seconds=timeout_s)


def _abandon_process_group() -> None:
    """Leave a process group whose peers may be dead: no barrier (it would wait for them)."""
    import torch.distributed as dist

    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - the group is broken; all that matters now is exiting
        pass
    time.sleep(0.5)  # gloo's threads race interpreter shutdown otherwise (see teardown_distributed)


def _report_rank_lost(rank: int, where: str, err: BaseException, ckpt_root: Path) -> None:
    """Every surviving rank says so on stderr (rank 0 may be the one that died)."""
    from ds_distil.checkpoint import latest_complete

    reason = _first_line(err).split(" This is typically caused")[0]
    last = latest_complete(ckpt_root, warn=lambda _: None)
    resume = f"restart the job to resume from {ckpt_root / last}" if last else \
        "restart the job (no complete checkpoint yet: it starts over)"
    print(f"ds-distil train: error: rank {rank}: lost contact with another rank {where}: a rank died, hangs or "
          f"the network failed; {resume} (the collective error: {reason})", file=sys.stderr, flush=True)


@dataclass
class StepTotals:
    """Device-side running sums between two log points (read only when logging).

    Steps skipped for a non-finite loss are left out of ``sums`` and ``counts`` (their
    losses would turn the interval's means into NaN) but counted in ``tokens``.
    """

    sums: object  # tensor [ce, mlm, cos, mlm_hits(, mse)]: this rank's loss sums
    counts: object  # tensor [ce, mlm, cos]: token counts of the global batch, float64
    steps: int = 0
    tokens: object = 0  # real tokens of the global batches (a device scalar once a step ran)
    sequences: int = 0

    @classmethod
    def zeros(cls, device, slots: int = 4) -> "StepTotals":
        import torch

        return cls(sums=torch.zeros(slots, device=device), counts=torch.zeros(3, dtype=torch.float64, device=device))


class Trainer:
    mfu = None  # the run's MFUMeter; FinetuneRun builds its own state and logs none

    def __init__(self, cfg: RunConfig, dist_info, preemption=None):
        import torch

        from ds_distil import checkpoint, data, ds_config
        from ds_distil.batching import GlobalBatchSampler
        from ds_distil.distributed import PreemptionSignal
        from ds_distil.masking import make_collator

        self.cfg, self.dist = cfg, dist_info
        self.is_main = dist_info.is_main
        self.out = Path(cfg.output_dir)
        self.ckpt_root = self.out / "checkpoints"  # where this run saves
        self.resume_root = self.ckpt_root  # where it resumes from (resume=PATH may name another run's)
        self.out.mkdir(parents=True, exist_ok=True)
        self.preemption = preemption or PreemptionSignal(signals=())
        self.faults = FaultInjection.from_env(dist_info.rank)
        if self.faults.active:
            print(f"ds-distil train: rank {dist_info.rank}: fault injection on: {self.faults}", file=sys.stderr)

        # -- DeepSpeed config and the batch arithmetic, derived once and printed.
        self.ds_cfg = ds_config.load_ds_config(cfg.deepspeed_config)
        self.batch = ds_config.batch_arithmetic(self.ds_cfg, dist_info.world_size, source=cfg.deepspeed_config)
        ds_config.validate_with_deepspeed(self.ds_cfg, dist_info.world_size, source=cfg.deepspeed_config)
        self.precision = ds_config.check_precision_supported(self.ds_cfg, cfg.deepspeed_config)

        # -- Data: memory-mapped Arrow shared by all ranks; masks depend on (seed, epoch, index).
        self.data = data.load_prepared(cfg.data)
        self.objective = check_objectives(cfg, self.data.meta)  # before any weights load
        self.tokenizer = _load_tokenizer(cfg.student)
        data.check_tokenizer_matches(self.data.meta, self.tokenizer, cfg.data)
        self.sampler = GlobalBatchSampler(self.data.lengths("train"), self.batch["global_batch"],
                                          self.batch["micro_batch"], dist_info.world_size, dist_info.rank,
                                          seed=cfg.train.seed)
        self.collator = make_collator(self.data, self.tokenizer, seed=cfg.train.seed,
                                      **dataclasses.asdict(cfg.masking))
        self.max_steps = cfg.train.max_steps or max(1, math.floor((cfg.train.epochs or 3) * self.sampler.steps_per_epoch))

        # -- Models: the student inside the engine, the teacher frozen beside it. The
        #    checkpoint is chosen first: a damaged one must fail before the slow loads.
        self.device = _device(dist_info.local_rank)
        self.compute_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision, torch.float32)
        self.resume_tag, resume_state = self._find_resume(checkpoint)
        self.teacher = self._load_teacher()
        self.need_ce, self.need_cos = needed_terms(self.teacher, cfg.loss)
        self.engine = self._build_engine(resume_state)
        skip_nonfinite_updates(self.engine)
        self.step, self.epoch, self.step_in_epoch = 0, 0, 0
        if self.resume_tag:
            self._resume(checkpoint, resume_state)
        elif cfg.train.seed is not None:
            torch.manual_seed(cfg.train.seed + dist_info.rank)
        if self.is_main:
            # What `ds-distil export` needs to rebuild the HF model around the weights; written
            # once the checkpoint loaded, so a refused resume never relabels a run's checkpoints.
            self.engine.module.student.config.save_pretrained(self.ckpt_root / checkpoint.STUDENT_HF)
            self.tokenizer.save_pretrained(self.ckpt_root / checkpoint.STUDENT_HF)

        from ds_distil.metrics import MetricsWriter

        self.step_fn = DistillStep(self.engine, self.teacher, self.cfg.loss, self.device, self.dist.world_size,
                                   self.batch["global_batch"], objective=self.objective)
        self.teacher_time = self.step_fn.teacher_time
        self.writer = MetricsWriter(self.out, self.engine.monitor, enabled=self.is_main, echo=self._echo)
        from ds_distil.metrics import mfu_meter

        self.mfu = mfu_meter(cfg, self.engine.module.student.config, getattr(self.teacher, "config", None),
                             self.data.meta, self.precision, self.device)
        self._echo(self.mfu.describe())
        self.skips = SkipTracker(self.engine, self.cfg.train.max_consecutive_skips, self._fp16_scaler_adapting,
                                 self.device)
        self._write_resolved_config()

    # ------------------------------------------------------------------ building

    def _load_teacher(self):
        from ds_distil.modeling import load_model
        from ds_distil.surgery import teacher_fingerprint

        if self.cfg.teacher is None:
            return None
        # Vocabulary, widths and tokenizers were compared from the config and tokenizer
        # files before anything loaded (config.check_run); the fingerprint needs weights.
        teacher = load_model(self.cfg.teacher, dtype=self.compute_dtype)
        teacher.eval().requires_grad_(False).to(self.device)
        layer_map = Path(self.cfg.student) / "layer_map.json"
        if layer_map.is_file():
            recorded = (_read_json(layer_map).get("teacher") or {}).get("fingerprint")
            if recorded and recorded != teacher_fingerprint(teacher):
                self._echo(f"warning: {self.cfg.student} was not built from teacher {self.cfg.teacher} (its "
                           f"{layer_map.name} records another teacher fingerprint); distillation still runs, but "
                           "the student does not start from this teacher's weights: rebuild it with "
                           f"`ds-distil init-student --teacher {self.cfg.teacher}` unless this is intended")
        return teacher

    def _find_resume(self, checkpoint):
        """Which checkpoint to resume from (None: fresh run), and its saved state.

        ``resume=auto`` falls back past incomplete or damaged checkpoints with a warning
        each; a checkpoint named explicitly must be complete.
        """
        cfg = self.cfg
        if cfg.resume == "never":
            if checkpoint.complete_tags(self.ckpt_root):
                raise UserError(f"{self.ckpt_root}: holds checkpoints but resume is \"never\"; choose another "
                                "output_dir or set resume=auto")
            return None, None
        if cfg.resume == "auto":
            tag = checkpoint.latest_complete(self.ckpt_root, warn=self._echo)
        else:
            self.resume_root, tag = checkpoint.resolve_resume(cfg.resume, warn=self._echo)
        if tag is None:
            return None, None
        return tag, checkpoint.read_state(self.resume_root, tag)

    def _build_engine(self, resume_state):
        import deepspeed

        from ds_distil import checkpoint, ds_config
        from ds_distil.modeling import StudentObjective, family, load_model

        student = load_model(self.cfg.student)
        if self.cfg.train.freeze_position_embeddings:
            # Refused in preflight for rotary students, so the table exists. A frozen tensor
            # is left out of the optimizer below and saved with the module's weights.
            family(student).position_embeddings(student).requires_grad_(False)
        model = StudentObjective(student, self.cfg.loss.temperature,
                                 mse=self.cfg.teacher is not None and self.cfg.loss.alpha_mse > 0)
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
                checkpoint.to_universal(self.resume_root, self.resume_tag)
            _barrier()
            self.resume_tag = f"{self.resume_tag}_universal"
            resolved.setdefault("checkpoint", {})["load_universal"] = True
        self.ds_resolved = resolved
        engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                        if p.requires_grad], config=resolved)
        return engine

    def _resume(self, checkpoint, state):
        where = self.resume_root / self.resume_tag
        try:
            load_path, _ = self.engine.load_checkpoint(str(self.resume_root), tag=self.resume_tag)
        except Exception as err:  # noqa: BLE001 - DeepSpeed raises anything from torch.load/pickle
            if checkpoint.is_collective_error(err):
                raise
            raise UserError(f"{where}: DeepSpeed could not load this checkpoint ({_first_line(err)}): if it was "
                            "written for another student or DeepSpeed config, choose another output_dir (the "
                            "checkpoint stays as it is); if it is damaged, move it away to resume from the "
                            "previous one")
        if load_path is None:
            raise UserError(f"{where}: DeepSpeed could not load this checkpoint; resume from another tag "
                            "or start a fresh output_dir")
        self.step, self.epoch, self.step_in_epoch = state["step"], state["epoch"], state["step_in_epoch"]
        same_world = state["world_size"] == self.dist.world_size
        if not (same_world and checkpoint.restore_rng(self.resume_root, self.resume_tag.replace("_universal", ""),
                                                      self.dist.rank)):
            import torch

            torch.manual_seed(self.cfg.train.seed + self.dist.rank + self.step)
        self._echo(f"resumed from {where} at step {self.step} "
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
                   f"{self.objective} LM; teacher "
                   f"{'on' if self.teacher is not None else f'off (plain {LM_TERM[self.objective].upper()})'}")

    # ------------------------------------------------------------------ the loop

    def fit(self) -> int:
        """Train to ``max_steps``; returns the exit status (0, 75 preempted, 3 or 4 on faults)."""
        from ds_distil import checkpoint

        slots = getattr(self.step_fn, "sum_slots", 4)  # fine-tuning's step keeps 4 sums
        batches, totals = self._batches(), StepTotals.zeros(self.device, slots)
        # transformers' from_pretrained hands the model over in eval mode: without this the
        # steps before the first evaluation would run with dropout off.
        self.engine.train()
        last_log = time.perf_counter()
        progress = self._progress_bar()
        try:
            while self.step < self.max_steps:
                self.step_fn(next(batches), totals, inject_nan=self.faults.nan_at(self.step + 1))
                self.step += 1
                progress.update(1)
                if self.skips.after_step(self.step, self._echo):
                    return self._stop_nonfinite()
                if self._due(self.cfg.train.log_interval) or self.step == self.max_steps:
                    self._log(totals, time.perf_counter() - last_log)
                    totals, last_log = StepTotals.zeros(self.device, slots), time.perf_counter()
                if self._due(self.cfg.train.eval_interval):
                    self.evaluate()
                preempted = self.preemption.requested()  # a collective: every rank agrees
                if preempted or self.step == self.max_steps or self._due(self.cfg.train.checkpoint_interval):
                    self.save()
                if preempted:
                    return self._stop_preempted()
            if not self._due(self.cfg.train.eval_interval):
                self.evaluate()
        except Exception as err:
            if not checkpoint.is_collective_error(err):
                raise
            return self._stop_rank_lost(err)
        finally:
            progress.close()
        self.writer.close()
        return 0

    def _due(self, interval: int) -> bool:
        return bool(interval) and self.step % interval == 0

    def _fp16_scaler_adapting(self) -> bool:
        """Under fp16 a skipped step is the dynamic loss scaler at work until its scale bottoms out."""
        if self.precision != "fp16":
            return False
        fp16 = self.ds_resolved.get("fp16", {})
        if fp16.get("loss_scale", 0) != 0:  # a static loss scale never adapts
            return False
        scale = self.engine._get_optimizer_loss_scale()
        return scale is not None and float(scale) > float(fp16.get("min_loss_scale", 1))

    # ------------------------------------------------------------------ stopping

    def _stop_nonfinite(self) -> int:
        """Too many skipped steps in a row: stop without saving, so the last checkpoint stays good."""
        from ds_distil import checkpoint

        last = checkpoint.latest_complete(self.ckpt_root, warn=lambda _: None)
        resume = f"the last good checkpoint {self.ckpt_root / last} is intact" if last else "no checkpoint yet"
        self.writer.close()
        if self.is_main:
            print(f"ds-distil train: error: {self.skips.consecutive} optimizer steps in a row (up to step "
                  f"{self.step}) had a non-finite loss or gradient on some rank and were skipped on every rank "
                  f"(train.max_consecutive_skips={self.skips.limit}): stopping without saving ({resume}); lower "
                  "the learning rate, raise the warmup or check the data, then rerun to resume",
                  file=sys.stderr, flush=True)
        return EXIT_NONFINITE

    def _stop_preempted(self) -> int:
        received = self.preemption.received
        name = signal.Signals(received).name if received else "a signal received by another rank"
        self._echo(f"stopping at step {self.step} on {name}: checkpoint saved, exit {EXIT_PREEMPTED}")
        self.writer.close()
        return EXIT_PREEMPTED

    def _stop_rank_lost(self, err: Exception) -> int:
        """A collective failed or timed out: say where to resume from."""
        _report_rank_lost(self.dist.rank, f"at step {self.step + 1}", err, self.ckpt_root)
        self.writer.close()
        return EXIT_RANK_LOST

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

    def _log(self, totals: StepTotals, seconds: float) -> None:
        from ds_distil.distributed import all_reduce_sum
        from ds_distil.metrics import peak_memory_gib

        self.skips.verify(self.step_fn.nonfinite_steps)
        sums = all_reduce_sum(totals.sums.clone()).double().cpu()  # the log step's host sync
        counts = totals.counts.cpu()
        values = self._loss_values(sums, counts) if counts[1] > 0 else {}  # {}: every step was skipped
        teacher_seconds = self.teacher_time.pop_seconds()
        grad_norm = self.engine.get_global_grad_norm()
        values.update(lr=self.engine.get_lr()[0], tokens_per_s=float(totals.tokens) / seconds,
                      sequences_per_s=totals.sequences / seconds, teacher_share=teacher_seconds / seconds,
                      peak_mem_gib=peak_memory_gib(self.device), skipped_steps=self.engine.skipped_steps,
                      epoch=self.epoch)
        if grad_norm is not None and math.isfinite(float(grad_norm)):
            values["grad_norm"] = float(grad_norm)
        if self.precision == "fp16":
            values["loss_scale"] = float(self.engine._get_optimizer_loss_scale() or 0)
        if self.mfu is not None:
            values.update(self.mfu(float(totals.tokens), seconds, self.dist.world_size))
        self.writer.write("Train", self.step, values)

    def _loss_values(self, sums, counts) -> dict:
        """Each active term's mean over its tokens, the weighted total and the LM accuracy
        (``loss_mlm``/``mlm_accuracy``, or ``loss_clm``/``clm_accuracy`` for a causal LM)."""
        values, total = {}, 0.0
        lm = LM_TERM[self.objective]
        # term: (computed, index into sums, index into counts, weight); L_mse shares L_ce's rows.
        terms = {"ce": (self.need_ce, 0, 0, self.cfg.loss.alpha_ce), lm: (True, 1, 1, self.step_fn.weights.alpha_mlm),
                 "cos": (self.need_cos, 2, 2, self.cfg.loss.alpha_cos),
                 "mse": (self.step_fn.need_mse, 4, 0, self.cfg.loss.alpha_mse)}
        for term, (active, i, c, alpha) in terms.items():
            if active:
                values[f"loss_{term}"] = float(sums[i] / counts[c].clamp(min=1))
                total += alpha * values[f"loss_{term}"]
        return {"loss": total, **values, f"{lm}_accuracy": float(sums[3] / counts[1])}

    def evaluate(self) -> dict:
        """Student accuracy and perplexity per target token on the validation split.

        Masked LMs: at fixed masks. Causal LMs: next-token prediction at every position of
        every held-out sequence; each prepared sequence is its own window (no overlap, no
        stride: a token's context is the sequence before it, not the preceding sequence).
        """
        import torch

        from ds_distil.data import make_eval_loader
        from ds_distil.distributed import all_reduce_sum

        self.engine.eval()
        # On the device: NCCL reduces device tensors only (and reading each batch's loss
        # on the host would sync every batch).
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
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
                sums[0] += out["mlm"].detach().double()
                sums[1] += out["mlm_hits"].double()
                sums[2] += len(rows)
        self.engine.train()
        sums = all_reduce_sum(sums).cpu()
        n = max(sums[2].item(), 1)
        result = {f"{LM_TERM[self.objective]}_accuracy": sums[1].item() / n,
                  "perplexity": math.exp(min(sums[0].item() / n, 50)), "targets": int(sums[2].item())}
        self.writer.write("Eval", self.step, result)
        return result

    def save(self) -> None:
        from ds_distil import checkpoint

        # Never mark a checkpoint complete over weights that took a non-finite update.
        self.skips.verify(self.step_fn.nonfinite_steps)
        state = {"step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                 "world_size": self.dist.world_size, "zero_stage": self.ds_resolved.get("zero_optimization", {}).get("stage", 0),
                 "run_config": self.cfg.to_dict(), "ds_config": self.ds_resolved, "time": time.time()}
        tag = checkpoint.save(self.engine, self.ckpt_root, self.step, state, self.cfg.train.keep_checkpoints,
                              self.dist.rank, before_marking=self.faults.kill_in_save(self.step))
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


# The name of the language-model term: masked (L_mlm) or causal (L_clm, the reference's alpha_clm).
LM_TERM = {"masked": "mlm", "causal": "clm"}


def check_objectives(cfg: RunConfig, meta: dict) -> str:
    """The objective of the run (``"masked"`` or ``"causal"``), once the student, the teacher
    and the data agree on it; read from config.json and meta.json, before any weights load."""
    from ds_distil.masking import objective_of
    from ds_distil.modeling import model_objective

    student = model_objective(cfg.student)
    data = objective_of(meta)
    if cfg.teacher is not None and model_objective(cfg.teacher) != student:
        raise UserError(f"teacher: {cfg.teacher} is a {model_objective(cfg.teacher)} LM but student {cfg.student} is "
                        f"a {student} LM: distillation needs one objective; build the student from this teacher: "
                        f"ds-distil init-student --teacher {cfg.teacher}")
    if data != student:
        raise UserError(f"data: {cfg.data} was prepared for a {data} LM (meta.json) but student {cfg.student} is a "
                        f"{student} LM: prepare the corpus with the student's own directory as --tokenizer")
    return student


def needed_terms(teacher, loss_cfg) -> tuple[bool, bool]:
    """Whether L_ce (the teacher's logits) and L_cos are computed: they need a teacher and a
    weight above 0 (L_mse needs the teacher's logits too, at L_ce's rows)."""
    logits = teacher is not None and (loss_cfg.alpha_ce > 0 or getattr(loss_cfg, "alpha_mse", 0) > 0)
    return logits, teacher is not None and loss_cfg.alpha_cos > 0


class DistillStep:
    """One optimizer step: teacher forward, student forward/backward through the engine.

    Shared by the trainer and ``ds-distil bench``, so the benchmark measures exactly the
    step that training runs.
    """

    def __init__(self, engine, teacher, loss_cfg, device, world_size: int, global_batch: int,
                 objective: str = "masked"):
        import torch

        from ds_distil.losses import LossWeights
        from ds_distil.metrics import Stopwatch

        self.engine, self.teacher, self.device = engine, teacher, device
        self.world_size, self.global_batch = world_size, global_batch
        self.ce_positions = loss_cfg.ce_positions
        self.need_ce, self.need_cos = needed_terms(teacher, loss_cfg)
        # The LM term is L_mlm (masked positions) or L_clm (next tokens): the same cross-entropy
        # over the rows that have a target, weighted by alpha_mlm or alpha_clm.
        lm_weight = loss_cfg.alpha_clm if objective == "causal" else loss_cfg.alpha_mlm
        self.need_mse = teacher is not None and loss_cfg.alpha_mse > 0
        self.weights = LossWeights(loss_cfg.alpha_ce, lm_weight, loss_cfg.alpha_cos, loss_cfg.temperature,
                                   loss_cfg.alpha_mse if self.need_mse else 0.0)
        # Running sums [ce, lm, cos, lm_hits] and, with L_mse, [mse]: a StepTotals of this size.
        self.sum_slots = 5 if self.need_mse else 4
        self.teacher_time = Stopwatch(device)
        # Steps whose loss was non-finite on some rank (a device counter, read on log steps).
        self.nonfinite_steps = torch.zeros((), dtype=torch.int64, device=device)

    def __call__(self, micro_batches, totals: StepTotals, inject_nan: bool = False) -> None:
        """One optimizer step over this rank's micro-batches of the global batch.

        ``inject_nan`` (fault-injection tests only) makes this rank's loss NaN.
        """
        import torch

        from ds_distil.distributed import all_reduce_sum
        from ds_distil.losses import weighted_total

        prepared = [self.prepare(mb) for mb in micro_batches]
        # Token counts of the global batch: every term is normalised by them, not by
        # per-rank means, so gradients do not depend on how the batch is split. Reduced on
        # the device: NCCL cannot reduce host tensors, and the reduce does not sync the host.
        counts = all_reduce_sum(torch.stack([p["counts"] for p in prepared]).sum(0).to(self.device))
        global_counts = {"ce": counts[0], "mlm": counts[1], "cos": counts[2], "mse": counts[0]}
        step_sums = torch.zeros(self.sum_slots, device=self.device)
        nonfinite = torch.zeros(1, device=self.device)
        for i, p in enumerate(prepared):
            teacher_hidden, teacher_logits = self.teacher_outputs(p)
            sums = self.engine(p["input_ids"], p["attention_mask"], p["rows"], p["row_targets"],
                               teacher_hidden, teacher_logits)
            loss = weighted_total(sums, global_counts, self.weights)
            if inject_nan:
                loss = loss * float("nan")
            nonfinite += (~torch.isfinite(loss.detach())).float()
            if i == len(prepared) - 1:
                loss = self.skip_together(loss, nonfinite)
            # DeepSpeed averages gradients over data-parallel ranks and (by default) divides
            # by the accumulation steps; our loss is already a global-batch mean.
            self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            self.engine.step()
            zero = loss.new_zeros((), dtype=torch.float32)
            parts = [sums.get("ce", zero), sums["mlm"], sums.get("cos", zero), sums["mlm_hits"]]
            parts += [sums["mse"]] if self.need_mse else []
            step_sums += torch.stack([part.detach().float() for part in parts])
        # A skipped step stays out of the loss means (its sums are NaN); no host sync here.
        kept = (nonfinite == 0)
        totals.sums += torch.where(kept, step_sums, 0.0).to(totals.sums.device)
        totals.counts += torch.where(kept, counts, 0.0).to(totals.counts.device)
        self.nonfinite_steps += (~kept).long().squeeze(0)
        totals.steps += 1
        totals.tokens = totals.tokens + counts[2]
        totals.sequences += self.global_batch

    def skip_together(self, loss, nonfinite):
        """``loss``, made NaN on every rank if any rank's loss was non-finite in this step.

        Called before the step's last backward: the all-reduce of the flag is a device
        collective (no host sync). Multiplying by 1.0 leaves a healthy step bit-identical;
        multiplying by NaN turns every rank's gradients non-finite, so every rank's
        optimizer skips the step (DeepSpeed's overflow check, or skip_nonfinite_updates).
        """
        import torch

        from ds_distil.distributed import all_reduce_sum

        all_reduce_sum(nonfinite)
        poison = torch.where(nonfinite > 0, torch.full_like(nonfinite, float("nan")), torch.ones_like(nonfinite))
        return loss * poison.squeeze(0).to(loss.dtype)

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


# ---------------------------------------------------------------------------- non-finite steps

def skip_nonfinite_updates(engine) -> None:
    """Make a bare torch optimizer skip steps whose gradients are not finite, as DeepSpeed's do.

    DeepSpeed 0.19.8 checks gradients in its fp16/bf16 wrappers and ZeRO optimizers (the
    step is skipped, the gradients zeroed, ``engine.skipped_steps`` counted, the LR
    schedule held), but fp32 without ZeRO runs the bare torch optimizer, which would
    write NaN into every weight. Its ``step`` is wrapped to report ``overflow`` the way
    DeepSpeed's wrappers do, so the engine handles the skip exactly as it does for them.
    Gradients are all-reduced before ``step``, so every rank decides the same.
    """
    import torch

    optimizer = engine.optimizer
    if optimizer is None or hasattr(optimizer, "overflow"):
        return  # a DeepSpeed wrapper: it checks for itself
    unguarded_step = optimizer.step

    def step(*args, **kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        optimizer.overflow = not finite
        return unguarded_step(*args, **kwargs) if finite else None

    optimizer.overflow = False
    optimizer.step = step


class SkipTracker:
    """Counts skipped optimizer steps in a row and stops the run after ``limit`` of them.

    DeepSpeed counts skips in ``engine.skipped_steps`` (a host integer, free to read).
    Every rank sees the same count, so every rank stops at the same step.
    """

    def __init__(self, engine, limit: int, scaler_adapting, device):
        self.engine, self.limit, self.scaler_adapting, self.device = engine, limit, scaler_adapting, device
        self.seen = engine.skipped_steps
        self.at_start = engine.skipped_steps
        self.consecutive = 0

    def after_step(self, step: int, echo) -> bool:
        """Record ``step``; True when the run must stop."""
        skipped = self.engine.skipped_steps > self.seen
        self.seen = self.engine.skipped_steps
        if not skipped:
            self.consecutive = 0
            return False
        if self.scaler_adapting():
            return False  # fp16: the loss scaler lowered its scale and tries again (DeepSpeed logs it)
        self.consecutive += 1
        echo(f"step {step} skipped on every rank: non-finite loss or gradient ({self.consecutive} in a row; "
             f"the run stops at {self.limit})")
        return self.consecutive >= self.limit

    def verify(self, nonfinite_steps) -> None:
        """Fail loudly if a step with a non-finite loss was applied, or if the ranks disagree
        on what was skipped (their replicas would have diverged). A host sync and a
        collective: called on log steps and before saves, at the same step on every rank."""
        import torch
        import torch.distributed as dist

        poisoned, skipped = int(nonfinite_steps), self.engine.skipped_steps - self.at_start
        if poisoned > skipped:
            raise RuntimeError(f"{poisoned} step(s) had a non-finite loss but DeepSpeed skipped only {skipped}: "
                               "the optimizer applied non-finite gradients (is an overflow check disabled in "
                               "the DeepSpeed JSON?); the weights are not trustworthy, resume from the last "
                               "checkpoint")
        if dist.is_initialized() and dist.get_world_size() > 1:
            extremes = torch.tensor([skipped, -skipped], dtype=torch.float64, device=self.device)
            dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
            if extremes[0].item() != -extremes[1].item():
                raise RuntimeError(f"the ranks skipped between {-extremes[1].item():.0f} and {extremes[0].item():.0f} "
                                   "steps: their model replicas have diverged; resume from the last checkpoint")


# ---------------------------------------------------------------------------- fault injection

@dataclass(frozen=True)
class FaultInjection:
    """The fault-injection hook of the reliability tests, read from the environment here only.

    Unset in every normal run. Each variable holds ``STEPS[:rankR]``: comma-separated
    optimizer steps (1-based) or ranges ``a-b``; without ``:rankR`` it applies to every rank.

    - ``DS_DISTIL_FAULT_NAN_STEPS``: the loss of those steps becomes NaN on that rank;
    - ``DS_DISTIL_FAULT_KILL_IN_SAVE``: that rank SIGKILLs itself while saving the
      checkpoint of that step, after its files are written and before the checkpoint is
      marked complete (a crash mid-save).
    """

    nan_steps: frozenset = frozenset()
    kill_in_save_steps: frozenset = frozenset()

    VARIABLES = {"nan_steps": "DS_DISTIL_FAULT_NAN_STEPS", "kill_in_save_steps": "DS_DISTIL_FAULT_KILL_IN_SAVE"}

    @classmethod
    def from_env(cls, rank: int, environ=None) -> "FaultInjection":
        env = os.environ if environ is None else environ
        values = {field: _fault_steps(env[var], var, rank) for field, var in cls.VARIABLES.items() if env.get(var)}
        return cls(**values)

    @property
    def active(self) -> bool:
        return bool(self.nan_steps or self.kill_in_save_steps)

    def nan_at(self, step: int) -> bool:
        return step in self.nan_steps

    def kill_in_save(self, step: int):
        """The callback that kills this process mid-save at ``step``, or None."""
        if step not in self.kill_in_save_steps:
            return None
        return lambda: os.kill(os.getpid(), signal.SIGKILL)


def _fault_steps(text: str, variable: str, rank: int) -> frozenset:
    """Parse ``STEPS[:rankR]`` for this rank (an empty set when it names another rank)."""
    steps_text, _, rank_text = text.partition(":")
    try:
        if rank_text and int(rank_text.removeprefix("rank")) != rank:
            return frozenset()
        steps = set()
        for part in steps_text.split(","):
            first, _, last = part.strip().partition("-")
            steps.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise UserError(f"{variable}={text!r}: expected STEPS[:rankR], e.g. \"3,5-6:rank1\"") from None
    return frozenset(steps)


# ---------------------------------------------------------------------------- helpers

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


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


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
