"""Checkpoints: atomic save, keep-last-K, exact resume, and export to Hugging Face format.

Layout under ``<output_dir>/checkpoints``::

    global_step500/            DeepSpeed's files (all ranks write their shards)
        rng_rank0.pt ...       each rank's RNG states (dropout), ds-distil's own format
        ds_distil_state.json   written LAST, by rank 0, after every rank finished: the
                               run state plus a manifest (name and size of every file
                               of the tag); its presence is what makes the checkpoint
                               complete
    latest                     the newest complete tag, replaced atomically
    student_hf/                the student's HF config + tokenizer (for export)

A save that dies half-way leaves a tag without ``ds_distil_state.json``; ``latest`` still
names the previous complete tag, and resume skips the incomplete one. A file damaged
after the save (truncated by a full disk or a copy, a garbage state file) no longer
matches the manifest: resume warns and falls back to the newest tag that does.
A save that fails (disk full, quota) raises :class:`CheckpointWriteError` naming the
directory; the previous checkpoint and ``latest`` are untouched.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ds_distil.errors import UserError

STATE_FILE = "ds_distil_state.json"
LATEST = "latest"
STUDENT_HF = "student_hf"
_TAG_RE = re.compile(r"^global_step(\d+)$")


def tag_for(step: int) -> str:
    return f"global_step{step}"


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, quota, permissions): nothing was marked complete."""


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the mode any file the user creates gets.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def manifest(tag_dir: Path) -> dict[str, int]:
    """Every file of a checkpoint tag (but the state file) and its size in bytes."""
    tag_dir = Path(tag_dir)
    return {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
            if p.is_file() and p.name != STATE_FILE}


def problem(root: Path, tag: str) -> str | None:
    """Why ``root/tag`` cannot be resumed from, or None if it is a complete checkpoint.

    Complete means: the state file exists, parses, and every file its manifest lists is
    there with the recorded size (checkpoints written before manifests existed are
    trusted on the state file alone).
    """
    tag_dir = Path(root) / tag
    state_file = tag_dir / STATE_FILE
    if not state_file.is_file():
        return f"no {STATE_FILE}: the save was interrupted"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{STATE_FILE} is unreadable ({err})"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return f"{STATE_FILE} is not a ds-distil checkpoint state"
    for name, size in (state.get("files") or {}).items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the save wrote {size} (truncated or damaged)"
    return None


def is_complete(root: Path, tag: str) -> bool:
    return problem(root, tag) is None


def _tag_dirs(root: Path) -> list[tuple[int, str]]:
    """(step, tag) of every global_stepN directory under ``root``, oldest first."""
    if not Path(root).is_dir():
        return []
    found = [(int(m.group(1)), d.name) for d in Path(root).iterdir()
             if (m := _TAG_RE.match(d.name)) and d.is_dir()]
    return sorted(found)


def complete_tags(root: Path) -> list[str]:
    """Complete checkpoint tags under ``root``, oldest first."""
    return [tag for _, tag in _tag_dirs(root) if is_complete(root, tag)]


def latest_complete(root: Path, warn=print) -> str | None:
    """The tag to resume from: the one ``latest`` names if complete, else the newest complete tag.

    Every newer tag passed over is named in a warning with the reason (an interrupted
    save, a damaged file), so a fallback is never silent.
    """
    root = Path(root)
    latest_file = root / LATEST
    named = latest_file.read_text(errors="replace").strip() if latest_file.is_file() else None
    chosen = named if named and _TAG_RE.match(named) and is_complete(root, named) else None
    for _, tag in reversed(_tag_dirs(root)):
        if tag == chosen:
            break
        reason = problem(root, tag)
        if reason is None and chosen is None:
            chosen = tag
            break
        warn(f"warning: skipping checkpoint {root / tag}: " +
             (reason or f"complete, but {latest_file} names the older {chosen}"))
    if named is not None and named != chosen:
        warn(f"warning: {latest_file} names {named!r}, which is not a complete checkpoint; "
             f"resuming from {chosen or 'nothing (a fresh start)'} instead")
    return chosen


