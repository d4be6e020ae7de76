"""The chat app's answer view under a long streamed code block: event-loop stalls and wall time, three ways.

    python bench/bench_chat_ui.py --quick                   # a 300-line answer: about two minutes
    python bench/bench_chat_ui.py                           # the issue's 1,500-line answer at 100 tokens/s
    python bench/bench_chat_ui.py --lines 3000 --rate 200 --limit 30

This measures the UI, not the model: the answer is a replay of fixed text (a deterministic Python module of
--lines lines in one ```python fence, cut into token-sized chunks of about 3–4 characters), fed at --rate
tokens/s by the app's real `EngineThread` through a replay backend. Each strategy runs headless
(`App.run_test`, 120x40) in a fresh app holding one `AssistantMessage` in an anchored `VerticalScroll`:

- batched (ours): the engine's batching (one `Update` per UPDATE_INTERVAL_S) into `AssistantMessage.add_answer`,
  which writes to a `MarkdownStream`;
- naive: one `Update` per token, each drawn with `Markdown.update(full_text)` (a full re-parse and re-mount);
- per-token stream: one `Update` per token into `add_answer`; the stream joins the fragments that arrive
  while it draws into one append (measured: one render per 2–4 tokens, since the tokens wait in the app's
  message queue, not in the stream, while it draws).
The two per-token strategies fall further behind with every token, so each is cut off after --limit seconds
and the rest is extrapolated from a linear fit of its render cost against the document's length, times its
measured renders per token (marked "est.").

Metrics: the wall time from the first token to the whole answer drawn (stream stopped, messages processed)
and how far that is behind the last token; the event loop's stall as the lag of a 10 ms `set_interval`
heartbeat (a key waits at least that long); the lag of a probe message posted to the app every 50 ms (keys
also queue behind `Update`s in the app's message queue); the number of appends (re-renders); and the full
(generation 2) garbage collections, a stall of their own on a big heap. Headless
Textual still lays out and renders the screen; only the write to a terminal is skipped. One process, the
strategies one after another, after an idle baseline of the heartbeat alone. It writes `<stem>.md`
(`<stem>-quick.md` with --quick) to --out and prints the tables.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import random
import re
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from report import machine, machine_line
from textual.app import App, ComposeResult
from textual.containers import VerticalScroll
from textual.message import Message

from qwen_mlx.app import engine_thread
from qwen_mlx.app.engine_thread import UPDATE_INTERVAL_S, EngineThread, TurnRequest
from qwen_mlx.app.widgets import AssistantMessage
from qwen_mlx.parser import Answer

BATCHED, NAIVE, PER_TOKEN = "batched (ours)", "naive update per token", "stream write per token"
STRATEGIES = {"batched": BATCHED, "per-token": PER_TOKEN, "naive": NAIVE}
SIZE = (120, 40)
HEARTBEAT_S = 0.010
PROBE_S = 0.050
SEGMENTS = 5  # the stall table splits the answer into this many stretches of lines
FULL = {"lines": 1500, "limit": 60.0}
QUICK = {"lines": 300, "limit": 20.0}
# A BPE-like split: a newline, a run of indentation, then a word or symbol run with its leading space.
TOKEN = re.compile(r"\n| +(?= )| ?\S{1,4}| +")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--quick", action="store_true", help="a 300-line answer and a 20 s cap for naive")
    parser.add_argument("--lines", type=int, help="lines of code in the answer (default 1500; --quick 300)")
    parser.add_argument("--rate", type=float, default=100.0, help="tokens per second fed (default %(default)s)")
    parser.add_argument(
        "--limit", type=float, help="seconds a per-token strategy may run before it is cut off (default 60; 20)"
    )
    parser.add_argument("--strategy", action="append", choices=list(STRATEGIES), help="repeatable; default: all three")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="default: %(default)s")
    parser.add_argument("--stem", default="bench-chat-ui", help="output file name (default: %(default)s)")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.strategy = [STRATEGIES[key] for key in args.strategy or STRATEGIES]
    return args


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


# -- the answer --------------------------------------------------------------------------------------------

NOUNS = ["request", "record", "token", "batch", "cache", "entry", "config", "result", "layer", "buffer", "row"]
VERBS = ["load", "parse", "build", "merge", "check", "encode", "flush", "split", "apply", "render", "scale"]


def make_code(lines: int, seed: int = 0) -> list[str]:
    """`lines` lines of plausible Python: imports, then classes and functions with docstrings and bodies."""
    rng = random.Random(seed)
    out = ["from __future__ import annotations", "", "import json", "import math", "from pathlib import Path", ""]

    def name() -> str:
        return f"{rng.choice(VERBS)}_{rng.choice(NOUNS)}"

    def body(indent: str) -> list[str]:
        noun, other = rng.choice(NOUNS), rng.choice(NOUNS)
        shapes = [
            [f"{noun}s = [{other} for {other} in {other}s if {other}.size > {rng.randint(1, 64)}]"],
            [f"for index, {noun} in enumerate({noun}s):", f"    total += {noun}.weight * scale[index]"],
            [f"if {noun} is None:", f'    raise ValueError(f"no {noun} for {{key!r}}")'],
            [f"{noun} = self.{other}s.get(key, {rng.randint(0, 9)})"],
            [f"# {rng.choice(VERBS)} the {noun} before the {other}: the {other} may change it"],
            ["with Path(path).open() as handle:", f"    {noun} = json.load(handle)[{noun!r}]"],
            [f"{noun}_size = math.ceil(len({other}s) / {rng.randint(2, 16)})"],
        ]
        return [indent + line for line in rng.choice(shapes)]

    while len(out) < lines:
        if rng.random() < 0.3:
            cls = "".join(part.title() for part in name().split("_"))
            out += [f"class {cls}:", f'    """{rng.choice(VERBS).title()}s {rng.choice(NOUNS)}s in batches."""', ""]
            out += ["    def __init__(self, size: int = 8) -> None:", "        self.size = size", ""]
            for _ in range(rng.randint(2, 4)):
                out.append(f"    def {name()}(self, key: str, scale: list[float]) -> float:")
                out.append(f'        """The {rng.choice(NOUNS)} for `key`, scaled."""')
                out.append("        total = 0.0")
                for _ in range(rng.randint(2, 6)):
                    out += body("        ")
                out += ["        return total", ""]
        else:
            out.append(f"def {name()}(path: str, key: str, scale: list[float]) -> float:")
            out.append(f'    """{rng.choice(VERBS).title()} the {rng.choice(NOUNS)} at `path`."""')
            out.append("    total = 0.0")
            for _ in range(rng.randint(2, 8)):
                out += body("    ")
            out += ["    return total", "", ""]
    return out[:lines]


def make_answer(lines: int) -> tuple[str, str]:
    """The answer's markdown and the code inside its fence."""
    code = "\n".join(make_code(lines)) + "\n"
    return f"Here is the module:\n\n```python\n{code}```\n", code


def tokenize(text: str) -> list[str]:
    chunks = TOKEN.findall(text)
    assert "".join(chunks) == text
    return chunks


# -- the source and the app ----------------------------------------------------------------------------------


class ReplayBackend:
    """A `Backend` that replays fixed answer chunks at a fixed rate (it never touches a model)."""

    label = "replay"
    context_limit = None

    def __init__(self, chunks: list[str], rate: float) -> None:
        self.chunks = chunks
        self.rate = rate
        self.notices: list[str] = []
        self.started: float | None = None
        self.fed = 0
        self.last_fed: float | None = None

    def stream(self, messages, *, thinking, budget, temperature) -> Iterator[Answer]:
        self.started = start = time.perf_counter()
        for index, chunk in enumerate(self.chunks):
            due = start + index / self.rate
            if (wait := due - time.perf_counter()) > 0:
                time.sleep(wait)
            self.fed = index + 1
            self.last_fed = time.perf_counter()
            yield Answer(chunk)

    def end_thinking(self) -> bool:
        return False

    def memory(self) -> int | None:
        return None

    def prompt_tokens(self, messages: list[dict]) -> int | None:
        return None


class Probe(Message):
    def __init__(self, sent: float) -> None:
        super().__init__()
        self.sent = sent


class ReplayApp(App):
    """One `AssistantMessage` in an anchored scroll, fed by the real `EngineThread` from a `ReplayBackend`."""

    def __init__(self, strategy: str, backend: ReplayBackend | None, limit: float) -> None:
        super().__init__()
        self.strategy = strategy
        self.backend = backend
        self.limit = limit
        self.view = AssistantMessage()
        self.engine = EngineThread(self)
        self.engine.paced = strategy == BATCHED  # ours waits for each update to be drawn; the others do not
        self.done = asyncio.Event()
        self.text = ""  # the answer as drawn so far
        self.drawn_lines = 0
        self.beats: list[tuple[float, int]] = []  # (lag s, lines drawn then)
        self.probes: list[float] = []
        self.renders: list[tuple[float, int]] = []  # (seconds the append or update took, lines after it)
        self.updates = 0
        self.dropped = 0
        self.cut_off_at: float | None = None
        self.finished_at: float | None = None
        self._last_beat: float | None = None

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="log"):
            yield self.view

    def on_mount(self) -> None:
        self.query_one("#log", VerticalScroll).anchor()
        self.set_interval(HEARTBEAT_S, self._beat)
        self.set_interval(PROBE_S, lambda: self.post_message(Probe(time.perf_counter())))
        original = self.view.answer.append

        async def timed_append(markdown: str) -> None:
            start = time.perf_counter()
            await original(markdown)
            self.renders.append((time.perf_counter() - start, self.view.answer.source.count("\n")))

        self.view.answer.append = timed_append  # counts and times what MarkdownStream draws
        if self.backend is not None:
            self.engine.backend = self.backend
            self.engine.start()
            self.engine.generate(TurnRequest(1, [], thinking=False, budget=None, temperature=None))

    def _beat(self) -> None:
        now = time.perf_counter()
        if self._last_beat is not None:
            self.beats.append((max(0.0, now - self._last_beat - HEARTBEAT_S), self.drawn_lines))
        self._last_beat = now

    def on_probe(self, message: Probe) -> None:
        self.probes.append(time.perf_counter() - message.sent)

    async def on_engine_thread_update(self, message: EngineThread.Update) -> None:
        self.updates += 1
        if self.cut_off_at is not None:
            self.dropped += 1
            return
        self.text += message.answer
        if self.strategy == NAIVE:
            start = time.perf_counter()
            await self.view.answer.update(self.text)
            self.renders.append((time.perf_counter() - start, self.text.count("\n")))
        else:
            await self.view.add_answer(message.answer)
        self.drawn_lines = self.text.count("\n")
        self.engine.drawn()
        if self.strategy != BATCHED and time.perf_counter() - self.backend.started > self.limit:
            self.cut_off_at = time.perf_counter()
            self.engine.cancel(1)

    async def on_engine_thread_finished(self, message: EngineThread.Finished) -> None:
        if message.error:
            raise RuntimeError(message.error)
        await self.view.finish(None, None, stopped=False)
        self.finished_at = time.perf_counter()
        self.done.set()

    def on_unmount(self) -> None:
        self.engine.shutdown()


# -- one run -------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run_idle(seconds: float) -> dict[str, Any]:
    app = ReplayApp(BATCHED, None, 0)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(seconds)
    lags = [lag for lag, _ in app.beats]
    return {"strategy": "idle (heartbeat only)", "stall_max": max(lags), "stall_p99": percentile(lags, 0.99),
            "probe_max": max(app.probes), "probe_p99": percentile(app.probes, 0.99)}  # fmt: skip


async def run_strategy(strategy: str, answer: str, code: str, chunks: list[str], args: argparse.Namespace):
    backend = ReplayBackend(chunks, args.rate)
    app = ReplayApp(strategy, backend, args.limit)
    interval = engine_thread.UPDATE_INTERVAL_S
    # naive and per-token: the same engine thread with its batching off, one Update per token.
    engine_thread.UPDATE_INTERVAL_S = interval if strategy == BATCHED else 0.0
    pauses: list[float] = []  # full (generation 2) garbage collections: a stall of their own on a big heap
    started: list[float] = []

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if info["generation"] == 2:
            if phase == "start":
                started.append(time.perf_counter())
            elif started:
                pauses.append(time.perf_counter() - started.pop())

    gc.callbacks.append(on_gc)
    try:
        async with app.run_test(size=SIZE) as pilot:
            while not app.done.is_set():  # an app that failed exits without finishing: don't wait forever
                if not app.is_running:
                    raise RuntimeError(f"{strategy}: the app exited before the answer was drawn")
                await asyncio.sleep(0.1)
            await pilot.pause()
            drawn_at = time.perf_counter()
            if app.cut_off_at is None:
                fences = [block.code for block in app.view.answer.query("MarkdownFence")]
                if app.view.answer.source != answer or fences != [code.rstrip("\n")]:
                    raise RuntimeError(f"{strategy}: the drawn answer differs from the replayed one")
    finally:
        engine_thread.UPDATE_INTERVAL_S = interval
        gc.callbacks.remove(on_gc)
    lags = [lag for lag, _ in app.beats]
    result = {
        "strategy": strategy,
        "tokens": len(chunks),
        "fed": backend.fed,
        "lines_drawn": app.drawn_lines,
        "feed_s": backend.last_fed - backend.started,
        "wall_s": drawn_at - backend.started,
        "behind_s": drawn_at - backend.last_fed,
        "stall_max": max(lags),
        "stall_p99": percentile(lags, 0.99),
        "probe_max": max(app.probes),
        "probe_p99": percentile(app.probes, 0.99),
        "updates": app.updates,
        "written": app.updates - app.dropped,
        "gc_count": len(pauses),
        "gc_max": max(pauses, default=0.0),
        "renders": len(app.renders),
        "render_s": [seconds for seconds, _ in app.renders],
        "render_lines": [lines for _, lines in app.renders],
        "beats": app.beats,
        "cut_off": app.cut_off_at is not None,
    }
    if result["cut_off"]:
        result["estimate"] = extrapolate(result, chunks, args.rate)
    return result


