"""The lockstep between rank 0 and its followers, and a follower's life.

Rank 0 shares each generation's start as JSON (never pickle), its sampled token reaches every rank inside
the step's graph, and one small all-reduce per token says go on or stop. A lost peer becomes `PeerLost`;
a silent one is caught by a watchdog on rank 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..cache import cache_length, make_cache, trim_cache
from ..engine import Generation, generation_stream
from ..errors import QwenMLXError

PEER_TIMEOUT_S = 120.0
MIRRORED_CACHES = 8  # caches a follower keeps for rank 0 (the endpoint uses one, the CLI one per session)
# The per-token control word rank 0 sends its followers.
NEXT, END = 1, 3


class PeerLost(QwenMLXError):
    """Another rank of the distributed run went away."""


class Link:
    """The lockstep between rank 0 and its followers; every call is a collective every rank makes."""

    def __init__(self, group, peer_timeout: float | None = None):
        self.group = group
        self.rank = group.rank()
        self.leader = self.rank == 0
        self.closed = False
        self.peer_timeout = (
            peer_timeout if peer_timeout is not None else float(os.environ.get("QWEN_MLX_PEER_TIMEOUT", PEER_TIMEOUT_S))
        )
        self._busy_since: float | None = None
        self._watchdog: threading.Thread | None = None
        self._ended = False  # a follower heard rank 0's END for the running generation

    # The engine's `Lockstep`: one generation's start, a word between tokens, its end.

    def start(self, job: dict) -> None:
        """Rank 0: tell the followers what to generate (they wait for it in `follow`)."""
        self.share(job)

    def step(self) -> bool:
        """Between two tokens: rank 0 says go on; a follower learns whether to."""
        if self.leader:
            self.signal(NEXT)
            return True
        self._ended = self.signal() == END
        return not self._ended

    def finish(self) -> None:
        """The generation ended: rank 0 says END (whatever ended it); a follower whose generation ended by
        itself (an end token, max_tokens, as rank 0's did) takes that END."""
        if self.leader:
            self.signal(END)
        elif not self._ended:
            self.signal()
        self._ended = False

    def _sum(self, x: mx.array) -> mx.array:
        with mx.stream(generation_stream()):  # in order with the steps the thread queued before it
            return mx.distributed.all_sum(x, group=self.group)

    def agree(self, token: mx.array) -> mx.array:
        """Rank 0's sampled token, on every rank (lazily: part of the step's graph)."""
        mine = token.astype(mx.int32)
        if not self.leader:
            mine = mx.zeros_like(mine)
        return mx.distributed.all_sum(mine, group=self.group)

    def share(self, obj: Any = None) -> Any:
        """Rank 0's JSON-able `obj` on every rank (the others pass nothing)."""
        data = json.dumps(obj).encode() if self.leader else b""
        size = self._call(lambda: self._sum(mx.array([len(data)], mx.int32)).item())
        raw = mx.array(list(data), mx.uint8) if self.leader else mx.zeros((size,), mx.uint8)
        payload = self._call(lambda: bytes(self._sum(raw).tolist()))
        return obj if self.leader else json.loads(payload)

    def signal(self, code: int = 0) -> int:
        """Rank 0's control word on every rank."""
        word = mx.array([code if self.leader else 0], mx.int32)
        return self._call(lambda: self._sum(word).item())

    def _call(self, fn):
        with self.waiting():
            return fn()

    @contextlib.contextmanager
    def waiting(self):
        """Around anything that blocks on the other ranks: a lost peer becomes `PeerLost`, and on rank 0
        the watchdog ends the run if the wait outlasts the peer timeout (a host that went silent)."""
        if self.leader and self.peer_timeout > 0:
            self._busy_since = time.monotonic()
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch, name="qwen-mlx-watchdog", daemon=True)
                self._watchdog.start()
        try:
            yield
        except RuntimeError as error:
            if not any(tag in str(error) for tag in ("[ring]", "[jaccl]", "[mpi]", "peer")):
                raise
            raise PeerLost(f"a rank of the distributed run went away ({error})") from None
        finally:
            self._busy_since = None

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.peer_timeout / 4))
            since = self._busy_since
            if since is not None and time.monotonic() - since > self.peer_timeout:
                stop(
                    f"no answer from the other ranks for {self.peer_timeout:.0f} s: a host dropped out or its link "
                    "is down; stopping (raise --peer-timeout if the model is that slow)"
                )

    def close(self) -> None:
        """Rank 0: tell the followers to exit (once)."""
        if self.leader and not self.closed:
            self.closed = True
            with contextlib.suppress(QwenMLXError):
                self.share({"op": "exit"})


def stop(message: str, status: int = 1) -> None:
    """End this rank now with one line on stderr; MLX's pending collectives cannot be unwound."""
    rank = os.environ.get("MLX_RANK", "?")
    print(f"qwen-mlx: rank {rank}: {message}", file=sys.stderr, flush=True)
    report_status(status)
    os._exit(status)


def report_status(status: int) -> None:
    """Rank 0 leaves its exit status where the launching `qwen-mlx` looks (mlx.launch does not pass it on)."""
    target = os.environ.get("QWEN_MLX_STATUS_FILE")
    if target and os.environ.get("MLX_RANK") == "0":
        with contextlib.suppress(OSError):
            Path(target).write_text(str(status))


def on_terminate(signum, frame) -> None:  # noqa: ARG001
    # launch.PEER_ENDED matches this text: the launcher shows it only when no rank says why.
    stop("stopped: another rank of the distributed run ended, or the run was interrupted", 1)


def watch_signals() -> None:
    """`mlx.launch` ends every rank with SIGTERM when one of them dies: say so instead of vanishing."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_terminate)


def follow(loaded, on_generation=None) -> None:
    """A follower's life: mirror each generation rank 0 starts, until rank 0 says exit or goes away.

    `on_generation(generation)` sees each mirrored generation once it ends (the tests compare tokens).
    """
    model, link = loaded.model, loaded.link
    caches: OrderedDict[str, list] = OrderedDict()
    while True:
        job = link.share()
        if job.get("op") == "exit":
            return
        key = f"{job['cache']}:{job['kv_bits']}"
        cache = caches.pop(key, None)
        if cache is None:
            cache = make_cache(model, job["kv_bits"])
        caches[key] = cache
        while len(caches) > MIRRORED_CACHES:
            caches.popitem(last=False)
        if cache_length(cache) < job["keep"]:
            raise QwenMLXError(f"rank 0 continues a cache of {job['keep']} tokens this rank no longer holds")
        trim_cache(cache, job["keep"])
        generation = Generation(
            model,
            job["prompt"],
            cache,
            sampler=lambda logprobs: mx.zeros(logprobs.shape[:-1], mx.int32),
            max_tokens=job["max_tokens"],
            end_ids=job["end_ids"],
            prefill_step_size=job["prefill_step_size"],
            link=link,
        )
        for _ in generation:
            pass
        if on_generation is not None:
            on_generation(generation)


def run_follower(loaded) -> int:
    """The whole program of a rank other than 0."""
    try:
        follow(loaded)
    except PeerLost as error:
        stop(f"rank 0 went away ({error}); stopping")
    return 0
