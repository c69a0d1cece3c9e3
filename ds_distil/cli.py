"""The ``ds-distil`` command: one subcommand per workflow.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int`` and imports torch & co. only inside ``run``, so that ``--help``
and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ds_distil import __version__
from ds_distil.errors import UserError

# (name, module, one-line help). A subcommand is listed here once it really works.
SUBCOMMANDS = [
    ("init-student", "ds_distil.surgery", "build a half-depth student from a teacher (HF directory)"),
    ("prepare", "ds_distil.data", "tokenise a corpus into a memory-mapped dataset with a held-out split"),
    ("train", "ds_distil.trainer", "distil (or MLM-pretrain) with DeepSpeed; resumes automatically"),
    ("finetune", "ds_distil.finetune", "fine-tune models on GLUE or custom tasks and compare them (median of seeds)"),
    ("export", "ds_distil.checkpoint", "write a checkpoint's student as a Hugging Face model (fp32, safetensors)"),
    ("bench", "ds_distil.bench", "benchmark the distillation step against the reference formulation"),
    ("hostfile", "ds_distil.hostfile", "check a DeepSpeed hostfile, or write one from a SLURM allocation"),
    ("demo", "ds_distil.demo", "the end-to-end demo: teacher, distilled student, baseline, summary"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ds-distil",
        description="Knowledge distillation of BERT-style models on DeepSpeed (the DistilBERT recipe).",
    )
    parser.add_argument("--version", action="version", version=f"ds-distil {__version__}")
    # `deepspeed ... ds-distil train ...` inserts --local_rank=N right after the script;
    # the rank comes from LOCAL_RANK in the environment, so the flag is only accepted.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name, help_text in SUBCOMMANDS:
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip())
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args._module.run(args) or 0)
    except UserError as err:
        for problem in err.problems:
            print(f"ds-distil {args.command}: error: {problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ds-distil {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
