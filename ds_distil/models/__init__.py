"""Model families: one module each, and the lookup that finds a model's family.

| module | family | student of a teacher | objective |
|---|---|---|---|
| ``bert`` | BERT (BertForMaskedLM, BertForPreTraining); DistilBERT | DistilBertForMaskedLM | masked |
| ``roberta`` | RoBERTa, XLM-RoBERTa | the same class, fewer layers | masked |
| ``modernbert`` | ModernBertForMaskedLM | the same class, fewer layers | masked |
| ``gpt2`` | GPT2LMHeadModel | the same class, fewer blocks (DistilGPT2) | causal |
| ``llama`` | Llama, Mistral, Qwen2, Qwen3 (``*ForCausalLM``) | the same class, fewer layers | causal |

``family_of`` takes a loaded model, a config object or a ``config.json`` dict. The rest of
ds-distil asks the family (see :class:`ds_distil.models.base.Family`) and never branches on
class names.
"""

from __future__ import annotations

from typing import Any

from ds_distil.models.base import Family, Plan, SurgeryOptions
from ds_distil.models.bert import BERT, DISTILBERT
from ds_distil.models.gpt2 import GPT2
from ds_distil.models.llama import LLAMA
from ds_distil.models.modernbert import MODERNBERT
from ds_distil.models.roberta import ROBERTA

FAMILIES: tuple[Family, ...] = (BERT, DISTILBERT, ROBERTA, MODERNBERT, GPT2, LLAMA)

__all__ = ["FAMILIES", "Family", "Plan", "SurgeryOptions", "family_of", "class_of", "TEACHER_CLASSES",
           "TRAINABLE_CLASSES"]

# init-student's teachers, and the classes the trainer runs, in a stable order for messages.
TEACHER_CLASSES: tuple[str, ...] = tuple(c for f in FAMILIES for c in f.students)
TRAINABLE_CLASSES: tuple[str, ...] = tuple(c for f in FAMILIES for c in f.trainable)
_BY_CLASS = {c: f for f in FAMILIES for c in (*f.students, *f.trainable)}
_DEFAULT_CLASS = {t: c for f in FAMILIES for t, c in f.default_classes.items()}


def class_of(config: Any) -> str | None:
    """The class a model is, or would be built as from its ``config.json`` (dict or config
    object): its first ``architectures`` entry, else its model_type's default class."""
    if hasattr(config, "config") and not isinstance(config, dict):  # a model
        return type(config).__name__
    get = config.get if isinstance(config, dict) else (lambda key: getattr(config, key, None))
    archs = get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    model_type = get("model_type")
    return _DEFAULT_CLASS.get(model_type) if isinstance(model_type, str) else None


def family_of(model_or_config: Any) -> Family | None:
    """The family of a model, a config object or a ``config.json`` dict; None if unsupported."""
    name = class_of(model_or_config)
    return _BY_CLASS.get(name) if name else None
