"""qwen_mlx against mlx-lm, side by side in one process, on the same checkpoint: ratios, not absolutes.

    python bench/bench_generate.py --quick                  # tiny shapes, a couple of minutes on a CPU
    python bench/bench_generate.py                          # Qwen3-4B and Qwen3-30B-A3B, 4 and 8 bit
    python bench/bench_generate.py --shape qwen3-0.6b --bits 4 --prompt-tokens 512 --out /tmp/bench
    python bench/bench_generate.py --speculative --quick    # speculative modes on tiny shapes, minutes on a CPU

For each shape and bit width it builds (or reuses) one random-weight checkpoint, loads it with
`qwen_mlx.load` and `mlx_lm.load`, and times both on the same prompt ids in alternating order; then one
model runs an 8-turn conversation through the full-history path (see conversation.py). `--fusion` also
times qwen_mlx's fused projections (the default) against `qwen_mlx.load(path, fuse=False)`. It writes
`<stem>.json` (every run, the machine), `<stem>.md` (the tables) and `<stem>.png` to --out and prints the
tables last.

`--speculative` runs the speculative modes instead (`bench-speculative-<backend>[-quick]`): on each target
shape, plain decoding, a draft model (`--draft-shape`, the 0.6B shape by default) and prompt lookup, ours and
mlx-lm's (`stream_generate(..., draft_model=...)`, its `speculative_generate_step`; it has no prompt
lookup) with the same target and draft, on a repetitive prompt (edit a file: the answer repeats it) and a
natural one (a question). Random weights never repeat their input, so the work counts of a model that
does come from the demo model (a thinking answer) and the repeater (an edit), each drafting for itself.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx_lm
from checkpoints import DTYPE, SHAPES, checkpoint_name, ensure_checkpoint, shape_config
from conversation import make_script, run_conversation
from mlx.utils import tree_flatten, tree_unflatten
from report import machine, markdown, speculative_markdown, summarize, write
from runs import (
    MLX_LM,
    MLX_LM_DRAFT,
    OURS,
    OURS_DRAFT,
    OURS_LOOKUP,
    MlxLmChat,
    OursChat,
    demo_work_counts,
    generate_mlx_lm,
    generate_ours,
    no_end_tokens,
    weights_nbytes,
)

import qwen_mlx
from qwen_mlx.engine import DEFAULT_DRAFT_TOKENS
from qwen_mlx.fuse import unfused_parameters
from qwen_mlx.speculative import DraftModel, PromptLookup
from qwen_mlx.tokenizer import Tokenizer

# Token ids below this are ordinary text tokens (151643 is <|endoftext|>, the first special token).
FIRST_SPECIAL_ID = 151643
UNFUSED = "qwen_mlx unfused"
FULL = {
    "shapes": ["qwen3-4b", "qwen3-30b-a3b"],
    "bits": [4, 8],
    "prompt_tokens": 2048,
    "max_tokens": 128,
    "rounds": 3,
    "turns": 8,
    "system_tokens": 1024,
    "user_tokens": 96,
    "answer_tokens": 128,
    "turn_tokens": 128,
    "dtype": DTYPE,
}
# MLX's CPU backend is slow (bfloat16 is emulated there): small prompts, float32 scales and norms.
QUICK = {
    "shapes": ["tiny-dense", "tiny-moe"],
    "bits": [4, 8],
    "prompt_tokens": 64,
    "max_tokens": 16,
    "rounds": 2,
    "turns": 8,
    "system_tokens": 384,
    "user_tokens": 32,
    "answer_tokens": 32,
    "turn_tokens": 16,
    "dtype": "float32",
}


# --speculative: what it changes of FULL and QUICK. 0.6B drafts for the 8B and 32B, as it would on a Mac.
SPECULATIVE_FULL = {
    "shapes": ["qwen3-8b", "qwen3-32b"],
    "bits": [4],
    "draft_shape": "qwen3-0.6b",
    "prompt_tokens": 1024,
}
SPECULATIVE_QUICK = {
    "shapes": ["tiny-dense"],
    "bits": [4],
    "draft_shape": "tiny-draft",
    "prompt_tokens": 160,
    "max_tokens": 32,
}
SPECULATIVE_SIDES = (OURS, MLX_LM, OURS_DRAFT, MLX_LM_DRAFT, OURS_LOOKUP)
# The repetitive prompt asks for this file back with one name changed; the natural one asks a question.
EDIT_SOURCE = Path(__file__).with_name("checkpoints.py")
EDIT_REQUEST = "Rename `ensure_checkpoint` to `ensure_folder` in this file and give the whole file back:\n\n```python\n"
QUESTION = "Why does a key/value cache make a transformer decode faster, and what does it cost? A few paragraphs."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few tokens (CPU-friendly)")
    parser.add_argument(
        "--shape",
        action="append",
        choices=list(SHAPES),
        help=f"repeatable; default: {' '.join(FULL['shapes'])} (--quick: {' '.join(QUICK['shapes'])})",
    )
    parser.add_argument("--bits", type=int, nargs="+", choices=[4, 8], help="default: 4 8")
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        help="unquantized weights and scales (default bfloat16; --quick float32)",
    )
    parser.add_argument("--layers", type=int, help="cut every shape to this many layers (per-layer sizes stay real)")
    parser.add_argument("--prompt-tokens", type=int, help="prefill length (default 2048; --quick 256)")
    parser.add_argument("--max-tokens", type=int, help="tokens decoded per run (default 128; --quick 32)")
    parser.add_argument("--rounds", type=int, help="timed runs per side and model (default 3)")
    parser.add_argument("--prefill-step-size", type=int, default=2048, help="prefill chunk, both sides")
    parser.add_argument(
        "--share-weights",
        action="store_true",
        help="mlx-lm's model gets qwen_mlx's weight arrays instead of its own copy (half the memory; "
        "same tensors, same layout), for a model that fits only once",
    )
    parser.add_argument(
        "--fusion",
        action="store_true",
        help="also time qwen_mlx fused (q/k/v and gate/up as one matmul each) against unfused (loads a second copy)",
    )
    parser.add_argument(
        "--conversation",
        metavar="SHAPE:BITS",
        help="the model for the conversation (default: the first shape and bit width)",
    )
    parser.add_argument("--no-conversation", action="store_true", help="skip the multi-turn conversation")
    parser.add_argument(
        "--speculative",
        action="store_true",
        help="run the speculative modes instead: plain, a draft model and prompt lookup, ours and mlx-lm's "
        f"(default targets {' '.join(SPECULATIVE_FULL['shapes'])} at 4 bits; --quick: "
        f"{' '.join(SPECULATIVE_QUICK['shapes'])})",
    )
    parser.add_argument(
        "--draft-shape",
        choices=list(SHAPES),
        help=f"--speculative: the draft model's shape, same bits (default {SPECULATIVE_FULL['draft_shape']}; "
        f"--quick {SPECULATIVE_QUICK['draft_shape']})",
    )
    parser.add_argument(
        "--num-draft-tokens",
        type=int,
        default=DEFAULT_DRAFT_TOKENS,
        help="--speculative: drafts per target pass, both sides (default %(default)s)",
    )
    parser.add_argument("--no-demo", action="store_true", help="--speculative: skip the demo model's work counts")
    parser.add_argument("--turns", type=int, help="conversation turns (default 8)")
    parser.add_argument("--turn-tokens", type=int, help="tokens generated per turn (default 128; --quick 32)")
    parser.add_argument("--system-tokens", type=int, help="system prompt length (default 1024; --quick 512)")
    parser.add_argument("--user-tokens", type=int, help="each user message (default 96; --quick 48)")
    parser.add_argument(
        "--answer-tokens", type=int, help="each scripted answer in the history (default 128; --quick 48)"
    )
    parser.add_argument(
        "--checkpoints",
        type=Path,
        default=Path(tempfile.gettempdir()) / "qwen-mlx-bench",
        help="where the random checkpoints are built and reused (default: %(default)s)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="default: %(default)s")
    parser.add_argument("--stem", help="output file names (default: bench-<backend> or bench-<backend>-quick)")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    if args.speculative:
        defaults = {**defaults, **(SPECULATIVE_QUICK if args.quick else SPECULATIVE_FULL)}
    for key, value in defaults.items():
        name = "shape" if key == "shapes" else key
        if getattr(args, name, None) is None:
            setattr(args, name, list(value) if isinstance(value, list) else value)
    return args


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


def load_both(path: Path, share_weights: bool):
    """Both sides read the same folder with their own loader, both evaluated before anything is timed."""
    ours = qwen_mlx.load(path)
    mlx_model, mlx_tokenizer = mlx_lm.load(str(path), lazy=share_weights)
    if share_weights:
        theirs = dict(tree_flatten(mlx_model.parameters()))
        mine = unfused_parameters(ours)  # mlx-lm's names; slices of our fused arrays, not copies
        if theirs.keys() != mine.keys() or any(mine[k].shape != v.shape for k, v in theirs.items()):
            raise SystemExit(f"{path}: mlx-lm's parameters differ from qwen_mlx's; run without --share-weights")
        mlx_model.update(tree_unflatten(list(mine.items())))
    no_end_tokens(mlx_tokenizer)
    return ours, mlx_model, mlx_tokenizer


def bench_model(label: str, ours, mlx_model, mlx_tokenizer, args: argparse.Namespace) -> dict[str, Any]:
    """Warm both sides up, then `rounds` timed runs each, alternating which goes first."""
    rng = random.Random(0)
    prompt = [rng.randrange(FIRST_SPECIAL_ID) for _ in range(args.prompt_tokens)]
    sides = {
        OURS: lambda n: generate_ours(ours, prompt, n, args.prefill_step_size),
        MLX_LM: lambda n: generate_mlx_lm(mlx_model, mlx_tokenizer, prompt, n, args.prefill_step_size),
    }
    for run in sides.values():  # kernels and shapes compiled before anything is timed
        run(min(8, args.max_tokens))
    runs = []
    for round_ in range(args.rounds):
        order = [OURS, MLX_LM] if round_ % 2 == 0 else [MLX_LM, OURS]
        for side in order:
            runs.append(sides[side](args.max_tokens).as_dict())
        log(
            f"  round {round_ + 1}: "
            + ", ".join(f"{r['side']} TTFT {r['ttft_s'] * 1e3:.0f} ms, {r['decode_tps']:.1f} tok/s" for r in runs[-2:])
        )
    first = {side: next(r for r in runs if r["side"] == side)["tokens"] for side in sides}
    return {
        "label": label,
        "runs": runs,
        "summary": summarize(runs, (OURS, MLX_LM)),
        "same_tokens": first[OURS] == first[MLX_LM],
    }


def bench_fusion(path: Path, ours, args: argparse.Namespace) -> dict[str, Any]:
    """qwen_mlx fused (as loaded) against the same checkpoint loaded unfused, on bench_model's prompt."""
    unfused = qwen_mlx.load(path, fuse=False)
    rng = random.Random(0)
    prompt = [rng.randrange(FIRST_SPECIAL_ID) for _ in range(args.prompt_tokens)]
    models = {OURS: ours, UNFUSED: unfused}

    def run(side: str, n: int) -> dict[str, Any]:
        return {**generate_ours(models[side], prompt, n, args.prefill_step_size).as_dict(), "side": side}

    for side in models:
        run(side, min(8, args.max_tokens))
    runs = []
    for round_ in range(args.rounds):
        for side in [OURS, UNFUSED] if round_ % 2 == 0 else [UNFUSED, OURS]:
            runs.append(run(side, args.max_tokens))
    summary = summarize(runs, (OURS, UNFUSED))
    log(f"  fused ÷ unfused: decode {summary['decode_tps']['ratio']:.2f}×, TTFT {summary['ttft_s']['ratio']:.2f}×")
    first = {side: next(r for r in runs if r["side"] == side)["tokens"] for side in models}
    del unfused
    gc.collect()
    mx.clear_cache()
    return {"runs": runs, "summary": summary, "same_tokens": first[OURS] == first[UNFUSED]}


def bench_conversation(label: str, ours, ours_tokenizer, mlx_model, mlx_tokenizer, args) -> dict[str, Any]:
    script = make_script(ours_tokenizer, args.turns, args.system_tokens, args.user_tokens, args.answer_tokens)

    def sides():
        return [
            OursChat(ours, ours_tokenizer),
            MlxLmChat(mlx_model, mlx_tokenizer, reuse=False),
            MlxLmChat(mlx_model, mlx_tokenizer, reuse=True),
        ]

    warm = [{"role": "user", "content": script["users"][0]}]
    for side in sides():  # templates compiled and kernels warm before the first timed turn
        side.turn(warm, 4)
    turns = run_conversation(sides(), script, args.turn_tokens, log=log)
    return {
        "label": label,
        "sides": [side.side for side in sides()],
        "max_tokens": args.turn_tokens,
        "script_tokens": {"system": args.system_tokens, "user": args.user_tokens, "answer": args.answer_tokens},
        "turns": turns,
    }


def speculative_prompts(tokenizer: Tokenizer, prompt_tokens: int) -> dict[str, list[int]]:
    """The repetitive prompt (as many of EDIT_SOURCE's lines as fit in `prompt_tokens`) and the natural one."""

    def rendered(content: str, thinking: bool) -> list[int]:
        messages = [{"role": "user", "content": content}]
        return tokenizer.encode(tokenizer.apply_chat_template(messages, enable_thinking=thinking))

    lines = EDIT_SOURCE.read_text().splitlines(keepends=True)
    edit = rendered(EDIT_REQUEST + lines[0] + "```", thinking=False)
    for count in range(2, len(lines) + 1):
        longer = rendered(EDIT_REQUEST + "".join(lines[:count]) + "```", thinking=False)
        if len(longer) > prompt_tokens:
            break
        edit = longer
    return {"repetitive (edit a file)": edit, "natural (a question)": rendered(QUESTION, thinking=True)}