def resolve_resume(path: str | Path, warn=print) -> tuple[Path, str | None]:
    """(checkpoint root, tag) for ``resume=PATH``: a run's ``checkpoints`` directory (its
    newest complete tag, with warnings) or one tag directory (taken as it is)."""
    path = Path(path)
    if (path / LATEST).exists() or _tag_dirs(path):
        return path, latest_complete(path, warn=warn)
    return path.parent, path.name


def read_state(root: Path, tag: str) -> dict:
    """The state of a checkpoint the caller chose explicitly; a damaged one is a UserError."""
    reason = problem(root, tag)
    if reason is not None:
        raise UserError(f"{Path(root) / tag}: cannot resume from this checkpoint: {reason}; resume from "
                        "an earlier tag (resume=auto picks the newest complete one) or delete this directory")
    return json.loads((Path(root) / tag / STATE_FILE).read_text())


def save(engine, root: Path, step: int, state: dict, keep: int, rank: int, before_marking=None) -> str:
    """Save on every rank (DeepSpeed requires it); rank 0 then marks it complete and prunes.

    ``before_marking`` (tests only) runs on every rank after the files are written and
    before the checkpoint is marked complete: the fault-injection hook kills a rank there.
    Raises :class:`CheckpointWriteError` on the rank whose write failed.
    """
    import torch
    import torch.distributed as dist

    root = Path(root)
    tag = tag_for(step)
    tag_dir = root / tag
    if rank == 0:
        # Re-saving a tag (after a fallback): unmark it first, so that a save interrupted
        # half-way over the old files is never taken for complete.
        (tag_dir / STATE_FILE).unlink(missing_ok=True)
    dist.barrier()
    try:
        # DeepSpeed would write `latest` before every rank is known to be done: we write it.
        engine.save_checkpoint(str(root), tag=tag, client_state={"ds_distil": state}, save_latest=False)
        torch.save(rng_state(), tag_dir / f"rng_rank{rank}.pt")
    except (OSError, RuntimeError) as err:
        if is_collective_error(err):
            raise
        raise write_error(root, tag, rank, err) from None
    if before_marking is not None:
        before_marking()
    dist.barrier()
    if rank == 0:
        try:
            write_atomic(tag_dir / STATE_FILE,
                         json.dumps({**state, "files": manifest(tag_dir)}, indent=1, sort_keys=True))
            write_atomic(root / LATEST, tag)
        except OSError as err:
            (tag_dir / STATE_FILE).unlink(missing_ok=True)
            raise write_error(root, tag, rank, err) from None
        for old in complete_tags(root)[:-keep]:
            shutil.rmtree(root / old, ignore_errors=True)
            shutil.rmtree(root / f"{old}_universal", ignore_errors=True)
    dist.barrier()
    return tag


def write_error(root: Path, tag: str, rank: int, err: BaseException) -> CheckpointWriteError:
    """The message for a failed save: what failed, what is still good, what to do.

    torch's zip writer reports a full disk as "file write failed" or "unexpected pos",
    without errno, so the free space is compared with the size of the last checkpoint.
    """
    root = Path(root)
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    previous = [t for t in complete_tags(root) if t != tag]
    needed = sum(manifest(root / previous[-1]).values()) if previous else 0
    free = shutil.disk_usage(root).free if root.exists() else 0
    if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or free < max(needed, 1 << 20):
        reason = (f"the disk is full or over quota ({free / 2**20:.1f} MiB free, a checkpoint takes "
                  f"{needed / 2**20:.1f} MiB): {reason}")
    kept = (f"the previous checkpoint {root / previous[-1]} is intact and {root / LATEST} still names it"
            if previous else "no earlier checkpoint exists")
    return CheckpointWriteError(f"{root / tag}: saving the checkpoint failed on rank {rank}: {reason}; {kept}. "
                                f"Free space (delete {root / tag}, which is incomplete) or move output_dir, then "
                                "rerun the same command to resume")


