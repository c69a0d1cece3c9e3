"""GPT-2 (GPT2LMHeadModel) -> GPT2LMHeadModel with fewer blocks (DistilGPT2).

Same class, same names: student block i is teacher block ``layer_map[i]``
(``transformer.h.N``). Copied whole: the token embeddings ``wte``, the learned position
embeddings ``wpe`` (positions are absolute, so a copied block sees the positions its
teacher block saw) and the final LayerNorm ``ln_f``. ``lm_head`` is tied to ``wte`` in
GPT-2 (``tie_word_embeddings``, kept from the teacher): the student's tied head is the
teacher's. An untied teacher's head is copied as a tensor of its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ds_distil.errors import UserError
from ds_distil.models.base import Family, identity


class Gpt2Family(Family):
    name = "gpt2"
    objective = "causal"
    model_types = ("gpt2",)
    students = {"GPT2LMHeadModel": "GPT2LMHeadModel"}
    trainable = ("GPT2LMHeadModel",)
    default_classes = {"gpt2": "GPT2LMHeadModel"}
    layers_attr = "transformer.h"
    depth_key = "n_layer"
    positions_key = "n_positions"
    position_table = "wpe"
    width_key = "n_embd"

    def check_layout(self, config: dict[str, Any], config_file: Path) -> None:
        if config.get("add_cross_attention"):
            raise UserError(f"{config_file}: add_cross_attention is set: the teacher has cross-attention "
                            "layers, which a language-model student cannot use; init-student needs a plain "
                            "GPT2LMHeadModel")
        super().check_layout(config, config_file)

    def warnings(self, teacher_config, student_config, layer_map) -> list[str]:
        if getattr(teacher_config, "scale_attn_by_inverse_layer_idx", False):
            return ["teacher sets scale_attn_by_inverse_layer_idx: each block scales its attention by "
                    "1/(its index + 1), so a copied block at another index computes differently"]
        return []

    def embedding_parameters(self, model):
        body = model.transformer
        return [(f"wte.{n}", p) for n, p in body.wte.named_parameters()] + \
               [(f"wpe.{n}", p) for n, p in body.wpe.named_parameters()]

    def base(self, model):
        return model.transformer

    def head_module(self, model):
        return model.lm_head

    def head_parts(self, model):
        # The final LayerNorm is in the body (last_hidden_state is after ln_f): the head is the
        # projection alone.
        return identity, model.lm_head


GPT2 = Gpt2Family()
