"""One process against 2 ranks on this machine (loopback): what splitting a model costs or gains, as ratios.

    python bench/bench_distributed.py --quick            # tiny shapes on a CPU: a few minutes
    python bench/bench_distributed.py                    # Qwen3-4B and Qwen3-30B-A3B at 4 bits
    python bench/bench_distributed.py --shape qwen3-8b --bits 8 --ranks 2 --out /tmp/bench

Per shape it builds (or reuses) the random-weight checkpoint bench_generate.py uses, then runs, in
alternating order, `--rounds` times each: qwen_mlx in one process, qwen_mlx over `--ranks` ranks with
tensor parallelism and with pipeline parallelism, and mlx-lm's own tensor parallelism (`sharded_load`)
over as many ranks, all started by `mlx.launch --backend ring` on 127.0.0.1. Each run loads the model,
warms up once, and times greedy generations of `--max-tokens` after a `--prompt-tokens` prompt; the
tables give each side's median as a ratio to qwen_mlx in one process.

Loopback is not Thunderbolt: the ranks share this machine's memory bandwidth and cores, so on one host
splitting can only cost. The figures say what the lockstep costs per token, not what two Macs gain.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIDES = ("qwen_mlx 1 process", "qwen_mlx tp", "qwen_mlx pp", "mlx-lm tp")
FIRST_SPECIAL_ID = 151643
FULL = {"shapes": ["qwen3-4b", "qwen3-30b-a3b"], "bits": 4, "prompt_tokens": 1024, "max_tokens": 128, "rounds": 3}
QUICK = {"shapes": ["tiny-dense", "tiny-moe"], "bits": 4, "prompt_tokens": 64, "max_tokens": 32, "rounds": 2}
LAUNCH = str(Path(sys.executable).with_name("mlx.launch"))


# -- one run (a process, or every rank of a distributed run) --------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    import mlx.core as mx

    random.seed(0)
    prompt = [random.randrange(FIRST_SPECIAL_ID) for _ in range(args.prompt_tokens)]
    if args.side == "mlx-lm tp":
        from mlx_lm import stream_generate
        from mlx_lm.utils import sharded_load

        group = mx.distributed.init()
        model, tokenizer = sharded_load(args.model, tensor_group=group)

        def once(max_tokens: int) -> tuple[float, float]:
            *_, last = stream_generate(model, tokenizer, prompt, max_tokens=max_tokens)
            return last.prompt_tps, last.generation_tps

        rank = group.rank()
    else:
        from qwen_mlx.engine import Generation

        if args.side == "qwen_mlx 1 process":
            from qwen_mlx.loader import load_model

            loaded, rank = load_model(args.model), 0
        else:
            from qwen_mlx.distributed import load_part
            from qwen_mlx.distributed.link import follow

            loaded = load_part(args.model, args.side.split()[-1])
            rank = loaded.link.rank
            if rank != 0:
                follow(loaded)
                return
        model, link = loaded.model, loaded.link

        def once(max_tokens: int) -> tuple[float, float]:
            generation = Generation(model, prompt, max_tokens=max_tokens, end_ids=(), link=link)
            for _ in generation:
                pass
            return generation.stats.prompt_tps, generation.stats.generation_tps

    once(4)  # warm-up
    timings = [once(args.max_tokens) for _ in range(args.rounds)]
    if rank == 0:
        prompt_tps, generation_tps = zip(*timings, strict=True)
        print("RESULT " + json.dumps({"prompt_tps": prompt_tps, "generation_tps": generation_tps}))
    if args.side.startswith("qwen_mlx ") and args.side != "qwen_mlx 1 process":
        link.close()


# -- the whole comparison ---------------------------------------------------------------------------------------


def run_side(side: str, model: Path, options: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", "--side", side, "--model", str(model),
               "--prompt-tokens", str(options.prompt_tokens), "--max-tokens", str(options.max_tokens),
               "--rounds", "1"]  # fmt: skip
    if side != "qwen_mlx 1 process":
        command = [LAUNCH, "--backend", "ring", "--hosts", "127.0.0.1", "-n", str(options.ranks), "--", *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (done.stderr.strip().splitlines() or ["no result"])[-1]}


def table(results: dict) -> str:
    lines = [
        f"One process vs {results['ranks']} ranks on loopback ({results['machine']}); "
        f"{results['prompt_tokens']}-token prompt, {results['max_tokens']} generated, median of {results['rounds']}.",
        "",
        "| model | side | prompt tok/s | generation tok/s | prompt ÷ 1 process | generation ÷ 1 process |",
        "|---|---|---|---|---|---|",
    ]
    for shape, sides in results["shapes"].items():
        base = sides["qwen_mlx 1 process"]
        for side, value in sides.items():
            if "error" in value:
                lines.append(f"| {shape} | {side} | failed: {value['error'][:80]} | | | |")
                continue
            lines.append(
                f"| {shape} | {side} | {value['prompt_tps']:.1f} | {value['generation_tps']:.1f} | "
                f"{value['prompt_tps'] / base['prompt_tps']:.2f} | "
                f"{value['generation_tps'] / base['generation_tps']:.2f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, for a CPU")
    parser.add_argument("--shape", action="append", help="a shape from bench/checkpoints.py (repeatable)")
    parser.add_argument("--bits", type=int)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int)
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--checkpoints", type=Path, default=Path(tempfile.gettempdir()) / "qwen-mlx-bench")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    options = parser.parse_args()
    preset = QUICK if options.quick else FULL
    for key, value in preset.items():
        if getattr(options, key, None) is None:
            setattr(options, key, value)
    if options.shape:
        options.shapes = options.shape
    if options.worker:
        return worker(options)

    sys.path.insert(0, str(Path(__file__).parent))
    from checkpoints import ensure_checkpoint
    from report import backend, machine, machine_line

    runs: dict[str, dict[str, list[dict]]] = {}
    for shape in options.shapes:
        model, _ = ensure_checkpoint(options.checkpoints, shape, options.bits)
        runs[shape] = {side: [] for side in SIDES}
        for round_ in range(options.rounds):
            order = SIDES if round_ % 2 == 0 else tuple(reversed(SIDES))
            for side in order:
                started = time.perf_counter()
                runs[shape][side].append(run_side(side, model, options))
                print(f"{shape} {side}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)

    def median(values: list[dict]) -> dict:
        good = [v for v in values if "error" not in v]
        if not good:
            return values[-1]
        return {k: statistics.median(x for v in good for x in v[k]) for k in ("prompt_tps", "generation_tps")}

    info = machine()
    results = {
        "machine": machine_line(info),
        "machine_info": info,
        "ranks": options.ranks,
        "bits": options.bits,
        "prompt_tokens": options.prompt_tokens,
        "max_tokens": options.max_tokens,
        "rounds": options.rounds,
        "runs": runs,
        "shapes": {shape: {side: median(v) for side, v in sides.items()} for shape, sides in runs.items()},
    }
    options.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench-distributed-{backend()}{'-quick' if options.quick else ''}"
    text = table(results)
    (options.out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (options.out / f"{stem}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
