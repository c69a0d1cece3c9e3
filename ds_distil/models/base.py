"""What every model family answers: its layer stack, its surgery, its forward pass, its head.

A :class:`Family` is the one place that knows a model layout. ``surgery``, ``modeling`` and
``trainer`` ask the family of a model (``family_of``) and never branch on class names:

- ``layers_attr`` / :meth:`Family.layers`: where the stack of layers is (the layer map
  indexes it);
- :meth:`Family.student_config` and :meth:`Family.plan`: the surgery's name map, i.e. which
  tensors are copied, folded, left random or dropped, each with its reason;
- :meth:`Family.encode`: the last hidden states (``[batch, length, hidden]``);
- :meth:`Family.head_parts`: the head as a transform and a plain ``nn.Linear`` vocabulary
  projection, which the losses fuse;
- ``objective``: ``"masked"`` (MLM) or ``"causal"`` (next-token prediction).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ds_distil.errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedConfig


@dataclass
class Plan:
    """Where every student tensor comes from, and what happens to every teacher tensor."""

    copies: dict[str, str] = field(default_factory=dict)       # student key -> teacher key
    folds: dict[str, list[str]] = field(default_factory=dict)  # student key -> teacher terms summed
    random: list[str] = field(default_factory=list)            # student keys left as initialised
    dropped: dict[str, str] = field(default_factory=dict)      # teacher key -> why it is not used

    def teacher_sources(self) -> set[str]:
        """Teacher keys read by the plan (a term ``name[0]`` reads ``name``)."""
        terms = [t for ts in self.folds.values() for t in ts]
        return set(self.copies.values()) | {term_key(t) for t in terms}


@dataclass(frozen=True)
class SurgeryOptions:
    """The ``init-student`` options a family's plan may use (each family ignores the rest)."""

    fold_token_type: bool = True
    copy_head_transform: bool = True


def term_key(term: str) -> str:
    """``name[0]`` -> ``name``."""
    return term.split("[", 1)[0]