def extrapolate(result: dict[str, Any], chunks: list[str], rate: float) -> dict[str, Any]:
    """A cut-off run's whole answer from a least-squares line through its render cost against document lines,
    times its measured renders per token written; renders run one after another on the event loop, so the
    answer is drawn after max(feed, sum of render costs)."""
    xs, ys = result["render_lines"], result["render_s"]
    slope, intercept = statistics.linear_regression(xs, ys)
    per_token = len(xs) / result["written"]
    lines, total = 0, 0.0
    for chunk in chunks:
        lines += chunk.count("\n")
        total += per_token * (intercept + slope * lines)
    feed = (len(chunks) - 1) / rate
    return {
        "per_line_ms": slope * 1e3,
        "renders_per_token": per_token,
        "update_at_end_s": intercept + slope * lines,
        "wall_s": max(feed, total),
        "behind_s": max(0.0, total - feed),
    }


# -- the report ----------------------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds < 10 else f"{seconds:.0f} s"


def main_table(results: list[dict[str, Any]], idle: dict[str, Any]) -> str:
    anchor = next((r for r in results if r["strategy"] == BATCHED), results[0])
    lines = [
        "| strategy | tokens drawn | appends | wall s | ÷ ours | behind last token | stall max | ÷ ours "
        "| stall p99 | probe max | probe p99 | full GCs (longest) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        drawn = f"{r['written']:,} of {r['tokens']:,}" if r["cut_off"] else f"{r['tokens']:,}"
        wall, behind = f"{r['wall_s']:.1f}", ms(r["behind_s"])
        wall_ratio = f"{r['wall_s'] / anchor['wall_s']:.2f}"
        if r["cut_off"]:
            est = r["estimate"]
            wall = f"{wall} (cut off); est. {est['wall_s']:.0f}"
            behind = f"{behind} (cut off); est. {ms(est['behind_s'])}"
            wall_ratio = f"est. {est['wall_s'] / anchor['wall_s']:.1f}"
        lines.append(
            f"| {r['strategy']} | {drawn} | {r['renders']:,} | {wall} | {wall_ratio} | {behind} | "
            f"{ms(r['stall_max'])} | {r['stall_max'] / anchor['stall_max']:.2f} | {ms(r['stall_p99'])} | "
            f"{ms(r['probe_max'])} | {ms(r['probe_p99'])} | {r['gc_count']} ({ms(r['gc_max'])}) |"
        )
    lines.append(
        f"| {idle['strategy']} | – | – | – | – | – | {ms(idle['stall_max'])} | – | {ms(idle['stall_p99'])} | "
        f"{ms(idle['probe_max'])} | {ms(idle['probe_p99'])} | – |"
    )
    return "\n".join(lines)


def segment_table(results: list[dict[str, Any]], total_lines: int) -> str:
    """How the stall and the cost of one render grow with the code block: per stretch of lines drawn."""
    edges = [round(total_lines * i / SEGMENTS) for i in range(SEGMENTS + 1)]
    edges[-1] = total_lines + 10  # the fence's closing lines
    head = "| strategy | " + " | ".join(f"lines {edges[i]}–{min(edges[i + 1], total_lines)}" for i in range(SEGMENTS))
    lines = [head + " |", "|---" + "|---:" * SEGMENTS + "|"]
    for r in results:
        cells = []
        for low, high in zip(edges, edges[1:], strict=False):
            stall = [lag for lag, at in r["beats"] if low <= at < high]
            cost = [s for s, at in zip(r["render_s"], r["render_lines"], strict=True) if low <= at < high]
            if not stall and not cost:
                cells.append("–")
                continue
            cell = f"{ms(max(stall, default=0))} / {ms(statistics.median(cost)) if cost else '–'}"
            cells.append(cell)
        lines.append(f"| {r['strategy']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(results: list[dict[str, Any]], idle: dict[str, Any], info: dict[str, Any], args, mean_chars: float):
    lines = [
        f"# The chat UI streaming a {args.lines:,}-line code answer at {args.rate:g} tokens/s",
        "",
        f"{machine_line(info)}. Shared machine: absolute times are noise, the ratios and the growth matter.",
        "",
        f"`{' '.join(['python', 'bench/bench_chat_ui.py', *sys.argv[1:]])}` on "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. Headless `run_test` at "
        f"{SIZE[0]}x{SIZE[1]}; the answer is a replay of fixed text ({results[0]['tokens']:,} chunks, "
        f"{mean_chars:.1f} characters each on average), fed by the real `EngineThread`; batched = one `Update` "
        f"per {UPDATE_INTERVAL_S * 1e3:.0f} ms. Stall = lag of a {HEARTBEAT_S * 1e3:.0f} ms heartbeat timer; "
        f"probe = how long a message posted to the app every {PROBE_S * 1e3:.0f} ms waits (as a key does).",
        "",
        main_table(results, idle),
        "",
        "A cut-off run's stalls cover only the lines it reached: compare stalls by stretch of lines below.",
        "",
        "Max stall / median time of one render (append or update), by the lines drawn when it happened:",
        "",
        segment_table(results, args.lines),
    ]
    for r in results:
        if r["cut_off"]:
            est = r["estimate"]
            lines += [
                "",
                f"{r['strategy']}: cut off after {args.limit:g} s at {r['lines_drawn']:,} lines "
                f"({r['written']:,} of {r['tokens']:,} tokens written, {r['renders']:,} renders: "
                f"{est['renders_per_token']:.2f} per token). A linear fit of its render cost, "
                f"{est['per_line_ms']:.2f} ms per line of document, puts one render at "
                f"{ms(est['update_at_end_s'])} at the end and the whole answer at about {est['wall_s']:.0f} s "
                f"(estimates).",
            ]
    return "\n".join(lines)


async def run_all(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any], float]:
    answer, code = make_answer(args.lines)
    chunks = tokenize(answer)
    mean_chars = len(answer) / len(chunks)
    log(f"answer: {args.lines} lines, {len(answer):,} characters, {len(chunks):,} chunks ({mean_chars:.2f} each)")
    idle = await run_idle(3.0)
    log(f"idle: stall max {ms(idle['stall_max'])}")
    results = []
    for strategy in args.strategy:
        log(f"{strategy}: feeding {len(chunks):,} chunks at {args.rate:g}/s …")
        result = await run_strategy(strategy, answer, code, chunks, args)
        log(
            f"  wall {result['wall_s']:.1f} s, behind {ms(result['behind_s'])}, stall max {ms(result['stall_max'])}, "
            f"{result['renders']} renders{' (cut off)' if result['cut_off'] else ''}"
        )
        results.append(result)
    return results, idle, mean_chars


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine()
    log(f"machine: {machine_line(info)}")
    results, idle, mean_chars = asyncio.run(run_all(args))
    table = markdown(results, idle, info, args, mean_chars)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.stem + ("-quick" if args.quick else "")
    (args.out / f"{stem}.md").write_text(table + "\n")
    log(f"wrote {args.out / stem}.md")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
