"""ModernBERT (ModernBertForMaskedLM) -> the same class with fewer layers.

Same names in student and teacher: layer i is teacher layer ``layer_map[i]``
(``model.layers.N``); the embeddings (``tok_embeddings`` and their norm), the final norm,
the prediction head (dense + norm) and the decoder bias are copied, the decoder weight
being tied to the token embeddings as in the teacher. Positions are rotary (no weights).
Two things depend on a layer's index, and the surgery keeps each copied layer's:

- ``layer_types`` (global or sliding-window attention, every third layer global by
  default) is cut through the layer map, so a copied layer keeps its attention kind;
- ModernBERT's first layer has no attention norm (``attn_norm`` is an identity there).
  The default map always keeps teacher layer 0 as student layer 0. A map that starts at
  another teacher layer drops that layer's ``attn_norm`` (student layer 0 has none), and
  the report warns that this one layer computes differently from its teacher layer.
"""

from __future__ import annotations

from ds_distil.models.base import Family, Plan, SurgeryOptions


class ModernBertFamily(Family):
    name = "modernbert"
    model_types = ("modernbert",)
    students = {"ModernBertForMaskedLM": "ModernBertForMaskedLM"}
    trainable = ("ModernBertForMaskedLM",)
    default_classes = {"modernbert": "ModernBertForMaskedLM"}
    layers_attr = "model.layers"
    position_table = None  # rotary

    def student_config(self, teacher_config, layer_map, teacher_class):
        config = super().student_config(teacher_config, layer_map, teacher_class)
        config.layer_types = [teacher_config.layer_types[t] for t in layer_map]
        return config

    def plan(self, student_keys: list[str], teacher_keys: list[str], layer_map: list[int],
             options: SurgeryOptions) -> Plan:
        def random(key: str) -> str | None:
            if key.startswith("head.") and not options.copy_head_transform:
                return "MLM head transform left random (--random-head-transform)"
            return None

        plan = self.same_layout_plan(student_keys, teacher_keys, layer_map, random)
        first = layer_map[0]
        for key in teacher_keys:
            if first != 0 and key.startswith(f"model.layers.{first}.attn_norm."):
                plan.dropped[key] = ("student layer 0 has no attention norm (ModernBERT's first layer): this "
                                     "layer computes differently from its teacher layer")
        return plan

    def warnings(self, teacher_config, student_config, layer_map) -> list[str]:
        if layer_map[0] == 0:
            return []
        return [f"student layer 0 is teacher layer {layer_map[0]} without its attention norm (ModernBERT's first "
                "layer has none): that layer computes differently; keep teacher layer 0 first for an exact copy"]

    def base(self, model):
        return model.model

    def head_parts(self, model):
        return model.head, model.decoder


MODERNBERT = ModernBertFamily()