class Family:
    """One model family; subclasses fill in the attributes and override what differs."""

    name: str = ""
    objective: str = "masked"  # "masked" (MLM) or "causal" (next-token)
    model_types: tuple[str, ...] = ()
    # Teacher class -> student class for init-student ({} for a student-only family).
    students: dict[str, str] = {}
    # Classes the trainer runs (as a student or a teacher).
    trainable: tuple[str, ...] = ()
    # model_type -> the class built for a config.json without "architectures".
    default_classes: dict[str, str] = {}
    # Dotted attribute path of the layer stack; state-dict keys of layer N start with it + ".N.".
    layers_attr: str = ""
    # config.json key of the depth ("num_hidden_layers", GPT-2: "n_layer").
    depth_key: str = "num_hidden_layers"
    # config.json key of the width ("hidden_size", DistilBERT: "dim", GPT-2: "n_embd").
    width_key: str = "hidden_size"
    # config.json key of the position-table size ("max_position_embeddings", GPT-2: "n_positions").
    positions_key: str = "max_position_embeddings"
    # Dotted path, below ``base(model)``, of the learned position embedding (GPT-2: "wpe");
    # None for rotary positions, which have no weights (Llama-style, ModernBERT).
    position_table: str | None = "embeddings.position_embeddings"

    # ------------------------------------------------------------------ layout

    def layers(self, model: "nn.Module") -> "nn.ModuleList":
        """The model's stack of layers (the layer map indexes it)."""
        return attrgetter(self.layers_attr)(model)

    def _layer_re(self) -> re.Pattern:
        return re.compile(rf"^({re.escape(self.layers_attr)}\.)(\d+)(\..*)$")

    def layer_index(self, key: str) -> int | None:
        """The layer a state-dict key belongs to, or None (embeddings, head, final norm)."""
        match = self._layer_re().match(key)
        return int(match.group(2)) if match else None

    def with_layer_index(self, key: str, index: int) -> str:
        match = self._layer_re().match(key)
        return f"{match.group(1)}{index}{match.group(3)}"

    def num_layers(self, config: dict[str, Any]) -> Any:
        """The depth recorded in a ``config.json`` (unchecked)."""
        return config.get(self.depth_key)

    def check_layout(self, config: dict[str, Any], config_file: Path) -> None:
        """Reject variants of the family whose extra weights the surgery would drop silently."""
        depth = self.num_layers(config)
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
            raise UserError(f"{config_file}: {self.depth_key} is {depth!r}; expected a positive integer")
        # Families that mix attention kinds (Llama-style sliding windows, ModernBERT's
        # global/local layers) list one per layer; the surgery cuts it with the layer map.
        types = config.get("layer_types")
        if types is not None and (not isinstance(types, list) or len(types) != depth):
            raise UserError(f"{config_file}: layer_types must list one attention type per layer "
                            f"({depth}); restore the model's own config.json")

    def max_positions(self, config: dict[str, Any]) -> int | None:
        """The longest sequence a model of this ``config.json`` takes, or None (not limited)."""
        limit = config.get(self.positions_key)
        return limit if isinstance(limit, int) and not isinstance(limit, bool) else None

    # ------------------------------------------------------------------ surgery

    def student_class(self, teacher_class: str) -> str:
        return self.students[teacher_class]

    def student_config(self, teacher_config: "PreTrainedConfig", layer_map: list[int],
                       teacher_class: str) -> "PreTrainedConfig":
        """Default: the teacher's config, ``len(layer_map)`` layers deep (same class)."""
        config = copy.deepcopy(teacher_config)
        config.num_hidden_layers = len(layer_map)
        config.architectures = [self.student_class(teacher_class)]
        return config

    def plan(self, student_keys: list[str], teacher_keys: list[str], layer_map: list[int],
             options: SurgeryOptions) -> Plan:
        """Default: student and teacher share names; layer indices go through the map."""
        return self.same_layout_plan(student_keys, teacher_keys, layer_map)

    def same_layout_plan(self, student_keys: list[str], teacher_keys: list[str], layer_map: list[int],
                         random: Callable[[str], str | None] = lambda key: None) -> Plan:
        """Copy every student tensor from the teacher tensor of the same name (layers through the
        map); ``random(key)`` returns the reason to leave a student tensor random instead."""
        plan = Plan()
        for key in student_keys:
            layer = self.layer_index(key)
            reason = random(key)
            if layer is not None:
                plan.copies[key] = self.with_layer_index(key, layer_map[layer])
            elif reason:
                plan.random.append(key)
                plan.dropped[key] = reason
            else:
                plan.copies[key] = key
        self.drop_unkept_layers(plan, teacher_keys, layer_map)
        return plan

    def drop_unkept_layers(self, plan: Plan, teacher_keys: list[str], layer_map: list[int]) -> None:
        kept = set(layer_map)
        for key in teacher_keys:
            layer = self.layer_index(key)
            if layer is not None and layer not in kept:
                plan.dropped[key] = f"teacher layer {layer} is not in the layer map"

    def warnings(self, teacher_config: "PreTrainedConfig", student_config: "PreTrainedConfig",
                 layer_map: list[int]) -> list[str]:
        """Settings the student cannot carry over, so that its copied layers differ slightly."""
        return []

    def position_embeddings(self, model: "nn.Module") -> "nn.Module | None":
        """The learned position table (an ``nn.Embedding``), or None for rotary positions."""
        return attrgetter(self.position_table)(self.base(model)) if self.position_table else None

    def embedding_parameters(self, model: "nn.Module") -> list[tuple[str, "torch.Tensor"]]:
        """The input embeddings (and learned positions) the teacher fingerprint hashes."""
        return list(model.base_model.embeddings.named_parameters())

    # ------------------------------------------------------------------ forward

    def base(self, model: "nn.Module") -> "nn.Module":
        """The model without its head (the module that returns ``last_hidden_state``)."""
        return model.base_model

    def encode(self, model: "nn.Module", input_ids: "torch.Tensor", attention_mask: "torch.Tensor") -> "torch.Tensor":
        """Last hidden states ``[batch, length, hidden]`` (after the final norm for decoders)."""
        return self.base(model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def head_parts(self, model: "nn.Module") -> tuple[Callable[["torch.Tensor"], "torch.Tensor"], "nn.Linear"]:
        """The head in two: its transform (hidden -> hidden) and its vocabulary projection."""
        raise NotImplementedError

    def head_module(self, model: "nn.Module") -> "nn.Module | None":
        """The head as one module when there is one (ZeRO-3 gathers its weights on call)."""
        return None

    def project(self, model: "nn.Module", hidden_rows: "torch.Tensor") -> "torch.Tensor":
        """Vocabulary logits for selected hidden-state rows ``[n, hidden] -> [n, vocab]``."""
        head = self.head_module(model)
        if head is not None:
            return head(hidden_rows)
        transform, decoder = self.head_parts(model)
        return decoder(transform(hidden_rows))


def identity(hidden: "torch.Tensor") -> "torch.Tensor":
    """The transform of a head that is a bare projection (decoders: the final norm is in the body)."""
    return hidden
