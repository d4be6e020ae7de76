"""Qwen3 in MLX: dense (`qwen3`) and mixture-of-experts (`qwen3_moe`) in one module.

Notable features: GQA attention with per-head RMSNorm on queries and keys before RoPE, no biases, SwiGLU
MLPs, tied or untied embeddings, default or YaRN RoPE (for dense and MoE alike), and a softmax top-k
router whose experts run through gather matmuls. `mx.fast` kernels throughout (rms_norm, rope,
scaled_dot_product_attention), with mlx-lm's key/value caches (plain or quantized). Parameter names are
Hugging Face's, with mlx-lm's stacked `mlp.switch_mlp.*` experts, so mlx-lm checkpoints load as they are
and Hugging Face ones after `sanitize`. At load, q/k/v and gate/up are fused into one matmul each
(`qwen_mlx.fuse`); each layer's forward takes either layout, and `fusion` says which it holds.
The model knows tensors only: token ids in, logits out.

Sharding lives here too, as in mlx-lm's `Model.shard`: `shard(group)` splits every layer across the ranks
of a group (tensor parallelism: attention heads and MLP columns through MLX's `shard_linear`, one
all-reduce after attention and one after the MLP; MoE layers expert-parallel: each rank holds
`num_experts / N` whole experts, the router replicated), and `keep_stage(start, stop, group)` keeps one
pipeline stage's layers. Both split the embedding and the head by vocabulary rows (`shard_vocabulary`,
`VocabParallel`), so every rank holds about 1/N of the weights. `qwen_mlx.distributed` decides the split
and reads the weights. Sharding cuts the unfused projections; each rank fuses its slices after.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear
from mlx.utils import tree_map

from .config import ModelArgs
from .errors import QwenMLXError
from .experts import SwitchGLU, swiglu
from .fuse import Fusion, unfuse
from .mlxlm import submodule
from .rope import make_rope


class Attention(nn.Module):
    fusion: Fusion | None = None  # q/k/v as one `qkv_proj` (`qwen_mlx.fuse`)

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
        if self.fusion is not None:
            queries, keys, values = self.fusion.split(self.qkv_proj(x))
        else:
            queries, keys, values = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        queries = self.q_norm(queries.reshape(B, L, self.n_heads, -1)).transpose(0, 2, 1, 3)
        keys = self.k_norm(keys.reshape(B, L, self.n_kv_heads, -1)).transpose(0, 2, 1, 3)
        values = values.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        # (B, heads, L, head_dim)
        offset = cache.offset if cache is not None else 0
        queries = self.rope(queries, offset=offset)
        keys = self.rope(keys, offset=offset)
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)
        if hasattr(cache, "bits"):  # mlx-lm's QuantizedKVCache: keys and values are (packed, scales, biases)
            out = submodule("models.base").quantized_scaled_dot_product_attention(
                queries, keys, values, scale=self.scale, mask=mask, group_size=cache.group_size, bits=cache.bits
            )
        else:
            out = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    fusion: Fusion | None = None  # gate/up as one `gate_up_proj` (`qwen_mlx.fuse`)

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        if self.fusion is not None:
            gate, up = self.fusion.split(self.gate_up_proj(x))
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(swiglu(gate, up))


class SparseMoeBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.norm_topk_prob = args.norm_topk_prob
        self.gate = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.switch_mlp = SwitchGLU(args.hidden_size, args.moe_intermediate_size, args.num_experts)
        # Expert parallelism (`Model.shard`): this rank holds experts [first_expert, +local_experts).
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
        # Pipeline parallelism (`Model.keep_stage`): `layers` holds this rank's stage only.
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

    def shard(self, group) -> None:
        """Tensor parallelism: split every layer, the embedding and the head across `group`."""
        n, rank = group.size(), group.rank()
        unfuse(self)  # shard_linear cuts each projection by name; a rank fuses its slices afterwards
        for layer in self.layers:
            attn = layer.self_attn
            for name, kind in (("q_proj", "all-to-sharded"), ("k_proj", "all-to-sharded"),
                               ("v_proj", "all-to-sharded"), ("o_proj", "sharded-to-all")):  # fmt: skip
                setattr(attn, name, _copy_params(shard_linear(getattr(attn, name), kind, group=group)))
            attn.n_heads //= n
            attn.n_kv_heads //= n
            mlp = layer.mlp
            if isinstance(mlp, SparseMoeBlock):
                count = mlp.local_experts // n
                first = rank * count
                for proj in (mlp.switch_mlp.gate_proj, mlp.switch_mlp.up_proj, mlp.switch_mlp.down_proj):
                    proj.update({k: mx.array(v[first : first + count]) for k, v in proj.parameters().items()})
                mlp.group, mlp.first_expert, mlp.local_experts = group, first, count
            else:
                mlp.gate_proj = _copy_params(shard_linear(mlp.gate_proj, "all-to-sharded", group=group))
                mlp.up_proj = _copy_params(shard_linear(mlp.up_proj, "all-to-sharded", group=group))
                mlp.down_proj = _copy_params(shard_linear(mlp.down_proj, "sharded-to-all", group=group))
        self.shard_vocabulary(group)

    def keep_stage(self, start: int, stop: int, group) -> None:
        """Pipeline parallelism: keep layers [start, stop) only (the cache then covers them alone); made before
        the weights are read, so a stage reads only its own. `shard_vocabulary` follows once they are in."""
        self.model.layers = self.model.layers[start:stop]
        self.model.pipeline = Pipeline(group)

    def shard_vocabulary(self, group) -> None:
        """Each rank keeps 1/N of the embedding's and the head's vocabulary rows."""
        self.model.embed_tokens = VocabParallel(self.model.embed_tokens, self.args.vocab_size, group)
        if not self.args.tie_word_embeddings:
            self.lm_head = VocabParallel(self.lm_head, self.args.vocab_size, group)

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


def _copy_params(module: nn.Module) -> nn.Module:
    """Own copies of a module's (sliced) parameters, so the tensors they were cut from can be freed."""
    module.update(tree_map(lambda a: mx.array(a) if isinstance(a, mx.array) else a, module.parameters()))
    return module