def is_collective_error(err: BaseException) -> bool:
    """Whether ``err`` came from a collective (a peer died) rather than from the file system."""
    text = str(err)
    return any(marker in text for marker in COLLECTIVE_ERROR_MARKERS) or type(err).__module__.startswith(
        "torch.distributed")


# What torch's gloo / NCCL process groups put in the errors of a failed collective.
COLLECTIVE_ERROR_MARKERS = ("gloo", "NCCL", "Connection reset by peer", "Connection closed by peer",
                            "Timed out waiting", "ProcessGroup", "Broken pipe")


def rng_state() -> dict:
    import random

    import numpy as np
    import torch

    state = {"torch": torch.get_rng_state(), "python": repr(random.getstate()),
             "numpy": repr(np.random.get_state(legacy=True))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(root: Path, tag: str, rank: int) -> bool:
    """Restore this rank's RNG states; False if the checkpoint has none for this rank."""
    import torch

    path = Path(root) / tag / f"rng_rank{rank}.pt"
    if not path.is_file():
        return False
    # Our own format: tensors and strings only, so the safe loader suffices.
    state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    return True


UNIVERSAL_DONE = "ds_distil_universal.json"


def to_universal(root: Path, tag: str) -> str:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (any world size can load it).

    The conversion goes to a temporary folder renamed into place and marked with the
    source's state file: a conversion interrupted by a kill (SLURM signals every process
    of the step) or made from an older save of the same tag is redone, never trusted.
    """
    root = Path(root)
    out_tag = f"{tag}_universal"
    out, tmp = root / out_tag, root / f".{out_tag}.tmp"
    source_state = (root / tag / STATE_FILE).read_text()
    marker = out / UNIVERSAL_DONE
    if marker.is_file() and marker.read_text() == source_state:
        return out_tag
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
           "--input_folder", str(root / tag), "--output_folder", str(tmp), "--inject_missing_state"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"universal checkpoint conversion of {root}/{tag} failed:\n{result.stderr[-2000:]}")
    (tmp / UNIVERSAL_DONE).write_text(source_state)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    write_atomic(root / "latest_universal", out_tag)  # ds_to_universal wrote the tmp folder's name there
    return out_tag


# ---------------------------------------------------------------------------- export

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint directory (OUTPUT_DIR/checkpoints of a run) or the run's output dir")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the latest complete one)")
    parser.add_argument("--output", required=True, help="directory for the Hugging Face model")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory")


def run(args) -> int:
    out = export(args.checkpoint, args.output, tag=args.tag, force=args.force)
    print(f"exported {out['tag']} ({out['parameters']:,} parameters, fp32) to {out['output']}")
    return 0


def resolve_root(path: str | Path) -> Path:
    if not str(path).strip():
        raise UserError("--checkpoint: empty; pass OUTPUT_DIR/checkpoints of a run (or the run's output_dir)")
    root = Path(path)
    if (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    if not root.is_dir():
        raise UserError(f"{path}: checkpoint directory not found; pass OUTPUT_DIR/checkpoints of a run")
    return root


def _export_output(output: str | Path, root: Path, force: bool) -> Path:
    """``--output`` of export, refused before anything loads: a file or a path under one, a
    non-empty directory without --force, and any directory whose replacement would delete
    the checkpoints being exported."""
    from ds_distil.errors import require_output_path

    output = require_output_path(output, "--output", "dir")
    resolved, source = output.resolve(), root.resolve()
    if resolved == source or source.is_relative_to(resolved) or resolved.is_relative_to(source):
        raise UserError(f"--output {output} overlaps the checkpoint directory {root}; write the model outside it "
                        "(e.g. next to the run's output_dir)")
    if output.exists() and any(output.iterdir()) and not force:
        raise UserError(f"--output {output}: exists and is not empty; choose another --output or pass --force")
    return output


def _student_hf(root: Path) -> Path:
    """The student's HF config + tokenizer saved with the checkpoints (never a hub id)."""
    hf_dir = root / STUDENT_HF
    if not (hf_dir / "config.json").is_file():
        missing = "config.json"
    elif not any((hf_dir / name).is_file() for name in ("tokenizer.json", "vocab.txt", "vocab.json")):
        missing = "tokenizer files"
    else:
        return hf_dir
    raise UserError(f"{hf_dir}: missing or incomplete (no {missing}); the run writes it when training starts: "
                    f"copy the student directory's config.json and tokenizer files into {hf_dir}")


