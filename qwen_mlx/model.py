"""Qwen3 in MLX: dense (`qwen3`) and mixture-of-experts (`qwen3_moe`) in one module.

Notable features: GQA attention with per-head RMSNorm on queries and keys before RoPE, no biases, SwiGLU
MLPs, tied or untied embeddings, default or YaRN RoPE (for dense and MoE alike), and a softmax top-k
router whose experts run through gather matmuls. `mx.fast` kernels throughout (rms_norm, rope,
scaled_dot_product_attention), with mlx-lm's key/value caches (plain or quantized). Parameter names are
Hugging Face's, with mlx-lm's stacked `mlp.switch_mlp.*` experts, so mlx-lm checkpoints load as they are
and Hugging Face ones after `sanitize`.
The model knows tensors only: token ids in, logits out. On several Macs, `qwen_mlx.distributed` swaps in
sharded layers and sets the two hooks here: a MoE block's expert range and group, and the pipeline stage.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .config import ModelArgs
from .errors import QwenMLXError
from .experts import SwitchGLU
from .rope import make_rope


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, head_dim = args.hidden_size, args.head_dim
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.scale = head_dim**-0.5
        self.q_proj = nn.Linear(dim, self.n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * head_dim, dim, bias=False)
        self.q_norm = nn.RMSNorm(head_dim, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(head_dim, eps=args.rms_norm_eps)
        self.rope = make_rope(head_dim, args.rope_theta, args.rope_scaling, args.max_position_embeddings)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        B, L, _ = x.shape
        queries = self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, -1)).transpose(0, 2, 1, 3)
        keys = self.k_norm(self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)).transpose(0, 2, 1, 3)
        values = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        # (B, heads, L, head_dim)
        offset = cache.offset if cache is not None else 0
        queries = self.rope(queries, offset=offset)
        keys = self.rope(keys, offset=offset)
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)
        if hasattr(cache, "bits"):  # mlx-lm's QuantizedKVCache: keys and values are (packed, scales, biases)
            from mlx_lm.models.base import quantized_scaled_dot_product_attention

            out = quantized_scaled_dot_product_attention(
                queries, keys, values, scale=self.scale, mask=mask, group_size=cache.group_size, bits=cache.bits
            )
        else:
            out = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoeBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.norm_topk_prob = args.norm_topk_prob
        self.gate = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.switch_mlp = SwitchGLU(args.hidden_size, args.moe_intermediate_size, args.num_experts)
        # Expert parallelism (qwen_mlx.distributed): this rank holds experts [first_expert, +local_experts).
        self.group: Any = None
        self.first_expert = 0
        self.local_experts = args.num_experts

    def __call__(self, x: mx.array) -> mx.array:
        probs = mx.softmax(self.gate(x), axis=-1, precise=True)  # softmax over all experts, then top-k
        k = self.top_k
        indices = mx.stop_gradient(mx.argpartition(probs, kth=-k, axis=-1)[..., -k:])
        scores = mx.take_along_axis(probs, indices, axis=-1)
        if self.norm_topk_prob:
            scores = scores / scores.sum(axis=-1, keepdims=True)
        if self.group is not None:
            # Run the chosen experts this rank holds (others weigh 0); the all-reduce adds the ranks' parts.
            local = indices - self.first_expert
            mine = (local >= 0) & (local < self.local_experts)
            indices = mx.where(mine, local, 0)
            scores = mx.where(mine, scores, 0)
        y = self.switch_mlp(x, indices)  # (..., k, D)
        y = (y * scores[..., None]).sum(axis=-2).astype(y.dtype)
        if self.group is not None:
            y = mx.distributed.all_sum(y, group=self.group)
        return y


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(args)
        if args.is_sparse_layer(layer_idx):
            self.mlp = SparseMoeBlock(args)
        else:
            self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen3Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        # Pipeline parallelism (qwen_mlx.distributed): `layers` holds this rank's stage only.
        self.pipeline: Any = None

    def __call__(self, inputs: mx.array, cache: list[Any] | None = None) -> mx.array:
        h = self.embed_tokens(inputs)
        cache = cache or [None] * len(self.layers)
        # mlx-lm's caches know their mask: "causal" (the kernel's, aligned to the last query, so it also covers
        # chunks after a cache) for one sequence, an array for a left-padded batch (continuous batching).
        if cache[0] is not None and hasattr(cache[0], "make_mask"):
            mask = cache[0].make_mask(h.shape[1], return_array=False, window_size=None)
        else:
            mask = "causal" if h.shape[1] > 1 else None
        if self.pipeline is not None:
            h = self.pipeline.receive(h)
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            h = layer(h, mask, layer_cache)
        if self.pipeline is not None:
            h = self.pipeline.pass_on(h, cache)
        return self.norm(h)


class Model(nn.Module):
    """Qwen3 causal LM: `model(token_ids (B, L), cache) -> logits (B, L, vocab)`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = Qwen3Model(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache: list[Any] | None = None) -> mx.array:
        h = self.model(inputs, cache)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.model.layers

    def make_cache(self) -> list[Any]:
        """One mlx-lm `KVCache` per layer (see `qwen_mlx.engine.make_cache` for the quantized kind)."""
        # Imported here: importing mlx_lm brings in transformers (seconds), which loading and converting skip.
        from mlx_lm.models.cache import KVCache

        return [KVCache() for _ in self.layers]

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map Hugging Face tensor names onto ours: drop the tied head and stack per-expert weights."""
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        for i, layer in enumerate(self.layers):
            if not isinstance(layer.mlp, SparseMoeBlock):
                continue
            prefix = f"model.layers.{i}.mlp"
            for name in ("gate_proj", "up_proj", "down_proj"):
                key = f"{prefix}.experts.{{}}.{name}.weight"
                if key.format(0) not in weights:
                    continue  # already stacked (an MLX checkpoint), or missing: reported by the loader
                missing = [key.format(e) for e in range(self.args.num_experts) if key.format(e) not in weights]
                if missing:
                    raise QwenMLXError(
                        f"tensor {missing[0]} is missing from the checkpoint (expert weights incomplete)"
                    )
                experts = [weights.pop(key.format(e)) for e in range(self.args.num_experts)]
                weights[f"{prefix}.switch_mlp.{name}.weight"] = mx.stack(experts)
        return weights
