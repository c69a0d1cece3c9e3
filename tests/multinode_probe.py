"""Per-rank checksums of the teacher and the student around a real ``Trainer.fit()``.

Run on every rank by a launcher (the deepspeed launcher adds ``--local_rank``)::

    deepspeed --num_gpus 2 tests/multinode_probe.py RUN.json OUT_DIR

Each rank builds the trainer exactly as ``ds-distil train`` does
(``Trainer(cfg, setup_distributed())``), hashes every teacher tensor and every student
parameter it holds, trains to ``train.max_steps``, hashes them again and writes
``OUT_DIR/rank<N>.json``. Under ZeRO stages 1 and 2 every rank holds the whole student
module (only optimizer state and gradients are partitioned), so after each step all
ranks must hold the same bytes; the teacher is frozen, so it must never change.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path


def tensor_sha256(tensor) -> str:
    """sha256 of a tensor's raw bytes (dtype and shape included, so a cast is a change)."""
    import torch

    flat = tensor.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.sha256(f"{flat.dtype}{tuple(tensor.shape)}".encode())
    digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def checksums(named_tensors) -> dict[str, str]:
    return {name: tensor_sha256(t) for name, t in named_tensors}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="run config JSON, as `ds-distil train --config` takes it")
    p.add_argument("out", help="directory for rank<N>.json")
    p.add_argument("--local_rank", type=int, default=None, help="added by the deepspeed launcher")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    from ds_distil.config import load_run_config
    from ds_distil.distributed import setup_distributed, teardown_distributed
    from ds_distil.trainer import Trainer

    info = setup_distributed(timeout_s=120)
    try:
        trainer = Trainer(load_run_config(args.config), info)
        student = trainer.engine.module.student
        record = {"rank": info.rank, "world_size": info.world_size, "launcher": info.launcher,
                  "zero_stage": trainer.engine.zero_optimization_stage(),
                  "student_dtype": str(next(student.parameters()).dtype),
                  "teacher_dtype": str(next(trainer.teacher.parameters()).dtype),
                  "teacher_before": checksums(trainer.teacher.state_dict().items()),
                  "student_before": checksums(student.named_parameters())}
        record["exit"] = trainer.fit()
        record.update(step=trainer.step, teacher_after=checksums(trainer.teacher.state_dict().items()),
                      student_after=checksums(student.named_parameters()))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{info.rank}.json").write_text(json.dumps(record, indent=1, sort_keys=True))
    finally:
        teardown_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
