"""BERT (BertForMaskedLM, BertForPreTraining) -> DistilBERT, and DistilBERT itself.

The student is a DistilBertForMaskedLM of the teacher's width: no token-type embeddings,
no pooler, no NSP head, weights mapped by the name map of REFERENCE.md. BERT adds
``token_type_embeddings[0]`` to every token of a single-segment input and DistilBERT has
no token types, so by default that row is folded into the student's position embeddings
(the student's embedding layer then gives the teacher's embedding output);
``fold_token_type=False`` drops it, as the reference does.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ds_distil.errors import UserError
from ds_distil.models.base import Family, Plan, SurgeryOptions

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

# DistilBERT hard-codes this LayerNorm eps in every LayerNorm it has.
DISTILBERT_LAYER_NORM_EPS = 1e-12

# BERT -> DistilBERT names inside one layer (REFERENCE.md); each has .weight and .bias.
BERT_TO_DISTILBERT_LAYER = {
    "attention.self.query": "attention.q_lin",
    "attention.self.key": "attention.k_lin",
    "attention.self.value": "attention.v_lin",
    "attention.output.dense": "attention.out_lin",
    "attention.output.LayerNorm": "sa_layer_norm",
    "intermediate.dense": "ffn.lin1",
    "output.dense": "ffn.lin2",
    "output.LayerNorm": "output_layer_norm",
}
BERT_TO_DISTILBERT_EMBEDDINGS = {
    "distilbert.embeddings.word_embeddings.weight": "bert.embeddings.word_embeddings.weight",
    "distilbert.embeddings.position_embeddings.weight": "bert.embeddings.position_embeddings.weight",
    "distilbert.embeddings.LayerNorm.weight": "bert.embeddings.LayerNorm.weight",
    "distilbert.embeddings.LayerNorm.bias": "bert.embeddings.LayerNorm.bias",
}
BERT_TO_DISTILBERT_HEAD = {
    "vocab_projector.weight": "cls.predictions.decoder.weight",
    "vocab_projector.bias": "cls.predictions.decoder.bias",
}
BERT_TO_DISTILBERT_HEAD_TRANSFORM = {
    "vocab_transform.weight": "cls.predictions.transform.dense.weight",
    "vocab_transform.bias": "cls.predictions.transform.dense.bias",
    "vocab_layer_norm.weight": "cls.predictions.transform.LayerNorm.weight",
    "vocab_layer_norm.bias": "cls.predictions.transform.LayerNorm.bias",
}
TOKEN_TYPE_KEY = "bert.embeddings.token_type_embeddings.weight"
POSITION_KEY = "distilbert.embeddings.position_embeddings.weight"


def check_encoder_layout(config: dict[str, Any], config_file: Path) -> None:
    """BERT-style encoders: bidirectional, absolute positions, a positive depth."""
    if config.get("is_decoder") or config.get("add_cross_attention"):
        raise UserError(f"{config_file}: the teacher is a decoder (is_decoder/add_cross_attention); "
                        f"init-student needs a bidirectional MLM encoder")
    position_type = config.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise UserError(f"{config_file}: position_embedding_type {position_type!r} is not supported; "
                        f"init-student needs absolute position embeddings")
    if not isinstance(config.get("num_hidden_layers"), int) or config["num_hidden_layers"] < 1:
        raise UserError(f"{config_file}: num_hidden_layers is {config.get('num_hidden_layers')!r}; "
                        f"expected a positive integer")


def plan_bert(teacher_keys: list[str], layer_map: list[int], fold_token_type: bool,
              copy_head_transform: bool) -> Plan:
    """BERT -> DistilBERT, with the name map of REFERENCE.md."""
    plan = Plan(copies=dict(BERT_TO_DISTILBERT_EMBEDDINGS))
    for i, t in enumerate(layer_map):
        for bert_name, distil_name in BERT_TO_DISTILBERT_LAYER.items():
            for p in ("weight", "bias"):
                plan.copies[f"distilbert.transformer.layer.{i}.{distil_name}.{p}"] = \
                    f"bert.encoder.layer.{t}.{bert_name}.{p}"
    plan.copies.update(BERT_TO_DISTILBERT_HEAD)
    if copy_head_transform:
        plan.copies.update(BERT_TO_DISTILBERT_HEAD_TRANSFORM)
    else:
        plan.random += list(BERT_TO_DISTILBERT_HEAD_TRANSFORM)
        plan.dropped.update({t: "MLM head transform left random (--random-head-transform, as the reference)"
                             for t in BERT_TO_DISTILBERT_HEAD_TRANSFORM.values()})
    if fold_token_type:
        plan.folds[POSITION_KEY] = [plan.copies.pop(POSITION_KEY), f"{TOKEN_TYPE_KEY}[0]"]
    else:
        plan.dropped[TOKEN_TYPE_KEY] = "DistilBERT has no token-type embeddings (--no-fold-token-type)"
    BERT.drop_unkept_layers(plan, teacher_keys, layer_map)
    for key in teacher_keys:
        if key.startswith("bert.pooler."):
            plan.dropped[key] = "DistilBERT has no pooler"
        elif key.startswith("cls.seq_relationship."):
            plan.dropped[key] = "DistilBERT has no next-sentence head"
    return plan


class BertFamily(Family):
    name = "bert"
    model_types = ("bert",)
    students = {"BertForMaskedLM": "DistilBertForMaskedLM", "BertForPreTraining": "DistilBertForMaskedLM"}
    trainable = ("BertForMaskedLM", "BertForPreTraining")
    default_classes = {"bert": "BertForMaskedLM"}
    layers_attr = "bert.encoder.layer"

    def check_layout(self, config: dict[str, Any], config_file: Path) -> None:
        check_encoder_layout(config, config_file)

    def student_config(self, teacher_config: "PreTrainedConfig", layer_map: list[int],
                       teacher_class: str) -> "PreTrainedConfig":
        from transformers import DistilBertConfig

        t = teacher_config
        return DistilBertConfig(
            vocab_size=t.vocab_size, max_position_embeddings=t.max_position_embeddings,
            sinusoidal_pos_embds=False, n_layers=len(layer_map), n_heads=t.num_attention_heads,
            dim=t.hidden_size, hidden_dim=t.intermediate_size, dropout=t.hidden_dropout_prob,
            attention_dropout=t.attention_probs_dropout_prob,
            # The classifier's dropout when fine-tuned: the teacher's (BERT falls back to its
            # hidden dropout), so that a downstream comparison differs in depth alone.
            seq_classif_dropout=(t.classifier_dropout if getattr(t, "classifier_dropout", None) is not None
                                 else t.hidden_dropout_prob),
            # The layers and the MLM head must apply the teacher's activation, or a copied
            # layer would not compute what the teacher's did.
            activation=t.hidden_act, initializer_range=t.initializer_range,
            # DistilBertConfig's pad default (0) need not be the teacher's.
            pad_token_id=t.pad_token_id, bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id,
            tie_word_embeddings=t.tie_word_embeddings, architectures=["DistilBertForMaskedLM"],
        )

    def plan(self, student_keys: list[str], teacher_keys: list[str], layer_map: list[int],
             options: SurgeryOptions) -> Plan:
        return plan_bert(teacher_keys, layer_map, options.fold_token_type, options.copy_head_transform)

    def warnings(self, teacher_config, student_config, layer_map) -> list[str]:
        eps = getattr(teacher_config, "layer_norm_eps", DISTILBERT_LAYER_NORM_EPS)
        if eps != DISTILBERT_LAYER_NORM_EPS:
            return [f"teacher layer_norm_eps is {eps:g} but DistilBertForMaskedLM fixes every LayerNorm eps at "
                    f"{DISTILBERT_LAYER_NORM_EPS:g}: copied layers compute slightly different outputs"]
        return []

    def base(self, model):
        return model.bert

    def encode(self, model, input_ids, attention_mask):
        # Single-segment input: token type 0 everywhere (the encoder's default).
        return model.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def head_module(self, model):
        return model.cls.predictions

    def head_parts(self, model):
        head = model.cls.predictions
        return head.transform, head.decoder


class DistilBertFamily(Family):
    """The student of BERT teachers; trained, never cut further by init-student."""

    name = "distilbert"
    model_types = ("distilbert",)
    trainable = ("DistilBertForMaskedLM",)
    default_classes = {"distilbert": "DistilBertForMaskedLM"}
    layers_attr = "distilbert.transformer.layer"
    depth_key = "n_layers"
    width_key = "dim"

    def base(self, model):
        return model.distilbert

    def head_parts(self, model):
        # The head is loose attributes of the model, not one module.
        return (lambda h: model.vocab_layer_norm(model.activation(model.vocab_transform(h)))), model.vocab_projector


BERT = BertFamily()
DISTILBERT = DistilBertFamily()
