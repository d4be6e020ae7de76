"""Constrained decoding for OpenAI's `response_format`: any JSON object, or a document a JSON schema accepts.

Design decisions:
- The grammar work is llguidance's, chosen by `bench/bench_grammar.py` (bench/results/bench-grammar.md) on the
  real Qwen3 tokenizer over xgrammar and outlines-core: the fastest mask (20-40 µs a token against 40-110 for
  xgrammar and 170-340 for outlines-core), a grammar compiled in about a millisecond (xgrammar 25-55 ms;
  outlines-core 1-3 s for a small schema and 20-30 s for `json_object`, which it can only express as a
  depth-limited regex), no dependencies (xgrammar imports torch), several end tokens, and one readable line
  for a schema it cannot use. All three masks were right on the walk.
- `response_format_grammar` returns llguidance's grammar text, which does not depend on the tokenizer, and
  validates it there, so a bad schema is an HTTP 400 before any model work.
- The tokenizer-level object takes 1.5-2.5 s to build for 151,669 tokens; it is built once per tokenizer object
  and model vocabulary size and kept while the tokenizer lives. Ids past the tokenizer's vocabulary (the
  model's 151,936 rows) are never allowed.
- llguidance treats every added token (`<think>`, `<tool_call>`, ...) as special: none can appear inside the
  JSON. The tokenizer's end tokens are its end-of-sequence tokens, allowed exactly when the document is
  complete, and then only they are.
- JSON may come compact or pretty-printed, but whitespace is never free-running: between two tokens of
  structure there is at most one separator, a space or a line break and its indentation (up to
  `MAX_INDENT` spaces or tabs), what `json.dumps` writes and no more. A weak model then cannot pad a reply
  with `\n \n \n ...` until its token cap (llguidance's default, like xgrammar's, is any whitespace).
- Once the top-level value closes, only end tokens are allowed: the answer ends with its JSON.
- The mask goes onto the logits as plain MLX ops on the packed bitmask, on the device (llguidance's own MLX
  helper is a Metal kernel, which the CPU backend lacks); ~0.6 ms a step on a 2-core CPU.
- A token the mask refused (another processor or sampler ignored it) puts the matcher in an error state; the
  processor then allows only end tokens, ending the reply instead of failing a batch.
- A forced call under a Qwen3-Coder template follows that template's XML (`xml_tool_call_grammar`), the form
  the model was trained to write: one of the named tools' `<function=NAME>`, its parameters in the schema's
  order (required ones present, no others), each value typed by its schema as the parser reads it back
  (integers, numbers, booleans as written; objects and arrays as JSON; text up to the first
  `</parameter>`, as lazily as the parser cuts it).
"""

from __future__ import annotations

import copy
import json
import threading
import weakref
from typing import Any

import llguidance
import mlx.core as mx
import numpy as np

from .errors import QwenMLXError
from .parser import schema_types
from .tokenizer import Tokenizer

# Deepest indentation after a line break inside JSON: 10 levels of 4 spaces (or 40 tabs).
MAX_INDENT = 40
RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")
# One separator between tokens of structure: a space, or a line break (\n or \r\n) and its indentation.
_JSON_OPTIONS = {"whitespace_pattern": rf"\x20|\x0D?\x0A[\x20\x09]{{0,{MAX_INDENT}}}"}

_ll_tokenizers: weakref.WeakKeyDictionary[Tokenizer, dict[int, llguidance.LLTokenizer]] = weakref.WeakKeyDictionary()
_ll_tokenizers_lock = threading.Lock()


def _compile(schema: dict, where: str) -> str:
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
    except ValueError as e:
        raise QwenMLXError(f"{where} is not a usable JSON schema: {e}") from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise QwenMLXError(f"{where} is not a usable JSON schema: {error}")
    return grammar


