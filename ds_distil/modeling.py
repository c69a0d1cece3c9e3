"""Model adapters: the body and the head of each supported model, apart.

The losses need the last hidden states (L_cos) and the vocabulary projection only at the
positions a loss uses (L_ce, L_mlm, L_clm). Hugging Face's ``*ForMaskedLM.forward`` and
``*ForCausalLM.forward`` project every position to the full vocabulary, the largest
matmul of the step; splitting body and head lets ds-distil project just the rows it
needs. What the body and the head are is each model family's business
(:mod:`ds_distil.models`); the functions here ask the family.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ds_distil.models import FAMILIES, Family, class_of, family_of

# The objectives the trainer distils (a family of another objective is refused by train).
TRAINED_OBJECTIVES = ("masked", "causal")
SUPPORTED = tuple(c for f in FAMILIES if f.objective in TRAINED_OBJECTIVES for c in f.trainable)


def family(model: nn.Module) -> Family:
    """The family of a loaded model (TypeError for a class ds-distil does not run)."""
    found = family_of(model)
    if found is None or type(model).__name__ not in found.trainable:
        raise TypeError(f"unsupported model class {type(model).__name__}; supported: "
                        f"{', '.join(c for f in FAMILIES for c in f.trainable)}")
    return found


def objective(model: nn.Module) -> str:
    """``"masked"`` or ``"causal"``: what the model predicts."""
    return family(model).objective


def model_objective(directory: str | Path) -> str | None:
    """The objective of the model in a directory, from its config.json (None: unknown)."""
    try:
        config = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    found = family_of(config) if isinstance(config, dict) else None
    return found.objective if found is not None else None


def encode(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states ``[batch, length, hidden]`` of ``model``'s body."""
    return family(model).encode(model, input_ids, attention_mask)


def mlm_head(model: nn.Module) -> nn.Module | None:
    """The head as one module (None when it is loose attributes, as DistilBERT's; see project)."""
    return family(model).head_module(model)


