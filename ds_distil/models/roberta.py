"""RoBERTa and XLM-RoBERTa -> the same class with fewer layers (DistilRoBERTa).

Same layout, same names: every student tensor is the teacher tensor of the same name,
layer indices going through the layer map. The student keeps RoBERTa's token-type
embedding (of size 1) and ``lm_head``; only a pooler (absent from the MLM class) is
dropped. XLM-RoBERTa is the same model with another ``model_type`` and class name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ds_distil.models.base import Family, Plan, SurgeryOptions
from ds_distil.models.bert import check_encoder_layout

HEAD_TRANSFORM = ("lm_head.dense.", "lm_head.layer_norm.")


class RobertaFamily(Family):
    name = "roberta"
    model_types = ("roberta", "xlm-roberta")
    students = {"RobertaForMaskedLM": "RobertaForMaskedLM", "XLMRobertaForMaskedLM": "XLMRobertaForMaskedLM"}
    trainable = ("RobertaForMaskedLM", "XLMRobertaForMaskedLM")
    default_classes = {"roberta": "RobertaForMaskedLM", "xlm-roberta": "XLMRobertaForMaskedLM"}
    layers_attr = "roberta.encoder.layer"

    def check_layout(self, config: dict[str, Any], config_file: Path) -> None:
        check_encoder_layout(config, config_file)

    def max_positions(self, config: dict[str, Any]) -> int | None:
        """RoBERTa's positions start after its padding index."""
        limit = super().max_positions(config)
        if limit is None:
            return None
        pad = config.get("pad_token_id")
        return limit - (pad if isinstance(pad, int) else 1) - 1

    def plan(self, student_keys: list[str], teacher_keys: list[str], layer_map: list[int],
             options: SurgeryOptions) -> Plan:
        def random(key: str) -> str | None:
            if key.startswith(HEAD_TRANSFORM) and not options.copy_head_transform:
                return "MLM head transform left random (--random-head-transform)"
            return None

        plan = self.same_layout_plan(student_keys, teacher_keys, layer_map, random)
        for key in teacher_keys:
            if key.startswith("roberta.pooler."):
                plan.dropped[key] = "the MLM student has no pooler"
        return plan

    def base(self, model):
        return model.roberta

    def head_module(self, model):
        return model.lm_head

    def head_parts(self, model):
        from transformers.activations import gelu  # what RobertaLMHead.forward calls

        head = model.lm_head
        return (lambda h: head.layer_norm(gelu(head.dense(h)))), head.decoder


ROBERTA = RobertaFamily()