class VocabParallel(nn.Module):
    """Rows [start, start + rows) of an embedding or a head; the group holds the whole vocabulary.

    As an embedding, each rank looks up the ids it holds (zeros for the rest) and an all-reduce adds them;
    as a head (or a tied embedding's `as_linear`), each rank scores its rows and an all-gather joins them.
    """

    def __init__(self, inner: nn.Module, vocab: int, group):
        super().__init__()
        n, rank = group.size(), group.rank()
        self.vocab, self.chunk = vocab, -(-vocab // n)
        self.start = rank * self.chunk
        self.rows = max(0, min(vocab, self.start + self.chunk) - self.start)
        stop = self.start + self.rows
        inner.update({k: mx.array(v[self.start : stop]) for k, v in inner.parameters().items()})
        self.inner = inner
        self._group = group

    def __call__(self, x: mx.array) -> mx.array:
        if isinstance(self.inner, (nn.Embedding, nn.QuantizedEmbedding)):
            local = x - self.start
            mine = (local >= 0) & (local < self.rows)
            h = self.inner(mx.where(mine, local, 0))
            return mx.distributed.all_sum(h * mine[..., None].astype(h.dtype), group=self._group)
        return self._gather(self.inner(x))

    def as_linear(self, h: mx.array) -> mx.array:
        return self._gather(self.inner.as_linear(h))

    def _gather(self, logits: mx.array) -> mx.array:
        lead = logits.shape[:-1]
        if self.rows < self.chunk:  # the last rank's share is short: pad it, then cut the padding off
            logits = mx.concatenate([logits, mx.zeros((*lead, self.chunk - self.rows), logits.dtype)], axis=-1)
        flat = logits.reshape(-1, self.chunk)
        n = self._group.size()
        every = mx.distributed.all_gather(flat, group=self._group).reshape(n, -1, self.chunk)
        return every.transpose(1, 0, 2).reshape(*lead, n * self.chunk)[..., : self.vocab]


class Pipeline:
    """One stage's hand-offs: receive the previous stage's activations, pass them on, share the last's."""

    def __init__(self, group):
        self.group = group
        self.rank, self.size = group.rank(), group.size()

    def receive(self, h: mx.array) -> mx.array:
        if self.rank == 0:
            return h
        got = mx.distributed.recv_like(h, self.rank - 1, group=self.group)
        # `h` (the vocabulary-parallel embedding, an all-reduce every rank joins) must run before the receive
        # waits on the previous stage, which itself waits in that all-reduce: `depends` orders the two.
        return mx.depends(got, h)

    def pass_on(self, h: mx.array, cache: list) -> mx.array:
        if self.rank < self.size - 1:
            h = mx.distributed.send(h, self.rank + 1, group=self.group)
            # A prompt chunk evaluates only the cache; tie the send to it so the next stage is never starved.
            if cache and cache[-1] is not None:
                last = cache[-1]
                if isinstance(last.keys, tuple):  # a quantized cache keeps (packed, scales, biases)
                    last.keys = tuple(mx.depends(list(last.keys), h))
                elif last.keys is not None:
                    last.keys = mx.depends(last.keys, h)
        return mx.distributed.all_gather(h, group=self.group)[-h.shape[0] :]
