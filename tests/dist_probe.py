"""A stand-in for ``ds-distil train`` under the real launchers (deepspeed, mpirun, srun).

It takes the trainer's command line (``--config RUN.json``, ``key=value`` overrides,
``--local_rank`` as the deepspeed launcher adds it), sets up the process group through
:func:`ds_distil.distributed.setup_distributed`, checks an all-reduce, and appends one
JSON line per rank to ``ranks.jsonl`` in the output directory (``--out`` or
``$DS_DISTIL_PROBE_DIR``). Tests read those lines to see where each rank ran.

Optional behaviour, chosen by flags or by environment (so that sbatch scripts that pass
only the trainer's arguments can switch it on):

- ``--engine-steps N`` / ``DS_DISTIL_PROBE_ENGINE_STEPS``: train a tiny model for N
  optimizer steps with DeepSpeed and the ``deepspeed_config=`` override, recording the
  batch arithmetic and the learning rate after each step;
- ``--preempt`` / ``DS_DISTIL_PROBE_PREEMPT=1``: behave like the trainer at the end of a
  SLURM time slot: wait for SIGUSR1, agree on it across ranks, write a marker line and
  exit 75; when restarted by a requeue (``SLURM_RESTART_COUNT`` >= 1) record that and
  finish at once.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

from ds_distil.distributed import (EXIT_PREEMPTED, PreemptionSignal, all_reduce_sum,
                                   setup_distributed, teardown_distributed)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="the run config, as `ds-distil train --config` takes it")
    p.add_argument("--local_rank", type=int, default=None, help="added by the deepspeed launcher")
    p.add_argument("--out", default=os.environ.get("DS_DISTIL_PROBE_DIR"),
                   help="directory for ranks.jsonl (default: $DS_DISTIL_PROBE_DIR)")
    p.add_argument("--preempt", action="store_true",
                   default=os.environ.get("DS_DISTIL_PROBE_PREEMPT") == "1")
    p.add_argument("--engine-steps", type=int,
                   default=int(os.environ.get("DS_DISTIL_PROBE_ENGINE_STEPS", "0")))
    p.add_argument("--wait-signal-s", type=float, default=90.0,
                   help="in --preempt mode, give up (exit 1) after this long without SIGUSR1")
    p.add_argument("overrides", nargs="*", help="key=value, as `ds-distil train` takes them")
    args = p.parse_args(argv)
    if not args.out:
        p.error("give --out DIR or set DS_DISTIL_PROBE_DIR")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        p.error(f"overrides must be key=value, got {bad}")
    args.overrides = dict(o.split("=", 1) for o in args.overrides)
    return args


def append_record(out_dir: Path, record: dict) -> None:
    """One os.write on an O_APPEND file: lines from concurrent ranks never interleave."""
    out_dir.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(out_dir / "ranks.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def node_rank() -> int | None:
    """The node index the launcher gave this rank (deepspeed: CROSS_RANK; SLURM: SLURM_NODEID)."""
    for key in ("CROSS_RANK", "SLURM_NODEID", "OMPI_COMM_WORLD_NODE_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return None


def base_record(info, args, event: str) -> dict:
    env = os.environ
    return {
        "event": event,
        "rank": info.rank, "local_rank": info.local_rank, "world_size": info.world_size,
        "launcher": info.launcher, "hostname": socket.gethostname(),
        # Fake SLURM nodes share one host name; the node name tells them apart.
        "node": env.get("SLURMD_NODENAME", socket.gethostname()),
        "node_rank": node_rank(), "pid": os.getpid(),
        "local_rank_arg": args.local_rank, "config": args.config, "overrides": args.overrides,
        "restart_count": int(env.get("SLURM_RESTART_COUNT", "0")),
        "via_ssh": "SSH_CONNECTION" in env,
        "master": f"{env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')}",
        "env": {k: env.get(k) for k in ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "GLOO_SOCKET_IFNAME")},
        # Anything the test wants to see forwarded to the ranks.
        "probe_env": {k: v for k, v in env.items() if k.startswith("DS_DISTIL_PROBE_TAG")},
    }


def train_tiny_engine(ds_config_path: str, steps: int, out_dir: Path, world_size: int) -> dict:
    """A few optimizer steps of a tiny embedding model with the given DeepSpeed config.

    Exercises what the trainer will do with a shipped config: load and check it, derive
    the batch arithmetic, resolve the "auto" schedule and the monitor path, call
    engine.backward/step on every micro-batch and write a metric to the monitor.
    """
    import deepspeed
    import torch
    import torch.nn.functional as F

    from ds_distil.ds_config import (batch_arithmetic, check_precision_supported, load_ds_config,
                                     resolve_run_values)

    cfg = load_ds_config(ds_config_path)
    prec = check_precision_supported(cfg, ds_config_path)
    batch = batch_arithmetic(cfg, world_size, ds_config_path)
    cfg = resolve_run_values(cfg, total_steps=steps, output_dir=out_dir, job_name="probe",
                             source=ds_config_path)
    vocab = 32
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(vocab, 16), torch.nn.Linear(16, vocab))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    gen = torch.Generator().manual_seed(1000 + engine.global_rank)
    lrs, losses = [], []
    for step in range(steps):
        for _ in range(batch["accumulation_steps"]):
            tokens = torch.randint(0, vocab, (batch["micro_batch"], 8), generator=gen)
            logits = engine(tokens).float()
            loss = F.cross_entropy(logits.reshape(-1, vocab), tokens.reshape(-1))
            engine.backward(loss)
            engine.step()
        lrs.append(engine.get_lr()[0])
        losses.append(loss.item())
        engine.monitor.write_events([("probe/loss", losses[-1], step + 1)])
    return {"precision": prec, "batch": batch, "engine_accumulation": engine.gradient_accumulation_steps(),
            "engine_micro_batch": engine.train_micro_batch_size_per_gpu(), "lrs": lrs, "losses": losses,
            "scheduler": cfg["scheduler"]["params"], "tensorboard": cfg.get("tensorboard")}


def wait_for_preemption(watch: PreemptionSignal, timeout_s: float) -> bool:
    """Poll the agreed flag like a trainer at step boundaries; False on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if watch.requested():
            return True
        time.sleep(0.1)
    return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out_dir = Path(args.out)
    restarted = int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0
    # Before anything slow: a USR1 arriving during set-up must not kill the rank.
    watch = PreemptionSignal().install() if args.preempt and not restarted else None

    import torch

    info = setup_distributed(timeout_s=60)
    total = all_reduce_sum(torch.ones(1)).item()
    record = base_record(info, args, "restarted" if restarted else "started")
    record["all_reduce_sum"] = total
    if total != info.world_size:
        record["error"] = f"all_reduce gave {total}, expected {info.world_size}"
    if args.engine_steps:
        record["engine"] = train_tiny_engine(args.overrides["deepspeed_config"], args.engine_steps,
                                             out_dir, info.world_size)
    append_record(out_dir, record)

    rc = 0 if "error" not in record else 1
    if watch is not None:
        if wait_for_preemption(watch, args.wait_signal_s):
            # Here the trainer saves its checkpoint (a collective) before exiting.
            append_record(out_dir, {**base_record(info, args, "preempted"), "signal": watch.received})
            rc = EXIT_PREEMPTED
        else:
            append_record(out_dir, base_record(info, args, "no-signal"))
            rc = 1
    teardown_distributed()
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
