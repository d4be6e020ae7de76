"""The `qwen-mlx` command: one entry point, one subcommand per job.

Errors a user can cause (`QwenMLXError`) print as one line on stderr with exit status 1; argparse's own
usage errors exit with status 2. Nothing else is caught, so a real bug still shows its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from . import __version__
from .errors import QwenMLXError

GIB = 1 << 30


def info(args: argparse.Namespace) -> int:
    """Describe a model without reading its weights: architecture, size, quantization."""
    from .loader import load
    from .memory import model_nbytes
    from .quant import bits_per_weight, parameter_count

    model = load(args.model, revision=args.revision, lazy=True)
    a = model.args
    summary = {
        "path": str(model.path),
        "model_type": a.model_type,
        "layers": a.num_hidden_layers,
        "hidden_size": a.hidden_size,
        "attention_heads": f"{a.num_attention_heads} query / {a.num_key_value_heads} key-value, head_dim {a.head_dim}",
        "vocab_size": a.vocab_size,
        "tied_embeddings": a.tie_word_embeddings,
        "rope": f"{a.rope_type}, theta {a.rope_theta:g}",
        "parameters": parameter_count(model),
        "bits_per_weight": round(bits_per_weight(model), 3),
        "weights_gib": round(model_nbytes(model) / GIB, 3),
        "quantization": model.config.get("quantization"),
    }
    if a.num_experts:
        summary["experts"] = f"{a.num_experts_per_tok} of {a.num_experts}, expert width {a.moe_intermediate_size}"
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    width = max(map(len, summary))
    for key, value in summary.items():
        if key == "quantization":
            value = _describe_quantization(value)
        elif key == "parameters":
            value = f"{value:,}"
        print(f"{key.replace('_', ' '):<{width}}  {value}")
    return 0


def _describe_quantization(block: dict | None) -> str:
    if not block:
        return "none (full precision)"
    overrides = sum(isinstance(v, dict) for v in block.values())
    text = f"{block['bits']}-bit affine, group {block['group_size']}"
    return text + (f", {overrides} module(s) with their own bits" if overrides else "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen-mlx", description="Run Qwen3 on Apple Silicon with MLX.")
    parser.add_argument("--version", action="version", version=f"qwen-mlx {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info_parser = commands.add_parser(
        "info",
        help="describe a model: architecture, parameters, quantization",
        description="Describe a model without loading its weights. Example: qwen-mlx info Qwen/Qwen3-4B",
    )
    info_parser.add_argument("model", help="a model folder, or a Hugging Face repo id (owner/name)")
    info_parser.add_argument("--revision", help="a branch, tag or commit of a Hub repo")
    info_parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    info_parser.set_defaults(handler=info)

    # Parsed by the converter's own parser (see main); listed here so `qwen-mlx --help` shows it.
    commands.add_parser(
        "convert",
        add_help=False,
        help="convert a Hugging Face checkpoint into an MLX folder, quantized (qwen-mlx convert --help)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["convert"]:
        from .convert.cli import main as convert_main

        return convert_main(argv[1:], prog="qwen-mlx convert")
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except QwenMLXError as error:
        print(f"qwen-mlx: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
