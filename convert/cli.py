"""`python -m qwen_mlx.convert` and `qwen-mlx convert`: the converter's command line.

Flags map one to one onto `convert()`'s arguments; mlx-lm's spellings (`--hf-path`, `--mlx-path`, `-q`)
are accepted so its users feel at home. Errors a user can fix print as one line and exit with status 1
(a full disk and an unwritable output folder among them); SIGTERM is turned into an exception so an
interrupted conversion cleans up its temporary folder, and what a SIGKILL left is undone by the next run.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from qwen_mlx.errors import OneLineParser, QwenMLXError
from qwen_mlx.quant import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
from qwen_mlx.save import MAX_SHARD_BYTES

from .core import DEFAULT_BITS, DEFAULT_GROUP_SIZE, convert
from .recipes import available_recipes, load_recipe
from .report import format_report, human_size

EXAMPLES = """\
examples:
  python -m qwen_mlx.convert Qwen/Qwen3-4B -o Qwen3-4B-4bit --q-bits 4
  python -m qwen_mlx.convert Qwen/Qwen3-8B-FP8 -o Qwen3-8B-8bit --q-bits 8
  python -m qwen_mlx.convert ./Qwen3-30B-A3B -o Qwen3-30B-A3B-mixed --recipe mixed_4_8
  python -m qwen_mlx.convert ./Qwen3-4B-4bit -o Qwen3-4B-bf16 --dequantize
  python -m qwen_mlx.convert --hf-path Qwen/Qwen3-0.6B --mlx-path Qwen3-0.6B-8bit -q --q-bits 8
"""
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)\s*$", re.I)
SIZE_UNITS = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def parse_size(text: str) -> int:
    match = SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 5GB or 500MiB")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])


def build_parser(prog: str = "python -m qwen_mlx.convert") -> argparse.ArgumentParser:
    recipes = "; ".join(f"{name}: {load_recipe(name).description}" for name in available_recipes())
    parser = OneLineParser(
        prog=prog,
        description="Convert a Hugging Face Qwen3 checkpoint (bf16/fp16/fp32 or block-FP8) or an MLX folder "
        "into an MLX folder in mlx-lm's format, optionally quantized, and report what quantization cost.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", nargs="?", help="a Hugging Face repo id (owner/name) or a local model folder")
    parser.add_argument("--hf-path", dest="hf_path", help="the source, mlx-lm's spelling of SOURCE")
    parser.add_argument(
        "-o",
        "--output",
        "--mlx-path",
        dest="output",
        type=Path,
        help="the folder to write (default: the source's name plus -4bit, -8bit, -mlx...); example: -o Qwen3-4B-4bit",
    )
    parser.add_argument(
        "-q", "--quantize", action="store_true", help=f"quantize (to --q-bits, {DEFAULT_BITS} unless given)"
    )
    parser.add_argument(
        "--q-bits",
        type=int,
        choices=SUPPORTED_BITS,
        help="bits per weight of the quantized layers (implies -q); example: --q-bits 8",
    )
    parser.add_argument(
        "--q-group-size",
        type=int,
        choices=SUPPORTED_GROUP_SIZES,
        default=DEFAULT_GROUP_SIZE,
        help="weights sharing one scale and bias (default %(default)s; smaller is more accurate and larger)",
    )
    parser.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        help="float type of the weights that stay unquantized (default: the source's own; bfloat16 for FP8)",
    )
    parser.add_argument(
        "--recipe",
        metavar="NAME",
        help=f"mixed precision (implies -q): a shipped recipe or a recipe .json file. {recipes}. "
        "Example: --recipe mixed_4_6",
    )
    parser.add_argument(
        "--dequantize", action="store_true", help="turn an MLX-quantized folder back into float weights"
    )
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists (only once the new one is done)")
    parser.add_argument(
        "--no-eval", dest="evaluate", action="store_false", help="skip the quality report after quantizing"
    )
    parser.add_argument("--revision", help="a branch, tag or commit of the Hub repo; example: --revision main")
    parser.add_argument(
        "--max-shard-size",
        type=parse_size,
        default=MAX_SHARD_BYTES,
        help="largest output file (default 5GiB, as mlx-lm); example: --max-shard-size 2GB",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def default_output(source: str, bits: int | None, dequantize: bool) -> Path:
    name = Path(source.rstrip("/")).name
    if bits is not None:
        return Path(f"{name}-{bits}bit")
    return Path(f"{name}-{'dequantized' if dequantize else 'mlx'}")


def main(argv: Sequence[str] | None = None, prog: str = "python -m qwen_mlx.convert") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    source = args.source or args.hf_path
    if args.source and args.hf_path and args.source != args.hf_path:
        parser.error("give the source once: as SOURCE or as --hf-path")
    if not source:
        parser.error("the source is required: a Hugging Face repo id or a local folder")
    bits = args.q_bits
    if bits is None and args.quantize and not args.recipe:
        bits = DEFAULT_BITS

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if args.recipe and bits is None:
            bits = load_recipe(args.recipe).bits
        out = args.output or default_output(source, bits, args.dequantize)
        result = convert(
            source,
            out,
            bits=bits,
            group_size=args.q_group_size,
            dtype=args.dtype,
            recipe=args.recipe,
            dequantize=args.dequantize,
            force=args.force,
            evaluate=args.evaluate,
            revision=args.revision,
            max_shard_bytes=args.max_shard_size,
            progress=not args.quiet,
        )
    except QwenMLXError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written", file=sys.stderr)
        return 130

    if result.report:
        print(format_report(result.report))
    what = f"{result.quantization['bits']}-bit" if result.quantization else result.dtype
    print(
        f"wrote {result.out} ({what}, {result.bits_per_weight:.2f} bits per weight, "
        f"{human_size(result.size_bytes)} in {len(result.files)} files)"
    )
    return 0
