"""Build a student from its teacher: keep some teacher layers, copy their weights, report it.

Student layer i is a copy of teacher layer layer_map[i]; for 12 -> 6 layers the map is
the reference's [0, 2, 4, 7, 9, 11]. The embeddings, the final norm of decoders and the
head are copied too. What the student is, and which teacher tensor each student tensor
comes from, is the teacher's family's business (ds_distil/models/): a BERT teacher
becomes a DistilBertForMaskedLM (with token_type_embeddings[0] folded into the position
embeddings, so the embedding output is the teacher's; --no-fold-token-type reproduces the
reference), RoBERTa, XLM-RoBERTa, GPT-2 and Llama-style decoders the same class with fewer
layers. This module resolves and validates the layer map, checks the plan (every tensor
accounted for, every shape equal), applies it, and writes the result.

The output directory loads with transformers alone (AutoModelForMaskedLM or
AutoModelForCausalLM, AutoTokenizer) and holds layer_map.json: which teacher tensor
became which student tensor, what was folded, left random or dropped, and the teacher's
fingerprint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ds_distil import __version__
from ds_distil.errors import UserError, require_output_path
from ds_distil.models import TEACHER_CLASSES, Plan, SurgeryOptions, class_of, family_of
from ds_distil.models.base import term_key as _term_key
from ds_distil.models.bert import plan_bert  # noqa: F401 - part of this module's interface (tests)

if TYPE_CHECKING:  # imported for annotations only: the CLI must not pay for torch at import
    import torch
    from transformers import PreTrainedConfig, PreTrainedModel

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
                   "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja")
LAYER_MAP_FILE = "layer_map.json"
# Config fields that define the architecture; they go into the teacher's fingerprint.
FINGERPRINT_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
                      "num_attention_heads", "intermediate_size", "max_position_embeddings",
                      "type_vocab_size", "hidden_act", "layer_norm_eps")


# ---------------------------------------------------------------------------- layer map

def default_layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher layers to keep, evenly spread, first and last included.

    Student layer i takes teacher layer round(i * (T - 1) / (S - 1)), rounding halves up.
    For 12 -> 6 this is the reference's [0, 2, 4, 7, 9, 11]; a one-layer student keeps
    teacher layer 0.
    """
    if not 1 <= student_layers <= teacher_layers:
        raise UserError(f"a student of {student_layers} layers cannot be cut from a teacher of "
                        f"{teacher_layers} layers; choose --num-layers from 1 to {teacher_layers}")
    if student_layers == 1:
        return [0]
    step = (teacher_layers - 1) / (student_layers - 1)
    # int(x + 0.5), not round(): Python rounds halves to even, which would make the map
    # depend on parity in a way nobody expects.
    return [int(i * step + 0.5) for i in range(student_layers)]


