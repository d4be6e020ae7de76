"""Several models in one server, as LM Studio serves them: each loads on its first request and unloads when
idle too long or when another needs its memory. The routes of every protocol ask the one `Registry` for a
model by name (`get`) and talk to the `Scheduler` it hands back.

Design decisions:
- One scheduler (one MLX thread) per loaded model; loading is the scheduler's own start, off the event loop,
  one load at a time (an asyncio lock), logged with its time (`qwen-mlx: loaded NAME in 1.2 s`).
- The memory a model takes is the fit estimate `list` prints (`memory.estimate` from its shapes: weights,
  a full KV cache at its context capped at `models.LIST_CONTEXT`, activations), worked out before it loads.
  Before a load that would pass the budget the least recently used idle model unloads, then the next. A
  model whose shapes are unknown until it loads (a Hub repo not downloaded yet, the demo before its first
  build) is counted from its folder once loaded.
- A model with a request in flight never unloads. A request holds its model from the lookup to the last
  byte of its answer (the `Holds` middleware releases it), so planning and a stream still being written
  count, not only a ticket in the batch. When only busy models stand in the way, the request waits for
  one to go idle (up to `LOAD_WAIT_S`), then gets a 503 in its protocol's shape; a model bigger than the
  whole budget gets the 503 at once.
- `--ttl`: a model idle that long unloads (checked every `TTL_CHECK_S` at most); the next request loads it
  again. Without it, a model stays until the budget needs its room.
- A model that fails to load answers the request that asked for it with a 500 naming the model and why;
  nothing is kept, the server carries on, and a later request tries again.
- Names: with one model, the served id, its aliases and `--alias` patterns (`Settings.serves`); with
  several, each model's own names (as `list` shows it, its folder and the `--model` argument), and an
  `--alias NAME=MODEL` pattern for one of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path

from .errors import QwenMLXError
from .models import list_fit, read_model, size_text
from .scheduler import Scheduler
from .wire import APIError

LOAD_WAIT_S = 120.0  # how long a request waits for busy models to make room before its 503
TTL_CHECK_S = 1.0
GIB = 1 << 30

# The models a request holds: set by `Holds` for each request, filled by `Registry.get`.
_HELD: contextvars.ContextVar[list | None] = contextvars.ContextVar("qwen_mlx_held", default=None)


@dataclass(eq=False)
class ServedModel:
    """One model the server can serve, loaded or not."""

    name: str  # the id `/v1/models` lists
    source: str  # what loads it: a folder, a Hub repo id, `demo`
    folder: Path | None = None  # known before loading (listing it needs no load); None for a repo to fetch
    names: Sequence[str] = ()  # other names a request may use
    patterns: Sequence[str] = ()  # --alias glob patterns
    memory: int | None = None  # the estimate the budget counts; None where the shapes are unknown
    context_length: int | None = None
    scheduler: Scheduler | None = None
    holds: int = 0  # requests using it now
    last_used: float = field(default_factory=time.monotonic)
    loaded_at: float | None = None

    def answers_to(self, name: str) -> bool:
        return name == self.name or name in self.names or any(fnmatchcase(name, p) for p in self.patterns)

    @property
    def busy(self) -> bool:
        return self.holds > 0 or (self.scheduler is not None and self.scheduler.in_flight > 0)

    def idle_s(self) -> float:
        return 0.0 if self.busy else time.monotonic() - self.last_used


def shape_facts(folder: Path | None) -> tuple[int | None, int | None]:
    """(the memory estimate `list` prints, the context length) of the model in `folder`; Nones if unreadable."""
    if folder is None:
        return None, None
    try:
        shape = read_model(folder).shape
    except (QwenMLXError, OSError):
        return None, None
    return list_fit(shape).total, shape.context_length


class Registry:
    """The served models by name; `get` loads one just in time and holds it for the request."""

    def __init__(
        self,
        models: Sequence[ServedModel],
        make_scheduler: Callable[[ServedModel], Scheduler] | None,
        *,
        budget: int | None = None,
        ttl: float | None = None,
        load_wait_s: float = LOAD_WAIT_S,
        log: Callable[[str], None] | None = None,
    ):
        self.models = list(models)
        self.make_scheduler = make_scheduler
        self.budget, self.ttl, self.load_wait_s = budget, ttl, load_wait_s
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self._lock: asyncio.Lock | None = None  # made on the event loop that uses it
        self._changed: asyncio.Event | None = None

    @property
    def single(self) -> bool:
        return len(self.models) == 1

    def loaded(self) -> list[ServedModel]:
        return [m for m in self.models if m.scheduler is not None]

    @property
    def in_flight(self) -> int:
        return sum(m.scheduler.in_flight for m in self.loaded())

    def used(self) -> int:
        return sum(m.memory or 0 for m in self.loaded())

    # --- names -------------------------------------------------------------------------------------------

    def find(self, name: str | None) -> ServedModel | None:
        """The model a request naming `name` gets; a request naming none gets the one model, or the one
        used last of those loaded."""
        if not name:
            if self.single:
                return self.models[0]
            loaded = self.loaded()
            return max(loaded, key=lambda m: m.last_used) if loaded else None
        return next((m for m in self.models if m.answers_to(name)), None)

    def not_found(self, name: str | None) -> APIError:
        if not name:
            return APIError(400, "model is required: this server serves several models (GET /v1/models lists "
                            "them)", param="model")  # fmt: skip
        if self.single:
            hint = " (serve with --alias NAME to answer to it)"
            served = repr(self.models[0].name)
        else:
            hint = " (GET /v1/models lists them)"
            served = ", ".join(repr(m.name) for m in self.models)
        return APIError(404, f"The model {name!r} does not exist; this server serves {served}{hint}",
                        param="model", code="model_not_found")  # fmt: skip

    # --- loading -----------------------------------------------------------------------------------------

    def named(self, name: str | None) -> ServedModel:
        """`find(name)`, or the 404 (400 with no name) that says what is served."""
        model = self.find(name)
        if model is None:
            raise self.not_found(name)
        return model

    async def get(self, name: str | None) -> ServedModel:
        """The model `name` names, loaded, held until the request's answer is sent; raises the 404."""
        return await self.acquire(self.named(name))

    async def acquire(self, model: ServedModel) -> ServedModel:
        """`model` loaded (loading it, and making room for it, if need be) and held by the request."""
        held = _HELD.get()
        if held is not None:  # held before any wait, so that an idle-looking model is not unloaded meanwhile
            model.holds += 1
            held.append(model)
        model.last_used = time.monotonic()
        try:
            if model.scheduler is None:
                async with self._load_lock():
                    if model.scheduler is None:
                        await self._load(model)
        except BaseException:
            if held is not None:
                held.remove(model)
                self._release(model)
            raise
        return model

    async def _load(self, model: ServedModel) -> None:
        if self.make_scheduler is None:
            raise APIError(503, f"{model.name} is not loaded and this server cannot load it", "server_error")
        await self._make_room(model)
        scheduler = self.make_scheduler(model)
        started = time.perf_counter()
        self.log(f"qwen-mlx: loading {model.name}")
        try:
            await asyncio.to_thread(scheduler.start)
        except Exception as e:  # a broken checkpoint, a missing file: this request's error, not the server's
            await asyncio.to_thread(scheduler.stop)
            reason = str(e) or type(e).__name__
            self.log(f"qwen-mlx: could not load {model.name}: {reason}")
            raise APIError(500, f"could not load the model {model.name!r}: {reason}", "server_error",
                           param="model", code="model_load_failed") from None  # fmt: skip
        if model.memory is None:
            model.memory = shape_facts(Path(scheduler.loaded.path))[0]
        model.context_length = scheduler.context_length
        model.scheduler, model.loaded_at, model.last_used = scheduler, time.monotonic(), time.monotonic()
        self.log(f"qwen-mlx: loaded {model.name} in {time.perf_counter() - started:.1f} s")

    async def _make_room(self, model: ServedModel) -> None:
        """Unload idle models, least recently used first, until `model` fits the budget; wait for busy ones."""
        if self.budget is None or model.memory is None:
            return
        if model.memory > self.budget:
            raise APIError(503, f"{model.name} needs about {size_text(model.memory)} and the memory budget is "
                           f"{size_text(self.budget)}: serve with a larger --memory-budget", "server_error",
                           code="model_too_large")  # fmt: skip
        deadline = time.monotonic() + self.load_wait_s
        while self.used() + model.memory > self.budget:
            idle = sorted((m for m in self.loaded() if not m.busy), key=lambda m: m.last_used)
            if idle:
                await self._unload(idle[0], f"to make room for {model.name}")
                continue
            left = deadline - time.monotonic()
            busy = ", ".join(m.name for m in self.loaded())
            if left <= 0:
                raise APIError(503, f"{model.name} needs about {size_text(model.memory)} of the "
                               f"{size_text(self.budget)} memory budget, and the loaded models ({busy}) are all "
                               "answering requests: try again shortly", "server_error", code="model_busy")  # fmt: skip
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._change().wait(), left)

    async def _unload(self, model: ServedModel, why: str) -> None:
        scheduler, model.scheduler = model.scheduler, None  # no await before this: no request can grab it
        if scheduler is None:
            return
        await asyncio.to_thread(scheduler.stop)
        del scheduler
        await asyncio.to_thread(_free_memory)
        model.loaded_at = None
        self.log(f"qwen-mlx: unloaded {model.name} ({why})")

    async def unload(self, model: ServedModel) -> bool:
        """Unload `model` now if it is loaded and idle (Ollama's `keep_alive: 0`); whether it did."""
        async with self._load_lock():
            if model.scheduler is None or model.busy:
                return False
            await self._unload(model, "asked to")
            return True

    def _release(self, model: ServedModel) -> None:
        model.holds -= 1
        model.last_used = time.monotonic()
        if self._changed is not None:
            self._changed.set()

    def _load_lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def _change(self) -> asyncio.Event:
        """An event set the next time a request lets go of its model."""
        self._changed = asyncio.Event()
        return self._changed

    # --- the request's hold, the TTL, the end -------------------------------------------------------------

    @contextlib.contextmanager
    def holding(self):
        """The models `get` hands out inside are held until the block ends (a request, in `Holds`)."""
        held: list[ServedModel] = []
        token = _HELD.set(held)
        try:
            yield held
        finally:
            _HELD.reset(token)
            for model in held:
                self._release(model)

    async def expire(self) -> None:
        """Unload every model idle for `ttl` seconds or more."""
        if self.ttl is None:
            return
        for model in self.loaded():
            if not model.busy and model.idle_s() >= self.ttl:
                async with self._load_lock():
                    if model.scheduler is not None and not model.busy and model.idle_s() >= self.ttl:
                        await self._unload(model, f"idle {model.idle_s():.0f} s, --ttl {self.ttl:g}")

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        """The app's lifespan: the TTL's watch while it serves."""
        task = asyncio.create_task(self._watch()) if self.ttl is not None else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(min(TTL_CHECK_S, self.ttl / 4))
            await self.expire()

    def close(self) -> None:
        for model in self.loaded():
            model.scheduler.stop()
            model.scheduler = None


class Holds:
    """ASGI middleware: a request holds the models it asked for until its whole answer is sent."""

    def __init__(self, app, registry: Registry):
        self.app, self.registry = app, registry

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        with self.registry.holding():
            return await self.app(scope, receive, send)


def _free_memory() -> None:
    """Give an unloaded model's buffers back: drop the last references, then MLX's cache of freed buffers."""
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()
