"""Llama-style decoders (Llama, Mistral, Qwen2, Qwen3) -> the same class with fewer layers.

These share one layout: ``model.embed_tokens``, ``model.layers.N`` (RMSNorm, attention
with rotary positions, gated MLP), ``model.norm``, ``lm_head``. Same names in student and
teacher: layer i is teacher layer ``layer_map[i]``; the embeddings and the final norm
are copied. Rotary positions have no weights (``rotary_emb.inv_freq`` is rebuilt from
the config, which the student keeps), so a copied layer sees the positions its teacher
layer saw. ``lm_head`` follows the teacher's ``tie_word_embeddings``: tied (one tensor
with ``embed_tokens``) or copied as a tensor of its own. A per-layer ``layer_types``
list (sliding-window or full attention) is cut through the layer map, so each copied
layer keeps its attention kind.
"""

from __future__ import annotations

from typing import Any

from ds_distil.models.base import Family, identity

CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
           "qwen3": "Qwen3ForCausalLM"}


class LlamaFamily(Family):
    name = "llama"
    objective = "causal"
    model_types = tuple(CLASSES)
    students = {name: name for name in CLASSES.values()}
    trainable = tuple(CLASSES.values())
    default_classes = dict(CLASSES)
    layers_attr = "model.layers"
    position_table = None  # rotary

    def max_positions(self, config: dict[str, Any]) -> int | None:
        return None  # rotary positions: no table to run past (max_position_embeddings is advisory)

    def student_config(self, teacher_config, layer_map, teacher_class):
        config = super().student_config(teacher_config, layer_map, teacher_class)
        types = getattr(teacher_config, "layer_types", None)
        if types is not None:
            config.layer_types = [types[t] for t in layer_map]
        return config

    def embedding_parameters(self, model):
        return [(f"embed_tokens.{n}", p) for n, p in model.model.embed_tokens.named_parameters()]

    def base(self, model):
        return model.model

    def head_module(self, model):
        return model.lm_head

    def head_parts(self, model):
        return identity, model.lm_head  # the final norm is in the body


LLAMA = LlamaFamily()
