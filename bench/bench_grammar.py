"""Grammar libraries for `response_format`, measured on the real Qwen3 tokenizer (151,669 tokens, 151,936 logits).

    python bench/bench_grammar.py                      # every library that imports; a few seconds each
    python bench/bench_grammar.py --out /tmp/bench     # write bench-grammar.md elsewhere

For each of llguidance, xgrammar and outlines-core it times (a) the tokenizer-level setup, (b) compiling
`{"type": "json_object"}` and a small nested schema, and (c) the mean time per token of computing the next-token
bitmask and advancing the matcher while walking a valid ~200-token document token by token. The walk also
checks the mask: every token of the document must be allowed where it comes, and once the document is complete
only end tokens may be. A library that fails either check is marked, whatever its speed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.fixtures locates the real tokenizer

from qwen_mlx.tokenizer import Tokenizer  # noqa: E402
from tests.fixtures import VOCAB_SIZE, tokenizer_dir  # noqa: E402

ROUNDS = 5  # compile and walk repeats; the median is reported
SLOW_COMPILE_S = 5.0  # a compile slower than this is timed once
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "projects": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"title": {"type": "string"}, "stars": {"type": "integer"}},
                "required": ["title", "stars"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["name", "age", "role", "projects"],
    "additionalProperties": False,
}
DOCUMENT = {
    "name": "Ada Lovelace, Countess of Lovelace",
    "age": 36,
    "role": "editor",
    "projects": [
        {"title": "Notes on the Analytical Engine, with translator's annotations", "stars": 1843},
        {"title": "Bernoulli numbers: a program for the engine, step by step", "stars": 512},
        {"title": "Poetical science: letters to Charles Babbage and Michael Faraday", "stars": 77},
        {"title": "Flyology: a study of how birds fly, with drawings of wings", "stars": 12},
        {"title": "Gambling on horses: a mathematical system that did not work", "stars": 3},
        {"title": "A correspondence course in calculus with Augustus De Morgan", "stars": 250},
    ],
}


@dataclass
class Result:
    library: str
    version: str
    import_s: float
    setup_s: float
    compile_s: dict[str, float] = field(default_factory=dict)
    step_us: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character a vocabulary entry uses -> the byte it stands for."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class Llguidance:
    name, modules = "llguidance", ("llguidance",)

    def __init__(self, tokenizer: Tokenizer):
        import llguidance

        self.llg = llguidance
        self.tokenizer = llguidance.LLTokenizer(
            tokenizer._tokenizer.to_str(), n_vocab=VOCAB_SIZE, eos_token=tokenizer.end_token_ids
        )

    def compile(self, schema: dict) -> Any:
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema)
        error = self.llg.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise ValueError(error)
        # Matcher construction is where llguidance builds its lexer; part of the per-request cost.
        self.llg.LLMatcher(self.tokenizer, grammar)
        return grammar

    def matcher(self, grammar: Any) -> tuple[Callable[[], np.ndarray], Callable[[int], bool]]:
        matcher = self.llg.LLMatcher(self.tokenizer, grammar)
        bitmask = np.full((VOCAB_SIZE + 31) // 32, -1, dtype=np.int32)

        def fill() -> np.ndarray:
            matcher.unsafe_compute_mask_ptr(bitmask.ctypes.data, bitmask.nbytes)
            return bitmask

        return fill, matcher.consume_token


class Xgrammar:
    name, modules = "xgrammar", ("xgrammar",)

    def __init__(self, tokenizer: Tokenizer):
        import torch
        import xgrammar

        self.xgr, self.torch = xgrammar, torch
        vocab = tokenizer._tokenizer.get_vocab(with_added_tokens=True)
        encoded = [""] * VOCAB_SIZE
        for token, index in vocab.items():
            encoded[index] = token
        metadata = xgrammar.TokenizerInfo._detect_metadata_from_hf(tokenizer._tokenizer.to_str())
        info = xgrammar.TokenizerInfo(
            encoded,
            metadata["vocab_type"],
            vocab_size=VOCAB_SIZE,
            stop_token_ids=tokenizer.end_token_ids,
            add_prefix_space=metadata["add_prefix_space"],
        )
        self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)

    def compile(self, schema: dict) -> Any:
        # Not compile_builtin_json_grammar: that one also allows a top-level array.
        return self.compiler.compile_json_schema(schema)

    def matcher(self, grammar: Any) -> tuple[Callable[[], np.ndarray], Callable[[int], bool]]:
        matcher = self.xgr.GrammarMatcher(grammar)
        bitmask = self.xgr.allocate_token_bitmask(1, VOCAB_SIZE)

        def fill() -> np.ndarray:
            matcher.fill_next_token_bitmask(bitmask)
            return bitmask.numpy()[0]

        return fill, matcher.accept_token


class OutlinesCore:
    name, modules = "outlines-core", ("outlines_core",)

    def __init__(self, tokenizer: Tokenizer):
        import outlines_core

        self.oc = outlines_core
        # One end token only: outlines-core's Vocabulary takes a single eos id.
        self.eos = tokenizer.end_token_ids[0]
        decoder = byte_decoder()
        added = {t.content for t in tokenizer._tokenizer.get_added_tokens_decoder().values()}
        tokens: dict[bytes, list[int]] = {}
        for token, index in tokenizer._tokenizer.get_vocab(with_added_tokens=False).items():
            if token not in added:
                tokens.setdefault(bytes(decoder[c] for c in token), []).append(index)
        self.vocabulary = outlines_core.Vocabulary(self.eos, tokens)

    def compile(self, schema: dict) -> Any:
        # Its default whitespace is `[ ]?`, which refuses pretty-printed JSON; JSON's own whitespace instead.
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema), whitespace_pattern=r"[\n\r\t ]*")
        return self.oc.Index(regex, self.vocabulary)

    def matcher(self, grammar: Any) -> tuple[Callable[[], np.ndarray], Callable[[int], bool]]:
        guide = self.oc.Guide(grammar)
        bitmask = np.full((VOCAB_SIZE + 31) // 32, -1, dtype=np.int32)

        def fill() -> np.ndarray:
            guide.write_mask_into(bitmask.ctypes.data, bitmask.size, 4)
            return bitmask

        def advance(token: int) -> bool:
            try:
                guide.advance(token, return_tokens=False)
            except ValueError:  # raised for a token the index has no transition for
                return False
            return True

        return fill, advance


LIBRARIES = (Llguidance, Xgrammar, OutlinesCore)


def allowed(bitmask: np.ndarray) -> np.ndarray:
    """Allowed token ids of a packed little-endian bitmask."""
    return np.flatnonzero(np.unpackbits(bitmask.view(np.uint8), bitorder="little"))


def walk(library: Any, grammar: Any, ids: list[int], end_ids: list[int]) -> tuple[float, list[str]]:
    """Mean µs per token of mask + advance over `ids`, and what the mask got wrong."""
    fill, advance = library.matcher(grammar)
    problems, elapsed = [], 0.0
    for position, token in enumerate(ids):
        start = time.perf_counter()
        bitmask = fill()
        ok = advance(token)
        elapsed += time.perf_counter() - start
        if not (bitmask[token // 32] >> (token % 32)) & 1 or ok is False:
            problems.append(f"token {position} ({token}) refused")
            return elapsed / (position + 1) * 1e6, problems
    final = set(allowed(fill()).tolist())
    if not final or not final <= set(end_ids):
        problems.append(f"after the document: {len(final)} tokens allowed, not only end tokens")
    return elapsed / len(ids) * 1e6, problems


def measure(library_class: Any, tokenizer: Tokenizer, ids: list[int]) -> Result | None:
    start = time.perf_counter()
    try:
        for module in library_class.modules:
            importlib.import_module(module)
    except ImportError as e:
        print(f"{library_class.name}: not installed ({e})", file=sys.stderr)
        return None
    import_s = time.perf_counter() - start
    start = time.perf_counter()
    library = library_class(tokenizer)
    result = Result(library_class.name, version(library_class.name), import_s, time.perf_counter() - start)
    for kind, schema in (("json_object", {"type": "object"}), ("schema", SCHEMA)):
        times, grammar = [], None
        try:
            while len(times) < ROUNDS and sum(times) < SLOW_COMPILE_S:
                start = time.perf_counter()
                grammar = library.compile(schema)
                times.append(time.perf_counter() - start)
        except Exception as e:  # each library raises its own types
            result.problems.append(f"{kind}: compile failed ({type(e).__name__}: {e})")
            continue
        result.compile_s[kind] = statistics.median(times)
        print(f"{result.library}: compiled {kind} in {times[0]:.3f} s", file=sys.stderr)
        steps = []
        for _ in range(ROUNDS):
            step_us, problems = walk(library, grammar, ids, tokenizer.end_token_ids)
            steps.append(step_us)
        result.step_us[kind] = statistics.median(steps)
        result.problems += [f"{kind}: {p}" for p in problems]
    return result


def markdown(results: list[Result], n_tokens: int) -> str:
    lines = [
        f"Real Qwen3 tokenizer, {VOCAB_SIZE} logits; walk over a valid {n_tokens}-token document (medians of "
        f"{ROUNDS}); the grammar library alone, applying the mask to MLX logits not included.",
        "",
        "| library | version | import | setup (tokenizer) | compile json_object | compile schema "
        "| µs/token json_object | µs/token schema | mask correct |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:

        def ms(kind: str, r: Result = r) -> str:
            return f"{r.compile_s[kind] * 1e3:.1f} ms" if kind in r.compile_s else "failed"

        def us(kind: str, r: Result = r) -> str:
            return f"{r.step_us[kind]:.0f}" if kind in r.step_us else "—"

        correct = "yes" if not r.problems else "no: " + "; ".join(r.problems)
        cells = [r.library, r.version, f"{r.import_s * 1e3:.0f} ms", f"{r.setup_s * 1e3:.0f} ms"]
        cells += [ms("json_object"), ms("schema"), us("json_object"), us("schema"), correct]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    cli = parser.parse_args()
    tokenizer = Tokenizer.load(tokenizer_dir())
    text = json.dumps(DOCUMENT, indent=2)
    ids = tokenizer.encode(text)
    results = [r for r in (measure(lib, tokenizer, ids) for lib in LIBRARIES) if r is not None]
    table = markdown(results, len(ids))
    cli.out.mkdir(parents=True, exist_ok=True)
    (cli.out / "bench-grammar.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