def consolidated_state_dict(root: Path, tag: str) -> dict:
    """The fp32 student weights of a checkpoint, whatever its ZeRO stage."""
    import torch

    tag_dir = Path(root) / tag
    if list(tag_dir.glob("*optim_states.pt")) and read_state(root, tag).get("zero_stage", 0) > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state_dict = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    else:
        # ZeRO stage 0 keeps the whole module in the model-states file. DeepSpeed 0.19
        # stores only tensors, containers and plain values there, so the safe loader
        # reads it; a file that needs more is refused rather than unpickled.
        model_file = tag_dir / "mp_rank_00_model_states.pt"
        if not model_file.is_file():
            raise UserError(f"{model_file}: missing; the checkpoint is incomplete or not a ds-distil checkpoint")
        try:
            state_dict = torch.load(model_file, map_location="cpu", weights_only=True)["module"]
        except pickle.UnpicklingError as err:
            raise UserError(f"{model_file}: holds objects the safe loader refuses ({str(err).splitlines()[0]}); "
                            "export it with DeepSpeed's zero_to_fp32.py if you trust the file") from None
    prefix = "student."
    return {k[len(prefix):] if k.startswith(prefix) else k: v.float() for k, v in state_dict.items()}


def export(checkpoint: str | Path, output: str | Path, tag: str | None = None, force: bool = False) -> dict:
    """Write the consolidated fp32 student as an HF directory (safetensors + tokenizer)."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    from ds_distil.models import class_of

    root = resolve_root(checkpoint)
    output = _export_output(output, root, force)
    if tag is not None and (not tag.strip() or Path(tag).name != tag or not (root / tag).is_dir()):
        tags = complete_tags(root)
        raise UserError(f"--tag {tag!r}: no such checkpoint in {root}; "
                        + (f"its complete tags: {', '.join(tags)}" if tags else "it holds no complete checkpoint"))
    tag = tag or latest_complete(root, warn=lambda m: print(m, file=sys.stderr))
    if tag is None:
        raise UserError(f"{root}: no complete checkpoint found; train longer or pass --tag")
    reason = problem(root, tag)
    if reason is not None:
        raise UserError(f"{root / tag}: not a complete checkpoint ({reason}); choose another --tag")
    hf_dir = _student_hf(root)
    try:
        config = AutoConfig.from_pretrained(str(hf_dir), local_files_only=True)
        model_class = getattr(transformers, class_of(config) or "", None)  # as saved: a masked or causal LM
        if model_class is None:
            raise ValueError(f"its architecture {class_of(config)} is not a model class of transformers")
        with torch.device("meta"):
            model = model_class(config)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{hf_dir / 'config.json'}: not a usable model config ({_one_line(err)}); copy the "
                        "student directory's config.json there") from None
    state_dict = consolidated_state_dict(root, tag)
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as err:
        raise UserError(f"{root / tag}: its weights do not fit {hf_dir / 'config.json'} ({_one_line(err)}); "
                        "the config there belongs to another student: copy this run's student config.json "
                        "into it") from None
    model.tie_weights()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{hf_dir}: its tokenizer files do not load ({_one_line(err)}); copy the student "
                        "directory's tokenizer files there") from None
    save_hf_atomically(model, tokenizer, output)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return {"tag": tag, "output": str(output), "parameters": params}


def save_hf_atomically(model, tokenizer, output: Path) -> None:
    """``model`` (safetensors) and ``tokenizer`` as an HF directory at ``output``, all or nothing.

    Written into a hidden sibling directory and renamed over ``output`` once complete, so a
    crash or a full disk never leaves a half-written model where a good one was.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:300] if text else type(err).__name__