def parse_int_list(text: str, flag: str = "--layers") -> list[int]:
    """``"0, 2,4"`` -> ``[0, 2, 4]``; anything else is a UserError naming ``flag``."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"{flag} {text!r} is not a comma-separated list of teacher layer "
                        f"indices; write e.g. {flag} 0,2,4,7,9,11") from None


def resolve_layer_map(teacher_layers: int, layers: list[int] | None = None,
                      num_layers: int | None = None) -> list[int]:
    """The layer map to use: ``layers`` validated, or the default for ``num_layers``.

    The student's depth is ``num_layers`` if given, else ``len(layers)``, else half the
    teacher's (rounded up).
    """
    if num_layers is not None and not 1 <= num_layers <= teacher_layers:
        raise UserError(f"--num-layers {num_layers} is out of range for a {teacher_layers}-layer "
                        f"teacher; choose 1 to {teacher_layers}")
    if layers is None:
        return default_layer_map(teacher_layers, num_layers or (teacher_layers + 1) // 2)
    shown = ",".join(str(i) for i in layers)
    if not layers:
        raise UserError("--layers is empty; list the teacher layers to keep, e.g. --layers 0,2,4")
    if num_layers is not None and len(layers) != num_layers:
        raise UserError(f"--layers {shown} names {len(layers)} layers but --num-layers is {num_layers}; "
                        f"give exactly {num_layers} teacher layers or drop --num-layers")
    outside = [i for i in layers if not 0 <= i < teacher_layers]
    if outside:
        raise UserError(f"--layers {shown}: layer {outside[0]} does not exist in the {teacher_layers}-layer "
                        f"teacher; use indices 0 to {teacher_layers - 1}")
    if len(set(layers)) != len(layers):
        twice = next(i for i in layers if layers.count(i) > 1)
        raise UserError(f"--layers {shown}: teacher layer {twice} is listed twice; each teacher "
                        f"layer can become one student layer only")
    if layers != sorted(layers):
        raise UserError(f"--layers {shown} is not in increasing order; the student keeps the teacher's "
                        f"layer order, write --layers {','.join(str(i) for i in sorted(layers))}")
    return list(layers)


# ---------------------------------------------------------------------- teacher on disk

def read_teacher_config(teacher_dir: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """Check a teacher directory with json alone (fast) and return (config, teacher class).

    Catches the usual mistakes before torch is imported: a missing directory, no or an
    unreadable config.json, an unsupported architecture, no weights, no tokenizer.
    """
    path = Path(teacher_dir)
    if not path.exists():
        raise UserError(f"teacher directory {path} does not exist; ds-distil never downloads: save the "
                        f"teacher there with save_pretrained() (model and tokenizer) and pass that directory")
    if not path.is_dir():
        raise UserError(f"teacher {path} is not a directory; pass the directory that holds its config.json")
    config_file = path / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"teacher directory {path} has no config.json; it must be a Hugging Face model "
                        f"directory written by save_pretrained()") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {config_file}: {_one_line(err)}; re-save the teacher with "
                        f"save_pretrained()") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_file} is not a JSON object; re-save the teacher with save_pretrained()")
    teacher_class = _teacher_class(config, config_file)
    _check_teacher_layout(config, config_file)
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise UserError(f"teacher directory {path} has no weights ({', '.join(WEIGHT_FILES[::2])}); "
                        f"save the model there with save_pretrained()")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"teacher directory {path} has no tokenizer files; save the teacher's tokenizer "
                        f"there too (tokenizer.save_pretrained('{path}'))")
    return config, teacher_class


def _teacher_class(config: dict[str, Any], config_file: Path) -> str:
    """The teacher's class (a config.json without "architectures": its model_type's default)."""
    supported = ", ".join(TEACHER_CLASSES)
    name = class_of(config)
    family = family_of(config)
    if name is None:
        raise UserError(f"{config_file}: model_type {config.get('model_type')!r} is not supported; init-student "
                        f"supports {supported}")
    if family is None or name not in family.students:
        raise UserError(f"{config_file}: architecture {name} is not supported; init-student supports "
                        f"{supported} (save the teacher as one of these, with its head: the MLM head of an encoder, "
                        "the LM head of a decoder)")
    return name


def _check_teacher_layout(config: dict[str, Any], config_file: Path) -> None:
    """Reject teacher variants whose extra weights the surgery would have to drop silently."""
    family_of(config).check_layout(config, config_file)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and load reports; restore them afterwards.

    Surgery checks missing and unexpected keys itself and reports them in one place.
    """
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_teacher(teacher_dir: str | os.PathLike) -> tuple["PreTrainedModel", dict[str, list[str]]]:
    """Load a teacher directory in float32, eval mode; also return its loading report.

    The report has ``missing_keys`` (tensors the checkpoint lacks, which transformers
    fills randomly) and ``unexpected_keys`` (tensors in the checkpoint that the class
    does not use, e.g. the NSP head of a BERT checkpoint loaded as BertForMaskedLM).
    """
    import torch
    import transformers

    from ds_distil.modeling import weights_problem

    _, class_name = read_teacher_config(teacher_dir)
    problem = weights_problem(teacher_dir)  # from the file headers: a truncated copy is named as such
    if problem:
        raise UserError(f"cannot load the teacher in {teacher_dir}: {problem}")
    model_class = getattr(transformers, class_name)
    try:
        with quiet_transformers():
            model, info = model_class.from_pretrained(str(teacher_dir), dtype=torch.float32,
                                                      local_files_only=True, output_loading_info=True)
    except Exception as err:  # noqa: BLE001 - a broken checkpoint is the user's input, not our bug
        raise UserError(f"cannot load the teacher in {teacher_dir} as {class_name}: {_one_line(err)}; "
                        f"re-save it with save_pretrained()") from None
    model.eval()
    return model, {"missing_keys": sorted(info["missing_keys"]),
                   "unexpected_keys": sorted(info["unexpected_keys"])}


