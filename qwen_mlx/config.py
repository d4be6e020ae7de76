"""Qwen3 model configuration, read from a checkpoint's `config.json`.

Design decisions:
- Field names are Hugging Face's, so `config.json` maps onto `ModelArgs` without a renaming table.
- Both layouts seen in the wild are accepted: transformers 4.x (`rope_theta` and `rope_scaling` at top
  level) and 5.x (`rope_parameters`). Unknown keys are ignored; transformers 5's `num_local_experts` is
  read as `num_experts`.
- Settings that would change the maths but that this module does not implement (attention bias, sliding
  windows) are refused with a clear error rather than silently ignored.
- Every size is checked here, from the file alone: positive, and no tensor dimension beyond what MLX can
  shape (int32). Nothing here iterates over a count the file gives (`num_hidden_layers` may be anything
  until the weights bound it: `qwen_mlx.checkpoint.bound_by_weights`).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any

from .errors import QwenMLXError

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen3_moe")
SUPPORTED_ROPE_TYPES = ("default", "yarn")
# MLX shapes are int32: a larger dimension cannot even be built, let alone loaded.
MAX_DIMENSION = 2**31 - 1
# JSON types accepted for each annotated field type (bool is an int subclass, so it is told apart).
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "int | None": (int,),
    "float": (int, float),
    "bool": (bool,),
    "str": (str,),
    "dict[str, Any] | None": (dict,),
    "list[int]": (list,),
}


@dataclass
class ModelArgs:
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    intermediate_size: int = 0
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    rope_theta: float = 1_000_000.0
    rope_scaling: dict[str, Any] | None = None
    # Mixture of experts (qwen3_moe only).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "config.json") -> ModelArgs:
        """Build from a parsed `config.json`; `source` names the file in error messages."""
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise QwenMLXError(
                f"{source}: model_type {model_type!r} is not supported; "
                f"qwen-mlx runs {', '.join(SUPPORTED_MODEL_TYPES)} (Qwen3 dense and MoE)"
            )
        values = dict(config)
        rope_parameters = values.get("rope_parameters")
        if isinstance(rope_parameters, dict):
            values.setdefault("rope_theta", rope_parameters.get("rope_theta"))
            values.setdefault("rope_scaling", rope_parameters)
        if values.get("num_experts") is None and "num_local_experts" in values:
            values["num_experts"] = values["num_local_experts"]
        for flag, what in (("attention_bias", "attention bias"), ("use_sliding_window", "sliding-window attention")):
            if values.get(flag):
                raise QwenMLXError(f"{source}: {flag}=true ({what}) is not part of Qwen3 and is not supported")

        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in names and v is not None}
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing := [n for n in required if n not in kwargs]:
            raise QwenMLXError(f"{source}: missing required field(s) {', '.join(missing)}")
        for f in dataclasses.fields(cls):
            value = kwargs.get(f.name)
            if value is None:
                continue
            wanted = FIELD_TYPES.get(str(f.type))
            if wanted and (not isinstance(value, wanted) or isinstance(value, bool) and bool not in wanted):
                raise QwenMLXError(f"{source}: {f.name} must be {str(f.type).split(' |')[0]}, found {value!r}")
        args = cls(**kwargs)
        args._validate(source)
        return args

    def _validate(self, source: str) -> None:
        sizes = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")
        if bad := [n for n in sizes if getattr(self, n) <= 0]:
            raise QwenMLXError(f"{source}: {bad[0]} must be positive, found {getattr(self, bad[0])}")
        if self.head_dim is not None and self.head_dim <= 0:
            raise QwenMLXError(f"{source}: head_dim must be positive, found {self.head_dim}")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
            if not self.head_dim:
                raise QwenMLXError(
                    f"{source}: hidden_size ({self.hidden_size}) is smaller than num_attention_heads "
                    f"({self.num_attention_heads}), so head_dim would be 0; set head_dim"
                )
        for name in ("intermediate_size", "num_experts", "num_experts_per_tok", "moe_intermediate_size"):
            if getattr(self, name) < 0:
                raise QwenMLXError(f"{source}: {name} must be 0 or more, found {getattr(self, name)}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not 0 < value <= sys.float_info.max:  # also NaN, inf, and ints too large for a float
                raise QwenMLXError(f"{source}: {name} must be a positive number, found {value}")
        if self.max_position_embeddings <= 0:
            raise QwenMLXError(
                f"{source}: max_position_embeddings must be positive, found {self.max_position_embeddings}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise QwenMLXError(
                f"{source}: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        rope_type = self.rope_type
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise QwenMLXError(
                f"{source}: rope type {rope_type!r} is not supported; use one of {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if self.model_type == "qwen3_moe":
            if self.num_experts <= 0 or not 0 < self.num_experts_per_tok <= self.num_experts:
                raise QwenMLXError(
                    f"{source}: a qwen3_moe model needs num_experts > 0 and 0 < num_experts_per_tok <= "
                    f"num_experts (found {self.num_experts} and {self.num_experts_per_tok})"
                )
            if self.decoder_sparse_step < 1:
                raise QwenMLXError(f"{source}: decoder_sparse_step must be >= 1, found {self.decoder_sparse_step}")
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in self.mlp_only_layers):
                raise QwenMLXError(f"{source}: mlp_only_layers must be a list of layer numbers")
        dense_layer = self.first_dense_layer()
        if dense_layer is not None and self.intermediate_size <= 0:
            raise QwenMLXError(f"{source}: intermediate_size is missing (layer {dense_layer} has a dense MLP)")
        for name, value in self.dimensions().items():
            if value > MAX_DIMENSION:
                raise QwenMLXError(
                    f"{source}: {name} is {value}, beyond the largest tensor dimension MLX can hold "
                    f"({MAX_DIMENSION}); config.json is corrupt: download it again"
                )

    def first_dense_layer(self) -> int | None:
        """The first layer with a dense MLP (None when every layer is sparse), found without iterating over
        `num_hidden_layers`, which is not yet bounded by the weights."""
        if not self.is_sparse_layer(0):  # a dense model, or decoder_sparse_step > 1, or layer 0 listed dense
            return 0
        # decoder_sparse_step is 1: only the layers mlp_only_layers names are dense.
        return min((i for i in self.mlp_only_layers if 0 <= i < self.num_hidden_layers), default=None)

    def dimensions(self) -> dict[str, int]:
        """The config's sizes that become tensor dimensions (each appears unpacked in some tensor on disk:
        a row count or a norm's length), named as an error would name them."""
        dims = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "head_dim": self.head_dim,
            "num_attention_heads * head_dim": self.num_attention_heads * self.head_dim,
            "num_key_value_heads * head_dim": self.num_key_value_heads * self.head_dim,
        }
        if self.first_dense_layer() is not None:
            dims["intermediate_size"] = self.intermediate_size
        if self.model_type == "qwen3_moe":
            dims["num_experts"] = self.num_experts
            dims["moe_intermediate_size"] = self.moe_intermediate_size
        return dims

    @property
    def context_length(self) -> int:
        """The longest sequence the model supports: `max_position_embeddings`, or YaRN's extended length."""
        length = self.max_position_embeddings
        scaling = self.rope_scaling or {}
        if scaling.get("factor") and scaling.get("original_max_position_embeddings"):
            length = max(length, int(scaling["factor"] * scaling["original_max_position_embeddings"]))
        return length

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type") or self.rope_scaling.get("type") or "default"

    def is_sparse_layer(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` uses the mixture of experts (Hugging Face's rule)."""
        return (
            self.model_type == "qwen3_moe"
            and layer_idx not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )
