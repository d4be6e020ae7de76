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
- Every turn is planned by `qwen_mlx.turn` (`self.turns`) and read by its `TurnReader`, as in the CLI and
  the chat app, so events and stats are identical whichever front end asked. Its logits processor (the
  turn's guide) gets the prompt and the generated tokens, as mlx-lm's batch generator passes them.
- A full house (running + waiting >= the limit) is refused at `submit` (the endpoint's 429), and a
  cancelled ticket (a client that went away) leaves the batch before the next step.
- A failure inside a step fails the tickets in that batch, drops the batch and carries on: the server
  outlives any request.
- Speculative decoding (a turn's `speculative`, else the server's default): such a turn runs outside the
  batch, through `Generation` with its drafter, one verification pass per round of the worker's loop,
  between the batch's decode steps; the batch keeps batching. Its cache comes from and goes back to the
  same prompt cache. (Verifying inside mlx-lm's batch would need per-row trimming of its batch cache; until
  then a speculative turn is its own row of work, never a reason to stop batching the others.)
- On several Macs (a loaded part with a `link`, see `qwen_mlx.distributed`) turns run one at a time
  through `Generation`, which keeps the other ranks in step; the conversation's cache is kept across
  turns, so a continuing chat prefills only what is new.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import mlx.core as mx

from .cache import cache_length, common_prefix, make_cache, trim_cache
from .checkpoint import Loaded
from .engine import DEFAULT_DRAFT_TOKENS, Generation
from .errors import Overloaded, QwenMLXError
from .parser import Event
from .speculative import DraftModel, PromptLookup
from .tokenizer import Tokenizer
from .turn import ChatStats, TokenLogprob, TurnPlan, TurnReader, Turns

log = logging.getLogger("qwen_mlx")

__all__ = ["Failed", "Finished", "Overloaded", "Scheduler", "Step", "Ticket"]


@dataclass
class _Speculation:
    """A speculative turn running outside the batch: its generation, stepped one pass at a time."""

    ticket: Ticket
    reader: TurnReader
    generation: Generation
    steps: Iterator[int]
    end_ids: set[int]


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

    def __init__(self, turn: TurnPlan, loop: asyncio.AbstractEventLoop):
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


class Scheduler:
    """Owns the model on one MLX thread; `submit` from the event loop, read the ticket there."""

    def __init__(
        self,
        load: Callable[[], tuple[Loaded, Tokenizer]],
        *,
        max_batch: int = 8,
        max_waiting: int = 32,
        prefill_step_size: int = 512,
        prompt_cache_size: int = 8,
        default_max_tokens: int | None = None,
        load_draft: Callable[[Loaded, Tokenizer], DraftModel] | None = None,
        speculative: tuple[str, int] | None = None,
    ):
        self._load = load
        self._load_draft = load_draft  # the draft model for speculation with "model", loaded with the target
        self.speculative = speculative  # the default for a turn that does not say: ("lookup" | "model", k)
        self.draft: DraftModel | None = None
        self.default_max_tokens = default_max_tokens  # for a request that sets no max tokens
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.prefill_step_size = prefill_step_size
        self.prompt_cache_size = prompt_cache_size
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._in_flight = 0  # touched on the event loop only
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="qwen-mlx-worker", daemon=True)
        self.loaded: Loaded | None = None
        self.model = None
        self.tokenizer: Tokenizer | None = None
        self.turns: Turns | None = None

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

    @property
    def context_length(self) -> int:
        return self.turns.context_length if self.turns else 0

    def submit(self, turn: TurnPlan) -> Ticket:
        """Queue a turn (call on the event loop). Raises `Overloaded` when the house is full."""
        for note in turn.notes:  # what the client asked that this model cannot do (a 2507 model's thinking)
            log.warning("%s", note)
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
        from .mlxlm import submodule

        BatchGenerator = submodule("generate").BatchGenerator  # noqa: N806
        LRUPromptCache = submodule("models.cache").LRUPromptCache  # noqa: N806

        try:
            self.loaded, self.tokenizer = self._load()
            self.model = self.loaded.model
            if self._load_draft is not None:
                self.draft = self._load_draft(self.loaded, self.tokenizer)
            args = self.model.args
            self.turns = Turns(
                self.tokenizer,
                args.vocab_size,
                args.context_length,
                self.loaded.generation_config,
                default_max_tokens=self.default_max_tokens,
            )
        except BaseException as e:  # reported by start()
            self._load_error = e
            self._ready.set()
            return
        self._ready.set()
        end_ids = set(self.tokenizer.end_token_ids)
        if self.loaded.link is not None:
            try:
                self._run_in_lockstep(end_ids)
            finally:
                self.loaded.link.close()
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
        live: dict[int, TurnReader] = {}
        tickets: dict[int, Ticket] = {}
        speculating: list[_Speculation] = []
        while True:
            items = self._arrivals(wait=not live and not speculating)
            if None in items:
                batch.close()
                return
            for ticket in items:
                if ticket.cancelled:
                    continue
                spec = self._speculation_for(ticket.turn)
                if spec is not None:
                    try:
                        speculating.append(self._start_speculation(prompt_cache, ticket, spec, end_ids))
                    except Exception as e:
                        ticket.put(Failed(f"could not start the request: {e}"))
                        ticket.put(None)
                    continue
                try:
                    uid, cached = self._admit(batch, prompt_cache, ticket)
                except Exception as e:
                    ticket.put(Failed(f"could not start the request: {e}"))
                    ticket.put(None)
                    continue
                live[uid] = self.turns.reader(ticket.turn, cached=cached, started=ticket.submitted)
                tickets[uid] = ticket
            speculating = [run for run in speculating if self._speculate_once(run, prompt_cache)]
            gone = [uid for uid in live if tickets[uid].cancelled]
            if gone:
                batch.remove(gone)
                for uid in gone:
                    del live[uid], tickets[uid]
            if not live:
                continue
            try:
                _, responses = batch.next()
                stopped = []
                for r in responses:
                    reader = live.get(r.uid)
                    if reader is None:
                        continue
                    if not self._deliver(tickets[r.uid], reader, r.token, r.logprobs, r.finish_reason):
                        continue
                    del live[r.uid], tickets[r.uid]
                    if r.finish_reason is None:
                        stopped.append(r.uid)
                    elif r.prompt_cache is not None:
                        prompt_cache.insert_cache(None, list(r.all_tokens), r.prompt_cache)
                if stopped:  # a stop string ended them while the batch still runs them: keep their caches
                    for cache, tokens in batch.remove(stopped, return_prompt_caches=True).values():
                        prompt_cache.insert_cache(None, list(tokens), cache)
            except Exception as e:  # a failed step: end this batch's requests, start a clean batch
                for ticket in tickets.values():
                    ticket.put(Failed(f"generation failed: {e}"))
                    ticket.put(None)
                live.clear()
                tickets.clear()
                batch.close()
                batch = new_batch()
                mx.clear_cache()

    def _speculation_for(self, turn: TurnPlan) -> tuple[str, int] | None:
        """The turn's (drafter, k), or the server's default; None for plain batched decoding."""
        spec = turn.speculative or self.speculative
        if spec is None or spec[0] == "none" or self.loaded.link is not None:
            return None
        default_k = self.speculative[1] if self.speculative else DEFAULT_DRAFT_TOKENS
        return spec[0], spec[1] or default_k

    def _start_speculation(self, prompt_cache, ticket: Ticket, spec: tuple[str, int], end_ids) -> _Speculation:
        kind, k = spec
        if kind == "model" and self.draft is None:
            raise QwenMLXError("this server has no draft model: start it with --draft-model M")
        turn = ticket.turn
        ids = turn.prompt_ids
        cache, rest = self._cached_start(prompt_cache, ids)
        cached = len(ids) - len(rest)
        generation = Generation(
            self.model,
            rest,
            cache,
            history=ids[:cached],
            sampler=turn.sampler,
            logits_processors=turn.processors,
            max_tokens=turn.max_tokens,
            end_ids=end_ids,
            prefill_step_size=self.prefill_step_size,
            drafter=PromptLookup() if kind == "lookup" else self.draft,
            num_draft_tokens=k,
        )
        reader = self.turns.reader(turn, cached=cached, started=ticket.submitted)
        return _Speculation(ticket, reader, generation, iter(generation), end_ids)

    def _speculate_once(self, run: _Speculation, prompt_cache) -> bool:
        """One verification pass of a speculative turn, its tokens delivered; False once the turn is over."""
        generation, ticket = run.generation, run.ticket
        try:
            while not ticket.cancelled:
                token = next(run.steps, None)
                if token is None:  # ended without a token to say so (max_tokens reached before)
                    break
                over = len(generation.tokens) >= ticket.turn.max_tokens
                finish = "stop" if token in run.end_ids else "length" if over else None
                if self._deliver(ticket, run.reader, token, generation.logprobs, finish, generation.stats):
                    break
                if generation.buffered == 0:
                    return True  # the next token needs a pass: let the batch step first
        except Exception as e:
            ticket.put(Failed(f"generation failed: {e}"))
            ticket.put(None)
            run.steps.close()
            return False
        run.steps.close()  # trims the cache to what was delivered
        fed = generation.history + generation.prompt_ids + generation.tokens
        tokens = fed[: cache_length(generation.cache)]
        if len({c.offset for c in generation.cache}) == 1 and tokens:
            prompt_cache.insert_cache(None, tokens, generation.cache)
        return False

    def _arrivals(self, wait: bool) -> list:
        """What arrived in the inbox; with `wait` (idle), sleep until something does."""
        items = [self._inbox.get()] if wait else []
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                return items

    def _run_in_lockstep(self, end_ids: set[int]) -> None:
        """Several Macs: one turn at a time through `Generation`; the other ranks mirror every step."""
        from .distributed import PeerLost
        from .distributed.link import stop

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
            reader = self.turns.reader(turn, cached=keep, started=ticket.submitted)
            generation = Generation(
                self.model,
                ids[keep:],
                cache,
                history=ids[:keep],
                sampler=turn.sampler,
                logits_processors=turn.processors,
                max_tokens=turn.max_tokens,
                end_ids=end_ids,
                prefill_step_size=self.prefill_step_size,
                link=self.loaded.link,
            )
            steps = iter(generation)
            try:
                try:
                    for token in steps:
                        if ticket.cancelled:
                            break
                        over = len(generation.tokens) >= turn.max_tokens
                        finish = "stop" if token in end_ids else "length" if over else None
                        if self._deliver(ticket, reader, token, generation.logprobs, finish):
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

    def _cached_start(self, prompt_cache, ids: list[int]) -> tuple[list, list[int]]:
        """The nearest cached prefix of `ids` (a copy) and the tokens still to feed, at least one."""
        from .mlxlm import submodule

        cache, rest = prompt_cache.fetch_nearest_cache(None, ids)
        if cache is None:
            return make_cache(self.model, None), ids
        if not rest:  # the whole prompt is cached: recompute its last token to get logits
            submodule("models.cache").trim_prompt_cache(cache, 1)
            rest = ids[-1:]
        return cache, rest

    def _admit(self, batch, prompt_cache, ticket: Ticket) -> tuple[int, int]:
        turn = ticket.turn
        ids = turn.prompt_ids
        cache, rest = self._cached_start(prompt_cache, ids)
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

    def _deliver(
        self, ticket: Ticket, reader: TurnReader, token: int, logprobs: mx.array, finish: str | None, engine=None
    ) -> bool:
        """Hand one token to its ticket; True when the turn is over. `engine`: a speculative turn's counts."""
        events = reader.feed(token)
        entry = reader.logprob(token, logprobs) if ticket.turn.top_logprobs is not None else None
        over = finish is not None or reader.stopped
        if over:
            closing, stats = reader.finish(finish)
            if engine is not None:
                stats.count_speculation(engine)
            events = events + closing
        if events or entry:
            ticket.put(Step(events, [entry] if entry else None))
        if over:
            ticket.put(Finished(stats))
            ticket.put(None)
        return over
