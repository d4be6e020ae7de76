"""What quantization cost: the source and the quantized model scored on one built-in calibration text.

Design decisions:
- One small multilingual calibration text ships with the package (`calibration.txt`: English, Chinese,
  French, German, Spanish, Japanese, Russian, Python, math; ~580 Qwen3 tokens), so every report is made
  on the same tokens without downloading a data set. Its SHA-256 goes into the report: numbers from
  different texts are not comparable.
- Metrics compare next-token distributions at positions 0..L-2 (the ones with a known next token), so
  every metric covers the same `tokens` positions: KL(source || result) in nats (mean and max over
  positions), top-1 agreement, and each model's perplexity on the text itself.
- Log-probabilities are float32 whatever the weights' dtype, and the prompt runs through the KV cache in
  chunks (256 tokens by default), so a long text never builds a full L x L attention matrix.
- `compare` works through the positions in row blocks: the (L, vocab) temporaries of a KL over the
  151,936-token vocabulary would otherwise cost several times the log-probs themselves.
- `quality_report` takes models or zero-argument callables that load them. With callables the source is
  loaded, scored and released before the result is loaded, so the two never share memory; only the
  source's log-probs (L x vocab float32, ~350 MB for the built-in text) are kept.
- JSON has no inf or NaN: `write_report` writes them as null, while the dict and the terminal table keep
  the float, since a NaN KL is exactly what a broken quantization looks like.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
from tokenizers import Tokenizer

from qwen_mlx.cache import make_cache
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.model import Model

CALIBRATION_FILE = Path(__file__).with_name("calibration.txt")
MAX_CALIBRATION_TOKENS = 1024
CHUNK_TOKENS = 256
# Positions per block in `compare`; bounds its (block, vocab) float32 temporaries.
COMPARE_BLOCK = 128
REPORT_FILE = "quantization_report.json"

ModelSource = Model | Callable[[], Model]


def calibration_text() -> str:
    return CALIBRATION_FILE.read_text(encoding="utf-8")


def calibration_ids(tokenizer_file: Path, max_tokens: int = MAX_CALIBRATION_TOKENS) -> list[int]:
    """The built-in calibration text as token ids (at most `max_tokens`), from a model folder's tokenizer.json."""
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as e:  # the Rust parser raises a bare Exception
        raise QwenMLXError(f"{tokenizer_file} is not a readable tokenizer ({e}); or convert with --no-eval") from None
    # No special tokens: the text is scored as plain text, not as a chat turn.
    return tokenizer.encode(calibration_text(), add_special_tokens=False).ids[:max_tokens]


def next_token_logprobs(model: Model, ids: Sequence[int], chunk_size: int = CHUNK_TOKENS) -> mx.array:
    """Log-softmax of the model's next-token logits at every position: (len(ids), vocab), float32."""
    if not ids:
        raise ValueError("next_token_logprobs needs at least one token id")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    cache = make_cache(model)
    chunks = []
    for start in range(0, len(ids), chunk_size):
        logits = model(mx.array([list(ids[start : start + chunk_size])]), cache)[0].astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # (chunk, vocab)
        mx.eval(logprobs)
        chunks.append(logprobs)
    return chunks[0] if len(chunks) == 1 else mx.concatenate(chunks)


def compare(source_logprobs: mx.array, result_logprobs: mx.array, ids: Sequence[int]) -> dict[str, float]:
    """KL(source || result), top-1 agreement and both perplexities over positions 0..len(ids)-2."""
    positions = len(ids) - 1
    if positions < 1:
        raise ValueError("compare needs at least two token ids")
    if source_logprobs.shape != result_logprobs.shape or source_logprobs.shape[0] != len(ids):
        raise ValueError(
            f"log-prob shapes {source_logprobs.shape} and {result_logprobs.shape} do not match {len(ids)} ids"
        )
    targets = mx.array(list(ids[1:]))[:, None]
    kl_parts, agree_parts, nll_source_parts, nll_result_parts = [], [], [], []
    for start in range(0, positions, COMPARE_BLOCK):
        stop = min(start + COMPARE_BLOCK, positions)
        p = source_logprobs[start:stop].astype(mx.float32)
        q = result_logprobs[start:stop].astype(mx.float32)
        probs = mx.exp(p)
        # 0 * log(0 / q) is 0; without the guard a -inf source log-prob would give NaN.
        kl = mx.where(probs > 0, probs * (p - q), 0.0).sum(axis=-1)
        agree = mx.argmax(p, axis=-1) == mx.argmax(q, axis=-1)
        block_targets = targets[start:stop]
        nll_source = -mx.take_along_axis(p, block_targets, axis=-1)[:, 0]
        nll_result = -mx.take_along_axis(q, block_targets, axis=-1)[:, 0]
        mx.eval(kl, agree, nll_source, nll_result)
        kl_parts.append(kl)
        agree_parts.append(agree)
        nll_source_parts.append(nll_source)
        nll_result_parts.append(nll_result)
    kl = mx.concatenate(kl_parts)
    return {
        "kl_mean": kl.mean().item(),
        "kl_max": kl.max().item(),
        # A count over positions, not a float32 mean: 47 agreements out of 47 must read exactly 1.0.
        "top1_agreement": mx.concatenate(agree_parts).sum().item() / positions,
        "perplexity_source": _perplexity(mx.concatenate(nll_source_parts).mean().item()),
        "perplexity_result": _perplexity(mx.concatenate(nll_result_parts).mean().item()),
        "tokens": positions,
    }