def bench_speculative(label: str, ours, mlx_model, mlx_tokenizer, draft_ours, draft_mlx, tokenizer, args):
    """Each prompt: every side warmed up, then `rounds` timed runs each, the order rotating every round."""
    k, step = args.num_draft_tokens, args.prefill_step_size
    vocab = ours.args.vocab_size

    def run(side: str, prompt: list[int], n: int) -> dict[str, Any]:
        if side in (MLX_LM, MLX_LM_DRAFT):
            draft = draft_mlx if side == MLX_LM_DRAFT else None
            spec = {"draft_model": draft, "num_draft_tokens": k, "side": side, "keep": None}
            return generate_mlx_lm(mlx_model, mlx_tokenizer, prompt, n, step, **spec).as_dict()
        # A fresh drafter each run: no run reuses the draft cache of the one before.
        drafter = (
            DraftModel(draft_ours, vocab) if side == OURS_DRAFT else PromptLookup() if side == OURS_LOOKUP else None
        )
        spec = {"drafter": drafter, "num_draft_tokens": k, "side": side, "keep": None}
        return generate_ours(ours, prompt, n, step, **spec).as_dict()

    results = []
    for name, prompt in speculative_prompts(tokenizer, args.prompt_tokens).items():
        for side in SPECULATIVE_SIDES:
            run(side, prompt, min(8, args.max_tokens))
        runs = []
        for round_ in range(args.rounds):
            shift = round_ % len(SPECULATIVE_SIDES)
            for side in SPECULATIVE_SIDES[shift:] + SPECULATIVE_SIDES[:shift]:
                runs.append(run(side, prompt, args.max_tokens))
        summary = {}
        for side in SPECULATIVE_SIDES:
            mine = [r for r in runs if r["side"] == side]
            plain = next(r for r in runs if r["side"] == side.partition(" + ")[0])
            summary[side] = {
                "decode_tps": statistics.median(r["decode_tps"] for r in mine),
                "ttft_s": statistics.median(r["ttft_s"] for r in mine),
                "total_s": statistics.median(r["total_s"] for r in mine),
                "acceptance": mine[0]["acceptance"],
                "passes_per_token": mine[0]["passes_per_token"],
                "same_tokens": mine[0]["tokens"] == plain["tokens"] if side != plain["side"] else None,
            }
        log(
            f"  {name}: "
            + ", ".join(
                f"{side} {s['decode_tps']:.1f} tok/s {s['passes_per_token']:.2f} p/t" for side, s in summary.items()
            )
        )
        results.append({"name": name, "prompt_tokens": len(prompt), "runs": runs, "summary": summary})
    pairs = (("plain", OURS, MLX_LM), ("draft", OURS_DRAFT, MLX_LM_DRAFT))
    ratio = {  # speeds, qwen_mlx ÷ mlx-lm (above 1: ours is faster), the median over the prompts
        f"{key} {metric}": statistics.median(
            p["summary"][a]["decode_tps"] / p["summary"][b]["decode_tps"]
            if metric == "decode"
            else p["summary"][b]["total_s"] / p["summary"][a]["total_s"]
            for p in results
        )
        for key, a, b in pairs
        for metric in ("decode", "end to end")
    }
    return {"label": label, "prompts": results, "head_to_head": ratio}