# -------------------------------------------------------------------------- the surgery

def student_config(teacher_config: "PreTrainedConfig", layers: int | list[int],
                   teacher_class: str | None = None) -> "PreTrainedConfig":
    """The student's config: the teacher's width and settings, ``layers`` deep (a depth, or
    the layer map, which a family with per-layer settings needs)."""
    teacher_class = teacher_class or class_of(teacher_config)
    family = family_of({"architectures": [teacher_class]}) if teacher_class else None
    if family is None or teacher_class not in family.students:
        raise UserError(f"teacher class {teacher_class} is not supported; init-student supports "
                        f"{', '.join(TEACHER_CLASSES)}")
    if isinstance(layers, int):
        layers = default_layer_map(teacher_config.num_hidden_layers, layers)
    return family.student_config(teacher_config, layers, teacher_class)


def check_plan(plan: Plan, student_sd: dict[str, "torch.Tensor"], teacher_sd: dict[str, "torch.Tensor"]) -> None:
    """Assert that names and shapes match and that no teacher tensor is skipped silently.

    Every student tensor is copied, folded, or explicitly left random; every teacher
    tensor is read, explicitly dropped, or the same tensor as one that is read (tied
    weights, which are then recorded in ``plan.dropped`` with the name they share).
    """
    planned = set(plan.copies) | set(plan.folds) | set(plan.random)
    unplanned = sorted(set(student_sd) - planned)
    unknown = sorted(planned - set(student_sd))
    _check(not unplanned, f"student tensors with no source: {unplanned}")
    _check(not unknown, f"plan names tensors the student does not have: {unknown}")
    missing = sorted(k for k in plan.teacher_sources() if k not in teacher_sd)
    _check(not missing, f"plan reads tensors the teacher does not have: {missing}")
    for s_key, t_key in plan.copies.items():
        s_shape, t_shape = tuple(student_sd[s_key].shape), tuple(teacher_sd[t_key].shape)
        _check(s_shape == t_shape, f"shape mismatch: student {s_key} {s_shape} vs teacher {t_key} {t_shape}")
    for s_key, terms in plan.folds.items():
        for term in terms:
            shape = tuple(_eval_term(teacher_sd, term).shape)
            _check(shape == tuple(student_sd[s_key].shape[-len(shape):]), f"cannot fold {term} {shape} into {s_key}")
    used = plan.teacher_sources()
    for key in teacher_sd:
        if key in used or key in plan.dropped:
            continue
        alias = next((u for u in used if _same_tensor(teacher_sd[key], teacher_sd[u])), None)
        _check(alias is not None, f"teacher tensor {key} is neither copied nor explicitly dropped")
        plan.dropped[key] = f"same tensor as {alias} (tied), already used"


def _check(condition: bool, message: str) -> None:
    """``assert`` that survives ``python -O``: a failed surgery check is a bug, never skipped."""
    if not condition:
        raise AssertionError(f"surgery check failed: {message}")