def response_format_grammar(response_format: dict | None) -> str | None:
    """The grammar an OpenAI `response_format` asks for, or None for free text.

    Raises QwenMLXError, one line naming the field at fault, for a malformed or unusable `response_format`.
    """
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise QwenMLXError('response_format must be an object such as {"type": "json_object"}')
    kind = response_format.get("type")
    if kind not in RESPONSE_FORMAT_TYPES:
        raise QwenMLXError(f"response_format.type is {kind!r}: use one of {', '.join(RESPONSE_FORMAT_TYPES)}")
    if kind == "text":
        return None
    if kind == "json_object":
        return _compile({"type": "object"}, "json_object")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise QwenMLXError('response_format.json_schema must be an object: {"name": ..., "schema": {...}}')
    if "name" in spec and not isinstance(spec["name"], str):
        raise QwenMLXError("response_format.json_schema.name must be a string")
    if "strict" in spec and not isinstance(spec["strict"], (bool, type(None))):
        raise QwenMLXError("response_format.json_schema.strict must be true or false")
    schema = spec.get("schema")
    if schema is None:
        raise QwenMLXError("response_format.json_schema.schema is missing: give the JSON schema of the reply")
    if not isinstance(schema, dict):
        raise QwenMLXError(f"response_format.json_schema.schema must be a JSON object, not {type(schema).__name__}")
    return _compile(schema, "response_format.json_schema.schema")


def tool_call_grammar(schema: dict) -> str:
    """The grammar of a `<tool_call>` body: the call's JSON, then the newline before `</tool_call>`.

    One grammar for both, because Qwen3's tokenizer ends a call with one token that spans the JSON's last
    characters and that newline (`"}}\n`): a grammar of the JSON alone could never accept it, and a model
    that wants it would pad with whitespace instead.
    """
    body = {**schema, "x-guidance": _JSON_OPTIONS}
    grammar = 'start: call "\\n"\ncall: %json ' + json.dumps(body) + "\n"
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise QwenMLXError(f"the tools' parameters are not a usable JSON schema: {error}", param="tools")
    return grammar


# XML parameter values the schema types, as `parser.typed_value` reads them back (integers and numbers as JSON
# writes them; booleans also as Python's str() writes them, which is what Coder's template renders).
_XML_VALUES = {
    "integer": r"/-?(0|[1-9][0-9]*)/",
    "number": r"/-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?/",
    "boolean": r"/true|false|True|False/",
    "null": '"null"',
}
# A text value: everything up to the first `</parameter>` (lazy: the parser cuts there too).
_XML_TEXT = r"/(?s:.*)<\/parameter>/"
_XML_CLOSE = r'"\n</parameter>\n"'  # after a typed value: the template's own line breaks


def _literal(text: str) -> str:
    """`text` as a Lark string literal."""
    return json.dumps(text, ensure_ascii=False)


def _xml_value(rule: str, schema: dict | None, definitions: dict) -> list[str]:
    """Lark rules for one parameter's value and what closes it, the rule named `rule`."""
    kinds = schema_types(schema)
    enum = schema.get("enum") if isinstance(schema, dict) else None
    if isinstance(enum, list) and enum and all(isinstance(v, str) for v in enum):
        return [f"{rule}: ({' | '.join(_literal(v) for v in enum)}) {_XML_CLOSE}"]
    if not kinds or "string" in kinds or not kinds <= {*_XML_VALUES, "object", "array"}:
        return [f"{rule}_text[lazy]: {_XML_TEXT}", f'{rule}: {rule}_text "\\n"']
    options = [_XML_VALUES[kind] for kind in sorted(kinds & _XML_VALUES.keys())]
    rules = []
    if kinds & {"object", "array"}:
        options.append(f"{rule}_json")
        rules.append(f"{rule}_json: %json {json.dumps({**schema, **definitions, 'x-guidance': _JSON_OPTIONS})}")
    return [f"{rule}: ({' | '.join(options)}) {_XML_CLOSE}", *rules]


