"""The key/value cache: the one factory, its length, trimming, and the prefix two token runs share.

The cache classes are mlx-lm's (`KVCache`, `QuantizedKVCache`), so mlx-lm's batch generator and prompt
cache take ours as they are; every cache in qwen-mlx (a chat session's, the server's, a follower rank's,
the demo model's check) comes from `make_cache`.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import QwenMLXError
from .mlxlm import submodule

KV_GROUP_SIZE = 64
KV_BITS = (4, 8)


def make_cache(model, kv_bits: int | None = None, kv_group_size: int = KV_GROUP_SIZE) -> list:
    """A fresh per-layer cache; `kv_bits` 4 or 8 stores keys and values quantized (less memory, long chats)."""
    classes = submodule("models.cache")
    if kv_bits is None:
        return [classes.KVCache() for _ in model.layers]
    if kv_bits not in KV_BITS:
        raise QwenMLXError(f"kv_bits={kv_bits} is not supported: use 4 or 8, or leave it unset for a float cache")
    head_dim = model.args.head_dim
    group_size = min(kv_group_size, head_dim)  # a group cannot span heads
    if group_size not in (32, 64, 128) or head_dim % group_size:
        raise QwenMLXError(f"kv_bits needs a head_dim divisible by 32; this model's is {head_dim}")
    return [classes.QuantizedKVCache(group_size=group_size, bits=kv_bits) for _ in model.layers]


def cache_bits(cache: list) -> int | None:
    """The bits of a quantized cache, None for a float one."""
    return getattr(cache[0], "bits", None) if cache else None


def cache_length(cache: list) -> int:
    return cache[0].offset if cache else 0


def trim_cache(cache: list, keep: int) -> None:
    """Forget everything after the first `keep` positions."""
    extra = cache_length(cache) - keep
    if extra > 0:
        for layer_cache in cache:
            layer_cache.trim(extra)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
