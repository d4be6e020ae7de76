"""`qwen-mlx serve` under concurrent streaming clients: aggregate tokens/s, and the batching ratio against one stream.

    python bench/bench_serve.py --quick                     # the demo model on a CPU: about three minutes
    python bench/bench_serve.py --model Qwen/Qwen3-0.6B-MLX-4bit --max-tokens 256
    python bench/bench_serve.py --model ~/models/qwen3-4b --concurrency 1 4 8 16 --no-mlx-lm

Each side is a server in a subprocess on a free loopback port: ours (`qwen-mlx serve`) and, for the
side-by-side anchor, mlx-lm's (`python -m mlx_lm server`) with its batch sizes set to our `--max-batch`;
both run at once, idle but for the side being timed, and the sides alternate pass by pass.
At every concurrency level the same request list is sent, greedy and streamed with usage, by that many
clients at once; the level's throughput is the completion tokens (from usage) over the wall time from the
first request to the last reply. With identical greedy requests the token totals match across levels
(there is no `ignore_eos`), so the ratios are ratios of wall times. It writes `<stem>.json` (every level,
every side, the machine) and `<stem>.md` to --out and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from openai import AsyncOpenAI
from report import machine, machine_line

from qwen_mlx.loader import resolve_model_path

OURS, MLX_LM = "qwen_mlx", "mlx-lm"
START_TIMEOUT_S = 300
# Demo-model prompts (real questions for any model); "Is 91 a prime number?" runs to the cap on the demo.
PROMPTS = [
    "Is 91 a prime number?",
    "What is 2 + 3?",
    "Write hello world in Python.",
    "Hi!",
]
FULL = {"concurrency": [1, 8, 16], "requests": 32, "max_tokens": 256, "rounds": 2}
QUICK = {"concurrency": [1, 8, 16], "requests": 16, "max_tokens": 64, "rounds": 2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--quick", action="store_true", help="fewer requests and tokens (CPU-friendly)")
    parser.add_argument("--model", default="demo", help="a model folder, a Hugging Face repo id, or demo (default)")
    parser.add_argument("--concurrency", type=int, nargs="+", help="client counts (default: 1 8 16)")
    parser.add_argument("--requests", type=int, help="requests per level (default 32; --quick 16)")
    parser.add_argument("--max-tokens", type=int, help="max_tokens of every request (default 256; --quick 64)")
    parser.add_argument("--rounds", type=int, help="timed passes per level and side, best kept (default 2)")
    parser.add_argument("--max-batch", type=int, default=8, help="both servers' decode batch (default 8)")
    parser.add_argument("--no-mlx-lm", action="store_true", help="skip mlx-lm's server")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="default: %(default)s")
    parser.add_argument("--stem", help="output file names (default: bench-serve-<backend>[-quick])")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def server(command: list[str], ready: str | None, port: int | None = None) -> Iterator[str]:
    """A server subprocess; yields its base URL once it answers. `ready` finds the URL in its stderr;
    without it the server is polled on `port`."""
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    found: queue.Queue[str] = queue.Queue()

    def drain() -> None:
        for line in process.stderr:
            lines.append(line)
            match = ready and re.search(ready, line)
            if match:
                found.put(match.group(1))
        found.put("")

    threading.Thread(target=drain, daemon=True).start()
    try:
        url = _wait_ready(found, port, process) if ready is None else found.get(timeout=START_TIMEOUT_S)
        if not url:
            raise RuntimeError(f"{command[2:4]} did not start:\n" + "".join(lines[-40:]))
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_ready(found: queue.Queue[str], port: int, process: subprocess.Popen) -> str:
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        # /health, not /v1/models: mlx-lm's models route fails on a machine without a Hugging Face cache.
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return url
        time.sleep(0.5)
    return ""


async def one_request(client: AsyncOpenAI, model: str, prompt: str, max_tokens: int) -> int:
    """One streamed greedy request; its completion tokens from the usage chunk."""
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        temperature=0,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    tokens = None
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    if tokens is None:
        raise RuntimeError("the stream ended without a usage chunk")
    return tokens


async def run_level(url: str, model: str, concurrency: int, requests: int, max_tokens: int) -> dict[str, Any]:
    """`requests` requests from `concurrency` clients, each sending its next one when the last is done."""
    # Retries: mlx-lm's server resets some of a burst of fresh connections when it has just started.
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=2, timeout=3600)
    todo: asyncio.Queue[str] = asyncio.Queue()
    for index in range(requests):
        todo.put_nowait(PROMPTS[index % len(PROMPTS)])
    tokens: list[int] = []

    async def worker() -> None:
        while not todo.empty():
            tokens.append(await one_request(client, model, todo.get_nowait(), max_tokens))

    start = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await client.close()
    wall = time.perf_counter() - start
    return {
        "concurrency": concurrency,
        "requests": requests,
        "tokens": sum(tokens),
        "wall_s": wall,
        "tps": sum(tokens) / wall,
    }


def warm_up(url: str, model: str, args: argparse.Namespace) -> None:
    """One request, then a burst at the largest level: the first steps' kernels and batch shapes."""
    for concurrency in (1, max(args.concurrency)):
        asyncio.run(run_level(url, model, concurrency, concurrency, min(16, args.max_tokens)))


def bench_sides(servers: dict[str, tuple[str, str]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every level `rounds` times on every side, the sides alternating which goes first (drift on a shared
    machine hits both); the fastest pass of each level is kept."""
    passes: dict[str, dict[int, list[dict[str, Any]]]] = {side: {c: [] for c in args.concurrency} for side in servers}
    for round_ in range(args.rounds):
        for concurrency in args.concurrency:
            order = list(servers) if round_ % 2 == 0 else list(reversed(servers))
            for side in order:
                url, model = servers[side]
                result = asyncio.run(run_level(url, model, concurrency, args.requests, args.max_tokens))
                log(
                    f"  round {round_ + 1}: {side} x{concurrency}: {result['tokens']} tokens in "
                    f"{result['wall_s']:.1f} s, {result['tps']:.1f} tok/s"
                )
                passes[side][concurrency].append(result)
    sides = []
    for side, by_level in passes.items():
        levels = [{**max(runs, key=lambda p: p["tps"]), "passes": runs} for runs in by_level.values()]
        single = next((level["tps"] for level in levels if level["concurrency"] == 1), None)
        for level in levels:
            level["vs_single"] = level["tps"] / single if single else None
        sides.append({"side": side, "levels": levels})
    return sides


def markdown(results: dict[str, Any]) -> str:
    settings = results["settings"]
    lines = [
        f"# qwen-mlx serve: aggregate throughput ({results['model']})",
        "",
        machine_line(results["machine"]),
        "",
        f"{settings['requests']} streamed greedy chat requests per level, max_tokens {settings['max_tokens']}, "
        f"--max-batch {settings['max_batch']}; tokens/s = completion tokens (usage) / wall time, best of "
        f"{settings['rounds']}.",
        "",
        "| side | clients | tokens | wall s | tok/s | × one stream | ÷ mlx-lm |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    anchor = {
        level["concurrency"]: level["tps"]
        for side in results["sides"]
        if side["side"] == MLX_LM
        for level in side["levels"]
    }
    for side in results["sides"]:
        for level in side["levels"]:
            ratio = f"{level['vs_single']:.2f}" if level["vs_single"] else "–"
            versus = anchor.get(level["concurrency"]) if side["side"] != MLX_LM else None
            versus = f"{level['tps'] / versus:.2f}" if versus else "–"
            lines.append(
                f"| {side['side']} | {level['concurrency']} | {level['tokens']} | {level['wall_s']:.1f} | "
                f"{level['tps']:.1f} | {ratio} | {versus} |"
            )
    if results.get("mlx_lm_skipped"):
        lines += ["", f"mlx-lm's server: skipped ({results['mlx_lm_skipped']})."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = resolve_model_path(args.model)
    info = machine()
    log(f"machine: {machine_line(info)}; model {path}")
    results: dict[str, Any] = {
        "machine": info,
        "model": args.model,
        "model_path": str(path),
        "settings": {
            k: getattr(args, k) for k in ("quick", "concurrency", "requests", "max_tokens", "rounds", "max_batch")
        },
        "prompts": PROMPTS,
        "sides": [],
        "mlx_lm_skipped": "--no-mlx-lm" if args.no_mlx_lm else None,
    }
    ours = [
        sys.executable,
        "-m",
        "qwen_mlx",
        "serve",
        "--model",
        str(path),
        "--port",
        "0",
        "--model-name",
        "bench",
        "--max-batch",
        str(args.max_batch),
    ]
    with contextlib.ExitStack() as stack:
        servers = {OURS: (stack.enter_context(server(ours, r"serving .* at (http://\S+)/v1")), "bench")}
        warm_up(*servers[OURS], args)
        if not args.no_mlx_lm:
            port = free_port()
            theirs = [
                sys.executable,
                "-m",
                "mlx_lm",
                "server",
                "--model",
                str(path),
                "--port",
                str(port),
                "--decode-concurrency",
                str(args.max_batch),
                "--prompt-concurrency",
                str(args.max_batch),
                "--log-level",
                "WARNING",
            ]
            try:
                servers[MLX_LM] = (stack.enter_context(server(theirs, None, port)), str(path))
                warm_up(*servers[MLX_LM], args)
            except Exception as e:  # the anchor is optional: record why it is missing and keep ours
                log(f"mlx-lm's server: {e}")
                results["mlx_lm_skipped"] = str(e).splitlines()[0]
                servers.pop(MLX_LM, None)
        results["sides"] = bench_sides(servers, args)
    stem = args.stem or f"bench-serve-{info['backend']}{'-quick' if args.quick else ''}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results)
    (args.out / f"{stem}.md").write_text(table + "\n")
    log(f"wrote {args.out / stem}.json, .md")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