def make_student(teacher: "PreTrainedModel", layers: list[int] | None = None, num_layers: int | None = None,
                 fold_token_type: bool = True, copy_head_transform: bool = True,
                 seed: int = 0) -> tuple["PreTrainedModel", dict[str, Any]]:
    """Cut a student out of ``teacher`` in memory; return (student in eval mode, report).

    Tensors left random (the head transform with ``copy_head_transform=False``) come
    from the student's own initialisation under ``seed``, so the result is reproducible.
    """
    import torch
    import transformers

    teacher_class = type(teacher).__name__
    family = family_of(teacher)
    if family is None or teacher_class not in family.students:
        raise UserError(f"teacher class {teacher_class} is not supported; init-student supports "
                        f"{', '.join(TEACHER_CLASSES)}")
    layer_map = resolve_layer_map(teacher.config.num_hidden_layers, layers, num_layers)
    config = family.student_config(teacher.config, layer_map, teacher_class)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = getattr(transformers, family.student_class(teacher_class))(config)
    student.eval()

    teacher_sd, student_sd = teacher.state_dict(), student.state_dict()
    options = SurgeryOptions(fold_token_type=fold_token_type, copy_head_transform=copy_head_transform)
    plan = family.plan(list(student_sd), list(teacher_sd), layer_map, options)
    check_plan(plan, student_sd, teacher_sd)
    _apply_plan(plan, student_sd, teacher_sd)
    _verify_copy(plan, student.state_dict(), teacher_sd)

    report = {
        "ds_distil_version": __version__,
        "teacher": {"dir": getattr(teacher, "name_or_path", None) or None, "architecture": teacher_class,
                    "num_layers": teacher.config.num_hidden_layers,
                    "parameters": teacher.num_parameters(), "fingerprint": teacher_fingerprint(teacher)},
        "student": {"dir": None, "architecture": type(student).__name__, "num_layers": len(layer_map),
                    "parameters": student.num_parameters()},
        "layer_map": layer_map,
        "layer_map_meaning": "student layer i is a copy of teacher layer layer_map[i]",
        "options": {"fold_token_type": fold_token_type and bool(plan.folds),
                    "copy_head_transform": copy_head_transform, "seed": seed},
        "copied": plan.copies,
        "folded": plan.folds,
        "left_random": plan.random,
        "dropped": dict(sorted(plan.dropped.items())),
        "ignored_in_checkpoint": [],
        "warnings": family.warnings(teacher.config, config, layer_map),
    }
    return student, report


def _apply_plan(plan: Plan, student_sd: dict[str, "torch.Tensor"], teacher_sd: dict[str, "torch.Tensor"]) -> None:
    import torch

    # state_dict() tensors share storage with the parameters: copy_ writes the model.
    with torch.no_grad():
        for s_key, t_key in plan.copies.items():
            student_sd[s_key].copy_(teacher_sd[t_key])
        for s_key, terms in plan.folds.items():
            total = _eval_term(teacher_sd, terms[0]).clone()
            for term in terms[1:]:
                total += _eval_term(teacher_sd, term)
            student_sd[s_key].copy_(total)


def _verify_copy(plan: Plan, student_sd: dict[str, "torch.Tensor"], teacher_sd: dict[str, "torch.Tensor"]) -> None:
    """Read the student back: tied student tensors must not have overwritten each other."""
    import torch

    for s_key, t_key in plan.copies.items():
        _check(torch.equal(student_sd[s_key], teacher_sd[t_key]), f"{s_key} != teacher {t_key} after copy")
    for s_key, terms in plan.folds.items():
        expected = sum(_eval_term(teacher_sd, t) for t in terms)
        _check(torch.equal(student_sd[s_key], expected), f"{s_key} != {' + '.join(terms)} after copy")


# ------------------------------------------------------------------------- fingerprint

