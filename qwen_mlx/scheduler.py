"""Continuous batching for the endpoint: many turns decoded together on one long-lived MLX thread.

The async request handlers never touch MLX: they `submit` a `Turn` and read its `Ticket`, an asyncio
queue the worker thread fills with `Step`s and one `Finished` (or `Failed`).

Design decisions:
- The batching is mlx-lm's `BatchGenerator`: requests join between decode steps and leave when done;
  a prompt is prefilled `prefill_step_size` tokens per step, interleaved with the others' decoding, so a
  long prompt stalls the running streams by at most one chunk. Per-request samplers (each with its own
  seed) and per-request logits processors (`TurnGuide`) ride along.
- Prefix reuse across requests is mlx-lm's `LRUPromptCache` (a token trie of finished turns' KV caches):
  a conversation that continues starts from its longest cached prefix; `cached_tokens` reports it.
- Qwen3's reply format is split in the worker with the same `ReplyParser` as the CLI and the chat app,
  so events are identical whichever front end asked.
- A full house (running + waiting >= the limit) is refused at `submit` (the endpoint's 429), and a
  cancelled ticket (a client that went away) leaves the batch before the next step.
- A failure inside a step fails the tickets in that batch, drops the batch and carries on: the server
  outlives any request.
- On several Macs (a model with a `link`, see `qwen_mlx.distributed`) turns run one at a time through
  `Generation`, which keeps the other ranks in step; the conversation's cache is kept across turns, so
  a continuing chat prefills only what is new.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import mlx.core as mx

from .chat import ChatStats, context_length
from .engine import make_cache
from .errors import QwenMLXError
from .parser import Answer, Event, ReplyParser, SpecialIds, StopStrings, thinking_already_open
from .sampling import LogitsProcessor, Sampler
from .tokenizer import Tokenizer


class Overloaded(QwenMLXError):
    """Every slot and every waiting place is taken."""


@dataclass
class Turn:
    """What the worker needs to generate one reply."""

    prompt_ids: list[int]
    max_tokens: int
    sampler: Sampler
    processors: list[LogitsProcessor] = field(default_factory=list)
    stop: Sequence[str] = ()
    chat: bool = True  # parse Qwen3's reply format; False: raw text (`/v1/completions`)
    tool_calls: bool = True  # False (a request without tools): `<tool_call>` blocks stay answer text
    thinking: bool = True  # the mode, for the stats
    top_logprobs: int | None = None  # None: no logprobs


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    bytes: list[int]
    top: list[tuple[str, float, list[int]]]


@dataclass(frozen=True)
class Step:
    events: list[Event]
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class Finished:
    stats: ChatStats


@dataclass(frozen=True)
class Failed:
    error: str


class Ticket:
    """One submitted turn, read from the event loop: `async for update in ticket`."""

    def __init__(self, turn: Turn, loop: asyncio.AbstractEventLoop):
        self.turn = turn
        self.loop = loop
        self.updates: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.released = False  # the scheduler no longer counts it
        self.submitted = time.perf_counter()

    def put(self, update) -> None:  # worker thread
        try:
            self.loop.call_soon_threadsafe(self.updates.put_nowait, update)
        except RuntimeError:  # the loop is gone (server shutting down)
            self.cancelled = True

    def __aiter__(self):
        return self

    async def __anext__(self):
        update = await self.updates.get()
        if update is None:
            raise StopAsyncIteration
        return update


class _Live:
    """The worker's bookkeeping for one ticket in the batch."""

    def __init__(self, ticket: Ticket, tokenizer: Tokenizer, special: SpecialIds, cached: int):
        turn = ticket.turn
        self.ticket = ticket
        self.cached = cached
        if not turn.tool_calls:  # a client that prompts for tools itself parses the text itself
            special = replace(special, tool_call_start=None, tool_call_end=None)
        self.detokenizer = tokenizer.detokenizer()
        self.parser = ReplyParser(special, thinking_already_open(turn.prompt_ids, special), turn.stop)
        self.stops = StopStrings(turn.stop)
        self.completion_tokens = 0
        self.first_token_at: float | None = None

    @property
    def stopped(self) -> bool:
        return self.parser.stopped if self.ticket.turn.chat else self.stops.stopped