def project(model: nn.Module, hidden_rows: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits for selected hidden-state rows ``[n, hidden] -> [n, vocab]``."""
    return family(model).project(model, hidden_rows)


def head_parts(model: nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor], nn.Linear]:
    """The head in two: its transform (hidden -> hidden) and its vocabulary projection.

    ``project(model, h) == decoder(transform(h))``. The projection is a plain ``nn.Linear``
    in every family (tied to the word embeddings where the model ties them), so the
    losses can fuse it (``losses.projected_loss_sums``).
    """
    return family(model).head_parts(model)


def zero3_partitioned(param: torch.Tensor) -> bool:
    """Whether ZeRO-3 partitions ``param`` (its full value exists only inside its module's forward)."""
    return hasattr(param, "ds_id")


def architecture_problem(config: dict, config_file: str | Path = "config.json") -> str | None:
    """Why ds-distil cannot train or distil the model of this ``config.json``, or None.

    The class that would be built (its ``architectures`` entry, else its model_type's
    default) must be one the trainer runs, and a checkpoint saved as another class
    (``BertModel``...) is refused too: it has no head, which loading would fill with random
    weights. A family whose objective the trainer does not distil yet is named as such.
    """
    model_type = config.get("model_type")
    name = class_of(config)
    found = family_of(config)
    supported = ", ".join(SUPPORTED)
    if name is None or found is None or name not in found.trainable or model_type not in found.model_types:
        return (f"{config_file}: architecture {name or f'model_type {model_type!r}'} is not supported; ds-distil "
                f"trains and distils {supported} (a masked or causal LM with its head)")
    if found.objective not in TRAINED_OBJECTIVES:
        return (f"{config_file}: architecture {name} is not supported by ds-distil train yet ({found.objective} "
                f"language-model distillation is not implemented; init-student can cut its student); ds-distil "
                f"trains and distils {supported}")
    return None


def hidden_size(config: dict) -> int | None:
    """The width of the model of a ``config.json`` (its family's key: hidden_size, dim, n_embd)."""
    found = family_of(config)
    return config.get(found.width_key) if found is not None else config.get("hidden_size", config.get("dim"))


def max_positions(config: dict) -> int | None:
    """The longest sequence a model of this ``config.json`` takes (RoBERTa's positions start
    after its padding index), or None when the config does not say or positions are rotary."""
    found = family_of(config)
    if found is not None:
        return found.max_positions(config)
    limit = config.get("max_position_embeddings")
    return limit if isinstance(limit, int) and not isinstance(limit, bool) else None


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def weights_problem(directory: str | Path) -> str | None:
    """Why the weights of a model directory cannot load, found from file headers only, or None.

    Safetensors files are checked against their header: the header must parse and the
    file must be exactly as long as the tensors it lists (a truncated copy is not);
    a sharded index must name shards that exist; a torch zip must have its directory.
    """
    import zipfile

    directory = Path(directory)
    found = [name for name in WEIGHT_FILES if (directory / name).is_file()]
    if not found:
        return (f"{directory} has no weights ({', '.join(WEIGHT_FILES[::2])}): save the model there with "
                "save_pretrained() (ds-distil init-student writes a student's)")
    name = found[0]
    if name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads((directory / name).read_text())["weight_map"].values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
            return f"{directory / name} is not a weight index ({err}): save the model again with save_pretrained()"
    else:
        shards = [name]
    for shard in shards:
        path = directory / shard
        if not path.is_file():
            return f"{path} is missing (listed in {directory / name}): copy it there, or save the model again"
        if shard.endswith(".safetensors"):
            problem = safetensors_problem(path)
        elif path.stat().st_size == 0 or (_starts_with(path, b"PK") and not zipfile.is_zipfile(path)):
            problem = f"{path} is empty or truncated"
        else:
            problem = None
        if problem:
            return f"{problem}: restore the file, or save the model again with save_pretrained()"
    return None


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from a safetensors header (checked by :func:`safetensors_problem`)."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    return {name: list(t["shape"]) for name, t in header.items() if name != "__metadata__"}


def weights_shape_problem(directory: str | Path) -> str | None:
    """Whether the safetensors weights fit the model that config.json describes, or why not.

    The model is built on the meta device (no memory, no weights read) and every tensor
    present in both is compared by shape: a config.json edited or copied from another
    model is found before a start loads anything. Call once :func:`weights_problem` and
    :func:`architecture_problem` found nothing.
    """
    import transformers
    from transformers import AutoConfig

    directory = Path(directory)
    if (directory / "model.safetensors").is_file():
        files = [directory / "model.safetensors"]
    elif (directory / "model.safetensors.index.json").is_file():
        index = json.loads((directory / "model.safetensors.index.json").read_text())
        files = [directory / name for name in sorted(set(index["weight_map"].values()))]
    else:
        return None  # torch pickles: only a load reads their shapes
    saved = {}
    for path in files:
        saved.update(_safetensors_shapes(path))
    try:
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
        with torch.device("meta"):
            model = getattr(transformers, class_of(config))(config)
    except Exception as err:  # noqa: BLE001 - transformers raises ValueError, TypeError, KeyError...
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        return f"{directory / 'config.json'} does not describe a model transformers can build ({reason})"
    expected = {name: list(t.shape) for name, t in model.state_dict().items()}
    if saved and not set(saved) & set(expected):
        # A config.json relabelled as another model (a BERT checkpoint called GPT-2): loading
        # would leave every tensor random.
        return (f"{directory}: none of its {len(saved)} saved tensors (e.g. {sorted(saved)[0]}) belongs to "
                f"{type(model).__name__}, the model {directory / 'config.json'} describes: the config and the weights "
                "are of different models; restore the model's own config.json")
    differ = [name for name in saved if name in expected and saved[name] != expected[name]]
    if not differ:
        return None
    name = differ[0]
    return (f"{files[0] if len(files) == 1 else directory} holds {name} of shape {saved[name]}, but "
            f"{directory / 'config.json'} makes it {expected[name]} ({len(differ)} tensor(s) differ): the config "
            "and the weights are of different models; restore the model's own config.json, or save the model "
            "again with save_pretrained()")


def _starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


def safetensors_problem(path: str | Path) -> str | None:
    """Why a safetensors file is damaged (from its header and its size), or None."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 2 or length > size - 8:
            return f"{path} is truncated or not a safetensors file ({size:,} bytes, no complete header)"
        try:
            header = json.loads(f.read(length))
            end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return f"{path} has a damaged safetensors header"
    expected = 8 + length + end
    if size != expected:
        return (f"{path} is truncated or damaged ({size:,} bytes, its header lists {expected:,})" if size < expected
                else f"{path} has {size - expected:,} bytes after its last tensor (damaged)")
    return None


def load_model(path: str, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a supported model (as the class its config.json names) from a local HF directory,
    never from a hub.

    A path that is not a model directory, an unsupported architecture or weights that do
    not load are a :class:`~ds_distil.errors.UserError` naming the directory.
    """
    import transformers
    from transformers import AutoConfig

    from ds_distil.errors import UserError

    directory = Path(path)
    if not (directory / "config.json").is_file():  # never let transformers take it for a hub id
        raise UserError(f"{path}: not a model directory (no config.json); pass a local Hugging Face model directory")
    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{directory / 'config.json'}: unreadable ({err}); save the model again") from None
    problem = (architecture_problem(raw, directory / "config.json") if isinstance(raw, dict) else None) \
        or weights_problem(directory)
    if problem:
        raise UserError(problem)
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
        return getattr(transformers, class_of(config)).from_pretrained(str(directory), **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
        reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: the model does not load ({reason}); its config.json and weights must belong "
                        "together: save it again with save_pretrained() (or rebuild the student with "
                        "ds-distil init-student)") from None


load_masked_lm = load_model  # the name callers used before decoders were supported


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once), as transformers counts them."""
    seen = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


class StudentObjective(nn.Module):
    """The student as the DeepSpeed engine sees it: encoder + head + loss sums in one forward.

    Putting the loss inside ``forward`` lets the engine own everything that has
    gradients (ZeRO-3 gathers the head's weights on use), while the teacher's outputs
    come in as plain tensors. State-dict keys are the HF model's behind ``student.``.
    """

    def __init__(self, student: nn.Module, temperature: float, mse: bool = False):
        super().__init__()
        self.student = student
        self.temperature = temperature
        self.mse = mse  # also L_mse (squared logit error) where teacher logits come in
        self.vocab_size = student.config.vocab_size

    def forward(self, input_ids, attention_mask, rows, row_targets, teacher_hidden=None, teacher_logits=None,
                mlm_rows=None):
        """Loss sums of one micro-batch.

        ``rows`` are flat indices (into batch*length, ascending) of the positions a head
        loss needs, ``row_targets`` their MLM targets (-100: none), ``teacher_logits`` the
        teacher's logits at ``rows`` (None: no L_ce) and ``teacher_hidden`` its last hidden
        states (None: no L_cos). ``mlm_rows``, optional, are the indices into ``rows`` of
        those with a target (ascending); passing them from the CPU saves a device sync.
        """
        from ds_distil import losses

        hidden = encode(self.student, input_ids, attention_mask)
        hidden_rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
        transform, decoder = head_parts(self.student)
        if zero3_partitioned(decoder.weight):
            # ZeRO-3 gathers the projection's weight only inside decoder's own forward, so the
            # head runs as modules. Its checkpointed chunks save the teacher's logits for
            # backward, which inference tensors cannot be.
            if teacher_logits is not None and teacher_logits.is_inference():
                teacher_logits = teacher_logits.clone()
            sums = losses.head_loss_sums(lambda h: project(self.student, h), hidden_rows, row_targets,
                                         teacher_logits, self.temperature, self.vocab_size, self.mse)
        else:
            sums = losses.projected_loss_sums(transform(hidden_rows), decoder.weight, decoder.bias, row_targets,
                                              teacher_logits, self.temperature, mlm_rows, self.mse)
        if teacher_hidden is not None:
            sums["cos"] = losses.cosine_sum(hidden, teacher_hidden, attention_mask)
        return sums