def main_speculative(args: argparse.Namespace) -> int:
    info = machine()
    settings = ("quick", "shape", "bits", "draft_shape", "layers", "dtype", "prompt_tokens", "max_tokens", "rounds")
    results: dict[str, Any] = {
        "machine": info,
        "sides": list(SPECULATIVE_SIDES),
        "settings": {k: getattr(args, k) for k in (*settings, "prefill_step_size", "num_draft_tokens")},
        "speculative": [],
        "work_counts": None,
    }
    log(f"machine: {info['cpu']} / {info['gpu']}, backend {info['backend']}, mlx {info['mlx']}")
    for bits in args.bits:
        draft_label = checkpoint_name(args.draft_shape, bits, None, args.dtype)
        draft_path, built = ensure_checkpoint(args.checkpoints, args.draft_shape, bits, None, args.dtype)
        log(f"draft {draft_label}: {'built' if built else 'reused'} {draft_path}")
        draft_ours, draft_mlx = qwen_mlx.load(draft_path), mlx_lm.load(str(draft_path))[0]
        for shape in args.shape:
            label = checkpoint_name(shape, bits, args.layers, args.dtype)
            path, built = ensure_checkpoint(args.checkpoints, shape, bits, args.layers, args.dtype)
            log(f"{label}: {'built' if built else 'reused'} {path}")
            ours, mlx_model, mlx_tokenizer = load_both(path, args.share_weights)
            result = bench_speculative(
                label, ours, mlx_model, mlx_tokenizer, draft_ours, draft_mlx, Tokenizer.load(path), args
            )
            result.update(
                shape=shape, bits=bits, draft=draft_label, checkpoint=str(path), draft_checkpoint=str(draft_path)
            )
            results["speculative"].append(result)
            del ours, mlx_model, mlx_tokenizer
            gc.collect()
            mx.clear_cache()
        del draft_ours, draft_mlx
    if not args.no_demo:
        log("demo model: work counts")
        results["work_counts"] = demo_work_counts(args.num_draft_tokens, log)
    stem = args.stem or f"bench-speculative-{info['backend']}{'-quick' if args.quick else ''}"
    paths = write(results, args.out, stem, render=speculative_markdown, draw=None)
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    print(speculative_markdown(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.speculative:
        return main_speculative(args)
    conversation_at = (args.shape[0], args.bits[0])
    if args.conversation:
        shape, _, bits = args.conversation.partition(":")
        conversation_at = (shape, int(bits or args.bits[0]))
    info = machine()
    results: dict[str, Any] = {
        "machine": info,
        "sides": [OURS, MLX_LM],
        "settings": {
            k: getattr(args, k)
            for k in (
                "quick",
                "shape",
                "bits",
                "layers",
                "dtype",
                "prompt_tokens",
                "max_tokens",
                "rounds",
                "prefill_step_size",
                "turns",
                "turn_tokens",
                "system_tokens",
                "user_tokens",
                "answer_tokens",
                "share_weights",
                "fusion",
            )
        },
        "configs": [],
        "conversation": None,
    }
    log(
        f"machine: {info['cpu']} / {info['gpu'] or info['device_info'].get('device_name')}, backend "
        f"{info['backend']}, mlx {info['mlx']}, mlx-lm {info['mlx_lm']}"
    )
    todo = [(shape, bits) for shape in args.shape for bits in args.bits]
    if not args.no_conversation and conversation_at not in todo:
        todo.append(conversation_at)
    for shape, bits in todo:
        label = checkpoint_name(shape, bits, args.layers, args.dtype)
        start = time.perf_counter()
        path, built = ensure_checkpoint(args.checkpoints, shape, bits, args.layers, args.dtype)
        log(f"{label}: {'built' if built else 'reused'} {path} ({time.perf_counter() - start:.0f} s)")
        ours, mlx_model, mlx_tokenizer = load_both(path, args.share_weights)
        if shape in args.shape and bits in args.bits:
            result = bench_model(label, ours, mlx_model, mlx_tokenizer, args)
            result.update(
                shape=shape,
                bits=bits,
                layers=args.layers,
                checkpoint=str(path),
                config=shape_config(shape, args.layers),
                weights_bytes={OURS: weights_nbytes(ours), MLX_LM: weights_nbytes(mlx_model)},
            )
            if args.fusion:
                result["fusion"] = bench_fusion(path, ours, args)
            results["configs"].append(result)
        if not args.no_conversation and (shape, bits) == conversation_at:
            log(f"{label}: conversation")
            results["conversation"] = bench_conversation(
                label, ours, Tokenizer.load(path), mlx_model, mlx_tokenizer, args
            )
        del ours, mlx_model, mlx_tokenizer
        gc.collect()
        mx.clear_cache()
    stem = args.stem or f"bench-{info['backend']}{'-quick' if args.quick else ''}"
    paths = write(results, args.out, stem)
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
