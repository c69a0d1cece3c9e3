"""Model adapters: the encoder and the MLM head of each supported architecture, apart.

The losses need the last hidden states (L_cos) and the vocabulary projection only at the
positions a loss uses (L_ce, L_mlm). Hugging Face's ``*ForMaskedLM.forward`` projects
every position to the full vocabulary, the largest matmul of the step; splitting encoder
and head lets ds-distil project just the rows it needs.
"""

from __future__ import annotations

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


def load_masked_lm(path: str, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a supported masked-LM from a local HF directory (never from a hub)."""
    from transformers import AutoConfig, AutoModelForMaskedLM, BertForPreTraining

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    archs = config.architectures or []
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if "BertForPreTraining" in archs:
        return BertForPreTraining.from_pretrained(path, **kwargs)
    return AutoModelForMaskedLM.from_pretrained(path, **kwargs)


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
