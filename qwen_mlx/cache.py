"""A growable per-layer key/value cache for incremental decoding.

It keeps mlx-lm's cache interface (`offset`, `update_and_fetch`, `state`, `trim`) so that the
generation engine can swap in mlx-lm's richer caches (quantized, rotating) without touching the model.
Storage grows in steps of `STEP` positions and is written in place, so decoding one token does not copy
the whole history.
"""

from __future__ import annotations

import mlx.core as mx

STEP = 256


class KVCache:
    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append `keys`/`values` (B, n_kv_heads, L, head_dim) and return everything cached so far."""
        start, new = self.offset, keys.shape[2]
        if self.keys is None or start + new > self.keys.shape[2]:
            B, n_kv_heads, _, head_dim = keys.shape
            grow = (new + STEP - 1) // STEP * STEP
            shape = (B, n_kv_heads, grow, head_dim)
            new_keys, new_values = mx.zeros(shape, keys.dtype), mx.zeros(shape, values.dtype)
            if self.keys is None:
                self.keys, self.values = new_keys, new_values
            else:
                self.keys = mx.concatenate([self.keys[..., :start, :], new_keys], axis=2)
                self.values = mx.concatenate([self.values[..., :start, :], new_values], axis=2)
        self.offset += new
        self.keys[..., start : self.offset, :] = keys
        self.values[..., start : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @property
    def state(self) -> tuple[mx.array | None, mx.array | None]:
        if self.keys is None:
            return None, None
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def trim(self, n: int) -> int:
        """Forget the last `n` positions (e.g. back to the point where a new prompt diverges)."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes
