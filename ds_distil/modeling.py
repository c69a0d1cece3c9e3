"""Model adapters: the encoder and the MLM head of each supported architecture, apart.

The losses need the last hidden states (L_cos) and the vocabulary projection only at the
positions a loss uses (L_ce, L_mlm). Hugging Face's ``*ForMaskedLM.forward`` projects
every position to the full vocabulary, the largest matmul of the step; splitting encoder
and head lets ds-distil project just the rows it needs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

SUPPORTED = ("BertForMaskedLM", "BertForPreTraining", "DistilBertForMaskedLM", "RobertaForMaskedLM")


def _arch(model: nn.Module) -> str:
    name = type(model).__name__
    if name not in SUPPORTED:
        raise TypeError(f"unsupported model class {name}; supported: {', '.join(SUPPORTED)}")
    return name


def encode(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states ``[batch, length, hidden]`` of ``model``'s encoder."""
    arch = _arch(model)
    if arch == "DistilBertForMaskedLM":
        return model.distilbert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    if arch == "RobertaForMaskedLM":
        return model.roberta(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    # BERT: single-segment input, token type 0 everywhere (the encoder's default).
    return model.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def mlm_head(model: nn.Module) -> nn.Module | None:
    """The module mapping hidden states to vocabulary logits (None for DistilBERT, see project)."""
    arch = _arch(model)
    if arch == "RobertaForMaskedLM":
        return model.lm_head
    if arch in ("BertForMaskedLM", "BertForPreTraining"):
        return model.cls.predictions
    return None


def project(model: nn.Module, hidden_rows: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits for selected hidden-state rows ``[n, hidden] -> [n, vocab]``."""
    head = mlm_head(model)
    if head is not None:
        return head(hidden_rows)
    transform, decoder = head_parts(model)
    return decoder(transform(hidden_rows))


def head_parts(model: nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor], nn.Linear]:
    """The MLM head in two: its transform (hidden -> hidden) and its vocabulary projection.

    ``project(model, h) == decoder(transform(h))``. The projection is a plain ``nn.Linear``
    (weight tied to the word embeddings, bias tied to the head's bias) in all three
    architectures, so the losses can fuse it (``losses.projected_loss_sums``).
    """
    arch = _arch(model)
    if arch == "DistilBertForMaskedLM":  # the head is loose attributes of the model
        return (lambda h: model.vocab_layer_norm(model.activation(model.vocab_transform(h)))), model.vocab_projector
    if arch == "RobertaForMaskedLM":
        from transformers.activations import gelu  # what RobertaLMHead.forward calls

        head = model.lm_head
        return (lambda h: head.layer_norm(gelu(head.dense(h)))), head.decoder
    head = model.cls.predictions
    return head.transform, head.decoder


def zero3_partitioned(param: torch.Tensor) -> bool:
    """Whether ZeRO-3 partitions ``param`` (its full value exists only inside its module's forward)."""
    return hasattr(param, "ds_id")


# The class ``load_masked_lm`` builds for a config.json without BertForPreTraining in it.
MASKED_LM_BY_TYPE = {"bert": "BertForMaskedLM", "distilbert": "DistilBertForMaskedLM",
                     "roberta": "RobertaForMaskedLM"}


def architecture_problem(config: dict, config_file: str | Path = "config.json") -> str | None:
    """Why ds-distil cannot train or distil the model of this ``config.json``, or None.

    The class that would be built must be a supported masked LM, and a checkpoint saved
    as another class (``BertModel``, ``GPT2LMHeadModel``...) is refused too: it has no
    MLM head, which loading would fill with random weights.
    """
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    saved = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    built = "BertForPreTraining" if saved == "BertForPreTraining" else MASKED_LM_BY_TYPE.get(model_type)
    name = saved or built or f"model_type {model_type!r}"
    if built is None or (saved is not None and saved not in SUPPORTED):
        return (f"{config_file}: architecture {name} is not supported; ds-distil trains and distils "
                f"{', '.join(SUPPORTED)} (a masked LM with its head)")
    return None


def max_positions(config: dict) -> int | None:
    """The longest sequence a model of this ``config.json`` takes (RoBERTa's positions start
    after its padding index), or None when the config does not say."""
    limit = config.get("max_position_embeddings")
    if not isinstance(limit, int) or isinstance(limit, bool):
        return None
    if config.get("model_type") == "roberta":
        pad = config.get("pad_token_id")
        return limit - (pad if isinstance(pad, int) else 1) - 1
    return limit


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
    from transformers import AutoConfig, AutoModelForMaskedLM, BertForPreTraining

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
            model = BertForPreTraining(config) if "BertForPreTraining" in (config.architectures or []) else \
                AutoModelForMaskedLM.from_config(config)
    except Exception as err:  # noqa: BLE001 - transformers raises ValueError, TypeError, KeyError...
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        return f"{directory / 'config.json'} does not describe a model transformers can build ({reason})"
    expected = {name: list(t.shape) for name, t in model.state_dict().items()}
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


def load_masked_lm(path: str, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a supported masked-LM from a local HF directory (never from a hub).

    A path that is not a model directory, an unsupported architecture or weights that do
    not load are a :class:`~ds_distil.errors.UserError` naming the directory.
    """
    from transformers import AutoConfig, AutoModelForMaskedLM, BertForPreTraining

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
        if "BertForPreTraining" in (config.architectures or []):
            return BertForPreTraining.from_pretrained(str(directory), **kwargs)
        return AutoModelForMaskedLM.from_pretrained(str(directory), **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
        reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: the model does not load ({reason}); its config.json and weights must belong "
                        "together: save it again with save_pretrained() (or rebuild the student with "
                        "ds-distil init-student)") from None


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

    def __init__(self, student: nn.Module, temperature: float):
        super().__init__()
        self.student = student
        self.temperature = temperature
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
                                         teacher_logits, self.temperature, self.vocab_size)
        else:
            sums = losses.projected_loss_sums(transform(hidden_rows), decoder.weight, decoder.bias, row_targets,
                                              teacher_logits, self.temperature, mlm_rows)
        if teacher_hidden is not None:
            sums["cos"] = losses.cosine_sum(hidden, teacher_hidden, attention_mask)
        return sums