def xml_tool_call_grammar(tools: list[dict], name: str | None = None) -> str:
    """The grammar of a Qwen3-Coder `<tool_call>` body for these OpenAI tools (only `name`'s when given):
    `<function=NAME>`, its `<parameter=KEY>` blocks, `</function>`, and the newline before `</tool_call>`."""
    rules, calls = [], []
    for tool in tools:
        function = tool.get("function", tool)
        if name is not None and function.get("name") != name:
            continue
        parameters = function.get("parameters") or {}
        required = set(parameters.get("required") or ())
        definitions = {k: parameters[k] for k in ("$defs", "definitions") if k in parameters}
        call = f"call_{len(calls)}"
        calls.append(call)
        arguments = []
        for i, (key, schema) in enumerate((parameters.get("properties") or {}).items()):
            opening = _literal(f"<parameter={key}>\n")
            rules += [
                *_xml_value(f"{call}_value_{i}", schema, definitions),
                f"{call}_arg_{i}: {opening} {call}_value_{i}",
            ]
            arguments.append(f"{call}_arg_{i}" if key in required else f"{call}_arg_{i}?")
        opening, closing = _literal(f"<function={function['name']}>\n"), _literal("</function>\n")
        rules.append(f"{call}: {opening} {' '.join(arguments)} {closing}")
    if not calls:
        raise QwenMLXError(f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
    grammar = "\n".join([f"start: {' | '.join(calls)}", *rules]) + "\n"
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise QwenMLXError(f"the tools' parameters are not a usable schema for an XML call: {error}", param="tools")
    return grammar


def _ll_tokenizer(tokenizer: Tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of `tokenizer` with `vocab_size` mask entries, built once and kept."""
    with _ll_tokenizers_lock:
        by_size = _ll_tokenizers.setdefault(tokenizer, {})
        if vocab_size not in by_size:
            by_size[vocab_size] = llguidance.LLTokenizer(
                tokenizer._tokenizer.to_str(), n_vocab=vocab_size, eos_token=list(tokenizer.end_token_ids)
            )
        return by_size[vocab_size]


def _bias_table() -> mx.array:
    """(256, 8) float32: for each byte of a little-endian bitmask, 0 where a bit is set and -inf where not."""
    bits = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little")
    return mx.array(np.where(bits == 1, 0.0, -np.inf).astype(np.float32))


_BIAS = _bias_table()


@mx.compile
def _apply_bitmask(logits: mx.array, mask_bytes: mx.array) -> mx.array:
    """`logits` (1, V) with -inf wherever the packed little-endian bitmask `mask_bytes` (ceil(V / 32) * 4,) has a 0.

    A table lookup and an add: on MLX's CPU backend `mx.where` over 151,936 logits costs twice as much.
    """
    bias = _BIAS[mask_bytes].reshape(1, -1)[:, : logits.shape[-1]]  # (1, V)
    return logits + bias.astype(logits.dtype)


class JsonConstraint:
    """An mlx-lm logits processor that keeps one reply inside `grammar` (from `response_format_grammar`).

    Called once per decode step with the ids so far and the (1, vocab_size) logits. The first call only
    masks; every later call first feeds the matcher the last id (the token sampled at the previous step).
    One instance per reply; `copy.copy` gives an independent one in the same state.
    """

    def __init__(self, tokenizer: Tokenizer, grammar: str, vocab_size: int):
        self._matcher = llguidance.LLMatcher(_ll_tokenizer(tokenizer, vocab_size), grammar, log_level=0)
        if self._matcher.is_error():
            raise QwenMLXError(f"the response_format grammar is unusable: {self._matcher.get_error()}")
        self._vocab_size = vocab_size
        self._end_words = np.zeros((vocab_size + 31) // 32, dtype=np.uint32)
        for token in tokenizer.end_token_ids:
            self._end_words[token // 32] |= np.uint32(1 << (token % 32))
        self._bitmask = np.zeros_like(self._end_words)
        self._started = False

    @property
    def done(self) -> bool:
        """Whether the document is complete: only end tokens may follow."""
        return self._matcher.is_accepting() or self._matcher.is_stopped()

    @property
    def error(self) -> str | None:
        """Why the matcher gave up (a refused token was fed to it), or None."""
        return self._matcher.get_error() if self._matcher.is_error() else None

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self._started:
            self._matcher.consume_token(int(tokens.reshape(-1)[-1].item()))
        self._started = True
        if self._matcher.is_error():
            words = self._end_words
        else:
            self._matcher.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
            words = self._bitmask
        return _apply_bitmask(logits, mx.array(words.view(np.uint8)))

    def admitted(self, last: int, drafts: list[int]) -> int:
        """How many of `drafts`, to follow `last` (the token just drawn from this mask, not fed yet), the
        grammar allows in order, without changing the state (llguidance's `validate_tokens`)."""
        if self._matcher.is_error():
            return 0
        if not self._started:
            return self._matcher.validate_tokens(list(drafts))
        return max(0, self._matcher.validate_tokens([last, *drafts]) - 1)

    def __copy__(self) -> JsonConstraint:
        clone = object.__new__(JsonConstraint)
        clone.__dict__.update(self.__dict__)
        clone._matcher = self._matcher.deep_copy()
        clone._bitmask = self._bitmask.copy()
        return clone

    def __deepcopy__(self, memo: dict[int, Any]) -> JsonConstraint:
        return copy.copy(self)
