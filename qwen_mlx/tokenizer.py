"""The checkpoint's own tokenizer and chat template, and streaming detokenization.

Design decisions:
- `tokenizers` reads `tokenizer.json` directly; transformers' tokenizer classes would add a heavy import for
  nothing Qwen3 needs.
- The prompt is always the checkpoint's Jinja template (`chat_template.jinja`, else `tokenizer_config.json`),
  rendered the way transformers renders it (sandboxed, `trim_blocks`/`lstrip_blocks`, its `tojson` and
  `raise_exception`), so prompts match token for token. No prompt format is written by hand here.
- Special token ids (`<think>`, `</tool_call>`, ...) are looked up in the vocabulary, never hard-coded; end
  tokens come from `generation_config.json` like the model's own settings.
- Streaming text uses `tokenizers`' `DecodeStream`, which holds back bytes of a character split across
  tokens (Chinese, emoji) until the character is whole.
- A token's own bytes (logprobs report them) come from the byte-level alphabet, since decoding one token
  of a split character gives U+FFFD; `tokenizers` exposes the alphabet's characters but not their bytes,
  so the 256-entry table is built here as GPT-2 defined it.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _Tokenizer
from tokenizers.decoders import DecodeStream

from .errors import QwenMLXError
from .files import file_exists, read_generation_config, read_json, read_text

# Qwen3's end-of-turn tokens, used only when a checkpoint has no generation_config.json.
FALLBACK_END_TOKENS = ("<|im_end|>", "<|endoftext|>")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def read_chat_template(folder: Path, tokenizer_config: dict) -> str:
    """The template as the checkpoint ships it: `chat_template.jinja` wins over `tokenizer_config.json`."""
    jinja_file = folder / "chat_template.jinja"
    if file_exists(jinja_file):
        return read_text(jinja_file)
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if not isinstance(template, str) or not template.strip():
        raise QwenMLXError(
            f"{folder} has no chat template: add chat_template.jinja or a chat_template in tokenizer_config.json"
        )
    return template


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet reversed: the printable stand-in character of each byte -> that byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


_BYTE_LEVEL = _byte_level_table()


class Detokenizer:
    """Turns token ids into text as they arrive; never emits half a UTF-8 character."""

    def __init__(self, tokenizer: _Tokenizer):
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=False)

    def add(self, token_id: int) -> str:
        return self._stream.step(self._tokenizer, token_id) or ""


class Tokenizer:
    """A Qwen3 tokenizer: ids <-> text, the chat template, and the special ids the chat layer needs."""

    def __init__(self, tokenizer: _Tokenizer, chat_template: str, end_token_ids: list[int], special: dict[str, Any]):
        self._tokenizer = tokenizer
        self.chat_template = chat_template
        self._template = _environment().from_string(chat_template)
        self.end_token_ids = end_token_ids
        self._special = special  # bos_token, eos_token, ... for templates that use them
        self._added: dict[int, str] | None = None  # added tokens' text, read on the first token_bytes
        self.think_start_id = self.token_id("<think>")
        self.think_end_id = self.token_id("</think>")
        self.tool_call_start_id = self.token_id("<tool_call>")
        self.tool_call_end_id = self.token_id("</tool_call>")

    def with_chat_template(self, chat_template: str) -> Tokenizer:
        """The same vocabulary and special tokens rendering prompts with `chat_template` (a TemplateError if
        it is not valid Jinja)."""
        return Tokenizer(self._tokenizer, chat_template, self.end_token_ids, self._special)

    @classmethod
    def load(cls, folder: str | Path) -> Tokenizer:
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not file_exists(path):  # a FIFO there would block the Rust reader forever
            raise QwenMLXError(f"{folder} has no tokenizer.json: copy the tokenizer files next to the weights")
        try:
            tokenizer = _Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust parser raises a bare Exception
            raise QwenMLXError(f"{path} is not a readable tokenizer ({e})") from None
        config_path = folder / "tokenizer_config.json"
        config = read_json(config_path, obj=True) if file_exists(config_path) else {}
        template = read_chat_template(folder, config)
        end_ids = read_generation_config(folder).get("eos_token_id")
        if isinstance(end_ids, int):
            end_ids = [end_ids]
        if not isinstance(end_ids, list) or not all(isinstance(i, int) for i in end_ids) or not end_ids:
            end_ids = [i for i in (tokenizer.token_to_id(t) for t in FALLBACK_END_TOKENS) if i is not None]
        special = {k: config.get(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        special = {k: v.get("content") if isinstance(v, dict) else v for k, v in special.items()}
        try:
            return cls(tokenizer, template, end_ids, special)
        except TemplateError as e:  # the template is compiled here: a syntax error, found before any prompt
            where = "chat_template.jinja" if file_exists(folder / "chat_template.jinja") else config_path.name
            raise QwenMLXError(f"{folder / where}: the chat template is not valid Jinja ({e})") from None

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def token_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        # `encode_batch` lets go of the GIL while it works (`encode` holds it): a server that tokenizes a long
        # prompt on a worker thread keeps answering on its event loop.
        return self._tokenizer.encode_batch([text], add_special_tokens=False)[0].ids

    @functools.cached_property
    def longest_token_bytes(self) -> int:
        """The most UTF-8 bytes one token stands for, so a text's byte length over it bounds its token count
        from below (a token holding part of a character counts its U+FFFD: more, so the bound stays honest)."""
        pieces = self._tokenizer.decode_batch([[i] for i in range(self.vocab_size)], skip_special_tokens=False)
        return max((len(piece.encode()) for piece in pieces), default=1) or 1

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def detokenizer(self) -> Detokenizer:
        return Detokenizer(self._tokenizer)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one token stands for: a token holding part of a character gives that part."""
        if self._added is None:
            self._added = {i: t.content for i, t in self._tokenizer.get_added_tokens_decoder().items()}
        if token_id in self._added:
            return self._added[token_id].encode()
        piece = self._tokenizer.id_to_token(token_id)
        if piece is None:
            return b""
        if all(c in _BYTE_LEVEL for c in piece):
            return bytes(_BYTE_LEVEL[c] for c in piece)
        return self.decode([token_id]).encode()  # not a byte-level vocabulary: its text is all there is

    def apply_chat_template(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        enable_thinking: bool = True,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        """Render the checkpoint's template, as `transformers`' `apply_chat_template(tokenize=False)` does."""
        try:
            return self._template.render(
                messages=messages,
                tools=tools or None,
                add_generation_prompt=add_generation_prompt,
                enable_thinking=enable_thinking,
                **self._special,
                **template_kwargs,
            )
        except TemplateError as e:
            raise QwenMLXError(f"the chat template refused these messages: {e}") from None
        except (TypeError, AttributeError, KeyError) as e:
            raise QwenMLXError(f"the messages do not fit the chat template ({type(e).__name__}: {e})") from None