def teacher_fingerprint(model_or_dir: "PreTrainedModel | str | os.PathLike") -> str:
    """``sha256:...`` of the teacher's architecture fields and embedding weights.

    Weights are hashed rounded to bfloat16, so a teacher loaded in float32 and the same
    teacher cast to bf16 for training give the same fingerprint. A directory is loaded
    first (and must be a supported teacher).
    """
    import hashlib

    import torch

    model = load_teacher(model_or_dir)[0] if isinstance(model_or_dir, (str, os.PathLike)) else model_or_dir
    digest = hashlib.sha256()
    fields = {name: getattr(model.config, name, None) for name in FINGERPRINT_FIELDS}
    digest.update(json.dumps(fields, sort_keys=True).encode())
    for name, param in sorted(family_of(model).embedding_parameters(model)):
        bf16 = param.detach().to(device="cpu", dtype=torch.bfloat16).contiguous()
        digest.update(name.encode())
        digest.update(bf16.view(torch.int16).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


# ---------------------------------------------------------------------- build and write

def build_student(teacher_dir: str | os.PathLike, output_dir: str | os.PathLike, layers: list[int] | None = None,
                  num_layers: int | None = None, fold_token_type: bool = True, copy_head_transform: bool = True,
                  force: bool = False, seed: int = 0) -> dict[str, Any]:
    """Build the student of the teacher in ``teacher_dir`` and write it to ``output_dir``.

    Writes the weights (safetensors), config, the teacher's tokenizer files and
    ``layer_map.json`` into a temporary directory next to ``output_dir`` and renames it
    into place, so a failure leaves nothing half-written. Returns the layer_map.json
    content.
    """
    if not str(teacher_dir).strip():
        raise UserError("--teacher: empty; give the teacher's directory (saved with save_pretrained())")
    require_output_path(output_dir, "--output", "dir")  # "" would be the current directory
    teacher_path, output = Path(teacher_dir).resolve(), Path(output_dir).resolve()
    config, _ = read_teacher_config(teacher_path)
    # Validate the layer map from config.json before the slow load.
    resolve_layer_map(family_of(config).num_layers(config), layers, num_layers)
    _check_output(output, teacher_path, force)

    teacher, loading = load_teacher(teacher_path)
    student, report = make_student(teacher, layers, num_layers, fold_token_type, copy_head_transform, seed)
    _check_checkpoint_complete(report, loading, teacher, teacher_path)
    report["teacher"]["dir"] = str(teacher_path)
    report["student"]["dir"] = str(output)
    report["ignored_in_checkpoint"] = loading["unexpected_keys"]
    _write_atomically(output, force, lambda tmp: _write_student(tmp, student, teacher_path, report))
    return report


def _check_output(output: Path, teacher: Path, force: bool) -> None:
    if output == teacher or teacher.is_relative_to(output):
        raise UserError(f"--output {output} would replace the teacher directory {teacher}; choose another --output")
    if output.is_relative_to(teacher):
        raise UserError(f"--output {output} would write into the teacher directory {teacher}; choose another --output")
    require_output_path(output, "--output", "dir")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise UserError(f"output directory {output} exists and is not empty; choose another --output "
                        f"or pass --force to replace it")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {output.parent}: {_one_line(err)}; choose a writable --output") from None
    if not os.access(output.parent, os.W_OK):
        raise UserError(f"cannot write into {output.parent}; choose a writable --output")


def _check_checkpoint_complete(report: dict[str, Any], loading: dict[str, list[str]],
                               teacher: "PreTrainedModel", teacher_path: Path) -> None:
    """Refuse a checkpoint that lacks tensors the student copies (transformers made them up)."""
    sd = teacher.state_dict()
    missing = set(loading["missing_keys"])
    present = [k for k in sd if k not in missing]
    read = set(report["copied"].values()) | {_term_key(t) for ts in report["folded"].values() for t in ts}
    lacking = sorted(k for k in read & missing if not any(_same_tensor(sd[k], sd[p]) for p in present))
    if lacking:
        more = f" and {len(lacking) - 3} more" if len(lacking) > 3 else ""
        raise UserError(f"the checkpoint in {teacher_path} lacks {', '.join(lacking[:3])}{more}, which the "
                        f"student would copy (transformers filled them randomly); use a complete teacher checkpoint")


def _write_student(tmp: Path, student: "PreTrainedModel", teacher_path: Path, report: dict[str, Any]) -> None:
    from transformers import AutoTokenizer

    with quiet_transformers():
        student.save_pretrained(str(tmp))
    for name in TOKENIZER_FILES:
        if (teacher_path / name).is_file():
            shutil.copy2(teacher_path / name, tmp / name)
    try:  # the copied files must load next to the student's config, or the output is useless
        with quiet_transformers():
            AutoTokenizer.from_pretrained(str(tmp), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - the teacher's tokenizer files are user input
        raise UserError(f"the tokenizer files of {teacher_path} do not load: {_one_line(err)}; "
                        f"re-save the teacher's tokenizer with save_pretrained()") from None
    (tmp / LAYER_MAP_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def _write_atomically(output: Path, force: bool, write) -> None:
    """Run ``write(tmp)`` in a temp dir beside ``output``, then rename it into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        write(tmp)
        _apply_umask(tmp)
        _replace(tmp, output, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _apply_umask(tmp: Path) -> None:
    """mkdtemp makes the directory 0700 and safetensors writes 0600; others on a shared
    cluster must be able to read the student, as with any file the user creates."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    for path in tmp.iterdir():
        os.chmod(path, 0o666 & ~umask)


def _replace(tmp: Path, output: Path, force: bool) -> None:
    if not output.exists():
        os.rename(tmp, output)
        return
    if any(output.iterdir()) and not force:  # filled while we were building
        raise UserError(f"output directory {output} is no longer empty; pass --force to replace it")
    old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
    os.rename(output, old / "replaced")
    try:
        os.rename(tmp, output)
    except BaseException:
        os.rename(old / "replaced", output)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------ helpers

def _eval_term(sd: dict[str, "torch.Tensor"], term: str) -> "torch.Tensor":
    """A teacher tensor by name, or one row of it (``name[row]``)."""
    if term.endswith("]"):
        key, row = term[:-1].split("[")
        return sd[key][int(row)]
    return sd[term]


def _same_tensor(a: "torch.Tensor", b: "torch.Tensor") -> bool:
    """True for tied weights: one storage under two names."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.dtype == b.dtype


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    first = text[0] if text else type(err).__name__
    return first if len(first) <= 300 else first[:297] + "..."


# ---------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ds-distil init-student``."""
    parser.add_argument("--teacher", required=True, metavar="DIR",
                        help="teacher saved with save_pretrained, with its tokenizer (BertForMaskedLM, "
                             "BertForPreTraining, RobertaForMaskedLM, XLMRobertaForMaskedLM, GPT2LMHeadModel, "
                             "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM); "
                             "nothing is downloaded")
    parser.add_argument("--output", required=True, metavar="DIR", help="where to write the student")
    parser.add_argument("--layers", metavar="LIST",
                        help="teacher layers to keep, e.g. 0,2,4,7,9,11 (default: evenly spread, "
                             "first and last kept; [0,2,4,7,9,11] for 12 -> 6)")
    parser.add_argument("--num-layers", metavar="N", help="student depth (default: the length of --layers, else half the teacher's)")
    parser.add_argument("--no-fold-token-type", action="store_true",
                        help="BERT: drop token_type_embeddings[0] instead of folding it into the position "
                             "embeddings (reproduces the reference exactly)")
    parser.add_argument("--random-head-transform", action="store_true",
                        help="leave the MLM head's transform dense + LayerNorm random, as the reference does "
                             "(encoders; a decoder's head is a bare projection)")
    parser.add_argument("--seed", default="0", metavar="N", help="seed for tensors left random (default 0)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --output directory")


def run(args: argparse.Namespace) -> int:
    """``ds-distil init-student``: build, write, print a summary."""
    report = build_student(
        args.teacher, args.output,
        layers=parse_int_list(args.layers) if args.layers is not None else None,
        num_layers=_parse_int(args.num_layers, "--num-layers") if args.num_layers is not None else None,
        fold_token_type=not args.no_fold_token_type, copy_head_transform=not args.random_head_transform,
        force=args.force, seed=_parse_int(args.seed, "--seed"))
    print(format_summary(report))
    return 0


def _parse_int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{flag} {text!r} is not an integer") from None


def format_summary(report: dict[str, Any]) -> str:
    """The few lines a user wants to see after init-student."""
    t, s = report["teacher"], report["student"]
    pairs = ", ".join(f"{tl}->{sl}" for sl, tl in enumerate(report["layer_map"]))
    reduction = 100.0 * (1 - s["parameters"] / t["parameters"])
    folded = "; ".join(f"{' + '.join(terms)} -> {key}" for key, terms in report["folded"].items())
    lines = [
        f"teacher      {t['dir']} ({t['architecture']}, {t['num_layers']} layers)",
        f"student      {s['architecture']}, {s['num_layers']} layers",
        f"layer map    teacher -> student: {pairs}",
        f"parameters   teacher {t['parameters']:,} -> student {s['parameters']:,} ({reduction:.1f}% fewer)",
        f"folded       {folded or 'nothing'}",
        f"left random  {', '.join(report['left_random']) or 'nothing'}",
    ]
    lines += [f"warning      {w}" for w in report["warnings"]]
    lines.append(f"wrote        {s['dir']} (weights, config, tokenizer, {LAYER_MAP_FILE})")
    return "\n".join(lines)