def _perplexity(mean_nll: float) -> float:
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf


def _score(model: ModelSource, ids: list[int], chunk_size: int) -> mx.array:
    # A Model is callable too, so the type decides, not callable().
    if isinstance(model, Model):
        return next_token_logprobs(model, ids, chunk_size)
    loaded = model()
    logprobs = next_token_logprobs(loaded, ids, chunk_size)
    del loaded
    # Hand the freed weights back to the system before the next model is loaded.
    mx.clear_cache()
    return logprobs


def quality_report(
    source_model: ModelSource,
    result_model: ModelSource,
    tokenizer_file: Path,
    *,
    bits_per_weight: float,
    size_bytes: int,
    max_tokens: int = MAX_CALIBRATION_TOKENS,
    chunk_size: int = CHUNK_TOKENS,
) -> dict[str, Any]:
    """Score the source, then the result, on the calibration text; a JSON-ready dict of plain Python values.

    Each model may be a loaded `Model` or a zero-argument callable returning one; a callable is called
    only when that model's turn comes, and its model is released right after scoring.
    """
    ids = calibration_ids(tokenizer_file, max_tokens)
    source_logprobs = _score(source_model, ids, chunk_size)
    result_logprobs = _score(result_model, ids, chunk_size)
    return {
        "bits_per_weight": float(bits_per_weight),
        "size_bytes": int(size_bytes),
        "calibration": CALIBRATION_FILE.name,
        "calibration_sha256": hashlib.sha256(calibration_text().encode("utf-8")).hexdigest(),
        "calibration_tokens": len(ids),
        **compare(source_logprobs, result_logprobs, ids),
    }


def human_size(size_bytes: int) -> str:
    """Binary units: 1536 -> '1.50 KiB'."""
    if size_bytes < 1024:
        return f"{size_bytes} B"
    size, units = size_bytes / 1024, ["KiB", "MiB", "GiB", "TiB"]
    while size >= 1024 and len(units) > 1:
        size, units = size / 1024, units[1:]
    return f"{size:.2f} {units[0]}"


def format_report(report: dict[str, Any]) -> str:
    """A small aligned plain-text table for the terminal."""
    rows = [
        ("bits per weight", f"{report['bits_per_weight']:.2f}"),
        ("size on disk", human_size(report["size_bytes"])),
        ("KL mean (nats)", f"{report['kl_mean']:.4g}"),
        ("KL max (nats)", f"{report['kl_max']:.4g}"),
        ("top-1 agreement", f"{report['top1_agreement'] * 100:.1f}%"),
        ("perplexity", f"{report['perplexity_source']:.2f} → {report['perplexity_result']:.2f} (source → result)"),
        ("calibration", f"{report['tokens']} positions of {report['calibration']}"),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_report(report: dict[str, Any], folder: Path) -> Path:
    """Write `quantization_report.json` into `folder` atomically; inf and NaN become null."""
    folder = Path(folder)
    path = folder / REPORT_FILE
    text = json.dumps({key: _json_safe(value) for key, value in report.items()}, indent=2, allow_nan=False) + "\n"
    # Same folder, so os.replace is a rename on one file system; opened with "x" rather than mkstemp so
    # the file gets the usual umask permissions instead of 0600.
    tmp = folder / f".{REPORT_FILE}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "x", encoding="utf-8") as file:
            file.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
