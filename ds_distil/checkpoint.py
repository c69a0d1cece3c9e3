"""Checkpoints: atomic save, keep-last-K, exact resume, and export to Hugging Face format.

Layout under ``<output_dir>/checkpoints``::

    global_step500/            DeepSpeed's files (all ranks write their shards)
        rng_rank0.pt ...       each rank's RNG states (dropout), ds-distil's own format
        ds_distil_state.json   written LAST, by rank 0, after every rank finished: its
                               presence is what makes the checkpoint complete
    latest                     the newest complete tag, replaced atomically
    student_hf/                the student's HF config + tokenizer (for export)

A save that dies half-way leaves a tag without ``ds_distil_state.json``; ``latest`` still
names the previous complete tag, and resume skips the incomplete one.
"""

from __future__ import annotations

import argparse
import json
import os
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


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old or the new file, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_complete(root: Path, tag: str) -> bool:
    return (Path(root) / tag / STATE_FILE).is_file()


def complete_tags(root: Path) -> list[str]:
    """Complete checkpoint tags under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _TAG_RE.match(d.name)
        if m and d.is_dir() and is_complete(root, d.name):
            found.append((int(m.group(1)), d.name))
    return [tag for _, tag in sorted(found)]


def latest_complete(root: Path, warn=print) -> str | None:
    """The tag to resume from: ``latest`` if complete, else the newest complete tag."""
    root = Path(root)
    latest_file = root / LATEST
    if latest_file.is_file():
        tag = latest_file.read_text().strip()
        if is_complete(root, tag):
            return tag
        warn(f"warning: {latest_file} names {tag}, which is incomplete (a save was interrupted); "
             "falling back to the newest complete checkpoint")
    tags = complete_tags(root)
    for d in sorted(root.glob("global_step*")) if root.is_dir() else []:
        if d.is_dir() and d.name not in tags:
            warn(f"warning: skipping incomplete checkpoint {d} (no {STATE_FILE})")
    return tags[-1] if tags else None


def read_state(root: Path, tag: str) -> dict:
    path = Path(root) / tag / STATE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: unreadable checkpoint state ({err}); resume from another tag "
                        "or delete this checkpoint directory")


def save(engine, root: Path, step: int, state: dict, keep: int, rank: int) -> str:
    """Save on every rank (DeepSpeed requires it); rank 0 then marks it complete and prunes."""
    import torch
    import torch.distributed as dist

    root = Path(root)
    tag = tag_for(step)
    # DeepSpeed would write `latest` before every rank is known to be done: we write it.
    engine.save_checkpoint(str(root), tag=tag, client_state={"ds_distil": state}, save_latest=False)
    torch.save(rng_state(), root / tag / f"rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        write_atomic(root / tag / STATE_FILE, json.dumps(state, indent=1, sort_keys=True))
        write_atomic(root / LATEST, tag)
        for old in complete_tags(root)[:-keep]:
            shutil.rmtree(root / old, ignore_errors=True)
    dist.barrier()
    return tag


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


def to_universal(root: Path, tag: str) -> str:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (any world size can load it)."""
    out_tag = f"{tag}_universal"
    if (Path(root) / out_tag).is_dir():
        return out_tag
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
           "--input_folder", str(Path(root) / tag), "--output_folder", str(Path(root) / out_tag),
           "--inject_missing_state"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"universal checkpoint conversion of {root}/{tag} failed:\n{result.stderr[-2000:]}")
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
    root = Path(path)
    if (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    if not root.is_dir():
        raise UserError(f"{path}: checkpoint directory not found; pass OUTPUT_DIR/checkpoints of a run")
    return root


def consolidated_state_dict(root: Path, tag: str) -> dict:
    """The fp32 student weights of a checkpoint, whatever its ZeRO stage."""
    import torch

    tag_dir = Path(root) / tag
    if list(tag_dir.glob("*optim_states.pt")) and read_state(root, tag).get("zero_stage", 0) > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state_dict = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    else:
        # ZeRO stage 0 keeps the whole module in the model-states file. DeepSpeed pickles
        # its own metadata there, so this one file needs the full loader; it is a file
        # this run wrote, never user-supplied data.
        model_file = tag_dir / "mp_rank_00_model_states.pt"
        if not model_file.is_file():
            raise UserError(f"{model_file}: missing; the checkpoint is incomplete or not a ds-distil checkpoint")
        state_dict = torch.load(model_file, map_location="cpu", weights_only=False)["module"]
    prefix = "student."
    return {k[len(prefix):] if k.startswith(prefix) else k: v.float() for k, v in state_dict.items()}


def export(checkpoint: str | Path, output: str | Path, tag: str | None = None, force: bool = False) -> dict:
    """Write the consolidated fp32 student as an HF directory (safetensors + tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

    root = resolve_root(checkpoint)
    tag = tag or latest_complete(root, warn=lambda m: print(m, file=sys.stderr))
    if tag is None:
        raise UserError(f"{root}: no complete checkpoint found; train longer or pass --tag")
    if not is_complete(root, tag):
        raise UserError(f"{root / tag}: not a complete checkpoint (no {STATE_FILE}); choose another --tag")
    output = Path(output)
    if output.exists() and any(output.iterdir()) and not force:
        raise UserError(f"{output}: exists and is not empty; choose another --output or pass --force")
    hf_dir = root / STUDENT_HF
    config = AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForMaskedLM.from_config(config)
    state_dict = consolidated_state_dict(root, tag)
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.tie_weights()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(hf_dir, local_files_only=True).save_pretrained(tmp)
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return {"tag": tag, "output": str(output), "parameters": params}