def _after_prompt(processor, prompt_ids: list[int]):
    """`processor` as mlx-lm's batch generator calls it, with the prompt before the generated tokens
    (`Generation` passes the generated ones only): the guide counts from the prompt's end."""
    prompt = mx.array(prompt_ids, mx.int32)

    def call(history: mx.array, logits: mx.array) -> mx.array:
        return processor(mx.concatenate([prompt, history.astype(mx.int32)]), logits)

    return call


class Scheduler:
    """Owns the model on one MLX thread; `submit` from the event loop, read the ticket there."""

    def __init__(
        self,
        load: Callable[[], tuple[object, Tokenizer]],
        *,
        max_batch: int = 8,
        max_waiting: int = 32,
        prefill_step_size: int = 512,
        prompt_cache_size: int = 8,
    ):
        self._load = load
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.prefill_step_size = prefill_step_size
        self.prompt_cache_size = prompt_cache_size
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._in_flight = 0  # touched on the event loop only
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="qwen-mlx-worker", daemon=True)
        self.model = None
        self.tokenizer: Tokenizer | None = None
        self.context_length = 0

    def start(self) -> None:
        """Start the worker and wait until the model is loaded (re-raising a load failure)."""
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error

    def stop(self) -> None:
        if self._thread.is_alive():
            self._inbox.put(None)
            self._thread.join(timeout=30)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def check_fits(self, prompt_ids: Sequence[int], max_tokens: int | None) -> int:
        """The max_tokens to use: refused if the prompt leaves no room, else capped to the room left."""
        room = self.context_length - len(prompt_ids)
        if room <= 0:
            raise QwenMLXError(
                f"the prompt is {len(prompt_ids)} tokens but the model's context is {self.context_length}: "
                "shorten the conversation"
            )
        return room if max_tokens is None else min(max_tokens, room)

    def submit(self, turn: Turn) -> Ticket:
        """Queue a turn (call on the event loop). Raises `Overloaded` when the house is full."""
        if self._in_flight >= self.max_batch + self.max_waiting:
            raise Overloaded(
                f"the server is busy: {self._in_flight} requests are running or waiting; try again shortly"
            )
        ticket = Ticket(turn, asyncio.get_running_loop())
        self._in_flight += 1
        self._inbox.put(ticket)
        return ticket

    def done(self, ticket: Ticket) -> None:
        """The handler is finished with a ticket: cancel it if it still runs (call on the event loop)."""
        if not ticket.released:
            ticket.released = True
            self._in_flight -= 1
            if not ticket.cancelled:
                ticket.cancelled = True
                self._inbox.put(ticket)  # wakes the worker, which drops it from the batch

    # Worker thread from here on.

    def _work(self) -> None:
        try:
            self._run()
        finally:
            # MLX asks a thread to destroy its own streams before it ends; left to the interpreter's teardown
            # they can abort the process after a clean stop (ml-explore/mlx#4506).
            mx.clear_streams()

    def _run(self) -> None:
        from mlx_lm.generate import BatchGenerator
        from mlx_lm.models.cache import LRUPromptCache

        try:
            self.model, self.tokenizer = self._load()
            self.context_length = context_length(self.model.args)
        except BaseException as e:  # reported by start()
            self._load_error = e
            self._ready.set()
            return
        self._ready.set()
        tokenizer = self.tokenizer
        special = SpecialIds.of(tokenizer)
        end_ids = set(tokenizer.end_token_ids)
        if getattr(self.model, "link", None) is not None:
            try:
                self._run_in_lockstep(special, end_ids)
            finally:
                self.model.link.close()
            return
        prompt_cache = LRUPromptCache(max_size=self.prompt_cache_size)
        stream = mx.new_stream(mx.default_device())  # MLX streams belong to the thread that made them

        def new_batch():
            return BatchGenerator(
                self.model,
                stop_tokens=[[i] for i in sorted(end_ids)],
                completion_batch_size=self.max_batch,
                prefill_batch_size=self.max_batch,
                prefill_step_size=self.prefill_step_size,
                stream=stream,
            )

        batch = new_batch()
        live: dict[int, _Live] = {}
        while True:
            items = self._arrivals(wait=not live)
            if None in items:
                batch.close()
                return
            for ticket in items:
                if ticket.cancelled:
                    continue
                try:
                    uid, cached = self._admit(batch, prompt_cache, ticket)
                except Exception as e:
                    ticket.put(Failed(f"could not start the request: {e}"))
                    ticket.put(None)
                    continue
                live[uid] = _Live(ticket, tokenizer, special, cached)
            gone = [uid for uid, state in live.items() if state.ticket.cancelled]
            if gone:
                batch.remove(gone)
                for uid in gone:
                    del live[uid]
            if not live:
                continue
            try:
                _, responses = batch.next()
                stopped = []
                for r in responses:
                    state = live.get(r.uid)
                    if state is None or not self._deliver(state, r.token, r.logprobs, r.finish_reason, end_ids):
                        continue
                    del live[r.uid]
                    if r.finish_reason is None:
                        stopped.append(r.uid)
                    elif r.prompt_cache is not None:
                        prompt_cache.insert_cache(None, list(r.all_tokens), r.prompt_cache)
                if stopped:  # a stop string ended them while the batch still runs them: keep their caches
                    for cache, tokens in batch.remove(stopped, return_prompt_caches=True).values():
                        prompt_cache.insert_cache(None, list(tokens), cache)
            except Exception as e:  # a failed step: end this batch's requests, start a clean batch
                for state in live.values():
                    state.ticket.put(Failed(f"generation failed: {e}"))
                    state.ticket.put(None)
                live.clear()
                batch.close()
                batch = new_batch()
                mx.clear_cache()

    def _arrivals(self, wait: bool) -> list:
        """What arrived in the inbox; with `wait` (idle), sleep until something does."""
        items = [self._inbox.get()] if wait else []
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                return items

    def _run_in_lockstep(self, special: SpecialIds, end_ids: set[int]) -> None:
        """Several Macs: one turn at a time through `Generation`; the other ranks mirror every step."""
        from .chat import common_prefix
        from .distributed import PeerLost, stop
        from .engine import Generation, cache_length, trim_cache

        cache = make_cache(self.model, None)
        cached_ids: list[int] = []  # the tokens whose keys and values the cache holds
        waiting: list[Ticket] = []
        while True:
            items = self._arrivals(wait=not waiting)
            if None in items:
                return
            waiting += [t for t in items if not t.cancelled and t not in waiting]
            waiting = [t for t in waiting if not t.cancelled]
            if not waiting:
                continue
            ticket = waiting.pop(0)
            turn = ticket.turn
            ids = turn.prompt_ids
            keep = min(common_prefix(cached_ids, ids), len(ids) - 1)
            trim_cache(cache, keep)
            state = _Live(ticket, self.tokenizer, special, keep)
            generation = Generation(
                self.model,
                ids[keep:],
                cache,
                sampler=turn.sampler,
                logits_processors=[_after_prompt(p, ids) for p in turn.processors],
                max_tokens=turn.max_tokens,
                end_ids=end_ids,
                prefill_step_size=self.prefill_step_size,
            )
            steps = iter(generation)
            try:
                try:
                    for token in steps:
                        if ticket.cancelled:
                            break
                        over = len(generation.tokens) >= turn.max_tokens
                        finish = "stop" if token in end_ids else "length" if over else None
                        if self._deliver(state, token, generation.logprobs, finish, end_ids):
                            break
                finally:
                    steps.close()  # tells the other ranks to stop here too
            except PeerLost as e:
                ticket.put(Failed(str(e)))
                ticket.put(None)
                stop(f"{e}; stopping the server")
            except Exception as e:
                ticket.put(Failed(f"generation failed: {e}"))
                ticket.put(None)
                cache, cached_ids = make_cache(self.model, None), []
                continue
            cached_ids = (ids + generation.tokens)[: cache_length(cache)]

    def _admit(self, batch, prompt_cache, ticket: Ticket) -> tuple[int, int]:
        from mlx_lm.models.cache import trim_prompt_cache

        turn = ticket.turn
        ids = turn.prompt_ids
        cache, rest = prompt_cache.fetch_nearest_cache(None, ids)
        if cache is None:
            cache, rest = make_cache(self.model, None), ids
        elif not rest:  # the whole prompt is cached: recompute its last token to get logits
            trim_prompt_cache(cache, 1)
            rest = ids[-1:]
        cached = len(ids) - len(rest)
        (uid,) = batch.insert(
            [list(rest)],
            max_tokens=[turn.max_tokens],
            caches=[cache],
            all_tokens=[list(ids[:cached])],
            samplers=[turn.sampler],
            logits_processors=[list(turn.processors)],
        )
        return uid, cached

    def _deliver(self, state: _Live, token: int, logprobs: mx.array, finish: str | None, end_ids: set[int]) -> bool:
        """Hand one token to its ticket; True when the turn is over."""
        turn = state.ticket.turn
        if state.first_token_at is None:
            state.first_token_at = time.perf_counter()
        state.completion_tokens += 1
        if token in end_ids:
            events: list[Event] = []
            entries = None
        else:
            text = state.detokenizer.add(token)
            if turn.chat:
                events = state.parser.feed(token, text)
            else:
                piece = state.stops.feed(text)
                events = [Answer(piece)] if piece else []
            entries = [self._logprob(token, logprobs, turn.top_logprobs)] if turn.top_logprobs is not None else None
        over = finish is not None or state.stopped
        if over:
            events = events + (state.parser.finish() if turn.chat else [Answer(state.stops.flush())])
            events = [e for e in events if not (isinstance(e, Answer) and not e.text)]
        if events or entries:
            state.ticket.put(Step(events, entries))
        if over:
            state.ticket.put(Finished(self._stats(state, "stop" if state.stopped else (finish or "stop"))))
            state.ticket.put(None)
        return over

    def _logprob(self, token: int, logprobs: mx.array, top: int) -> TokenLogprob:
        def piece(i: int) -> tuple[str, list[int]]:
            text = self.tokenizer.decode([i])
            return text, list(text.encode("utf-8"))

        chosen = logprobs[token].item()
        tops = []
        if top:
            best = mx.argpartition(-logprobs, top - 1)[:top]
            values = logprobs[best].tolist()
            for i, value in sorted(zip(best.tolist(), values, strict=True), key=lambda p: -p[1]):
                text, raw = piece(i)
                tops.append((text, value, raw))
        text, raw = piece(token)
        return TokenLogprob(text, chosen, raw, tops)

    def _stats(self, state: _Live, finish: str) -> ChatStats:
        turn = state.ticket.turn
        parser = state.parser
        if finish == "stop" and turn.chat and parser.tool_calls:
            finish = "tool_calls"
        now = time.perf_counter()
        ttft = (state.first_token_at or now) - state.ticket.submitted
        decode = now - (state.first_token_at or now)
        return ChatStats(
            prefill_tokens=len(turn.prompt_ids) - state.cached,
            completion_tokens=state.completion_tokens,
            ttft_s=ttft,
            prompt_tps=(len(turn.prompt_ids) - state.cached) / max(ttft, 1e-9),
            generation_tps=(state.completion_tokens - 1) / decode if decode > 0 else 0.0,
            peak_memory=mx.get_peak_memory(),
            finish_reason=finish,
            prompt_tokens=len(turn.prompt_ids),
            cached_tokens=state.cached,
            reasoning_tokens=parser.reasoning_tokens if turn.chat else 0,
            thinking=turn.thinking,
        )
