"""`response_format` grammars and the JSON logits processor, on the real Qwen3 tokenizer (no model)."""

from __future__ import annotations

import copy
import json

import mlx.core as mx
import numpy as np
import pytest
from fixtures import VOCAB_SIZE, tokenizer_dir

from qwen_mlx.constrain import MAX_INDENT, JsonConstraint, response_format_grammar
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.tokenizer import Tokenizer

MAX_STEPS = 400
# Over the whole vocabulary a random walk inside a JSON string almost never draws the closing quote; over
# single characters it does about once in 95 steps, so objects close.
ONE_CHARACTER_BONUS = 10.0
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer"},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "projects": {
            "type": "array",
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {"title": {"type": "string", "maxLength": 20}, "stars": {"type": "integer"}},
                "required": ["title", "stars"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["name", "age", "role", "projects"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.load(tokenizer_dir())


def end_ids(tokenizer: Tokenizer) -> set[int]:
    return set(tokenizer.end_token_ids)


def allowed(processor: JsonConstraint, history: list[int]) -> set[int]:
    """The ids `processor` leaves finite for one step after `history`."""
    logits = processor(mx.array(history, mx.int32), mx.zeros((1, VOCAB_SIZE)))
    return set(np.flatnonzero(np.isfinite(np.array(logits[0]))).tolist())


def one_character_tokens(tokenizer: Tokenizer) -> mx.array:
    """A (1, VOCAB_SIZE) bonus for the ~95 printable ASCII tokens."""
    ids = [tokenizer.encode(chr(c))[0] for c in range(32, 127)]
    return mx.zeros((1, VOCAB_SIZE)).at[:, mx.array(ids)].add(ONE_CHARACTER_BONUS)


def greedy(
    processor: JsonConstraint, tokenizer: Tokenizer, seed: int, bonus: mx.array | None = None
) -> tuple[str, list[int]]:
    """Argmax over random logits after the processor until an end token: the text before it, and every id."""
    mx.random.seed(seed)
    history = [tokenizer.encode("<|im_start|>assistant\n")[-1]]  # the first call's last id is the prompt's
    for _ in range(MAX_STEPS):
        logits = mx.random.normal((1, VOCAB_SIZE))
        logits = processor(mx.array(history, mx.int32), logits if bonus is None else logits + bonus)
        token = int(mx.argmax(logits, axis=-1).item())
        history.append(token)
        if token in end_ids(tokenizer):
            return tokenizer.decode(history[1:-1]), history[1:]
    raise AssertionError(f"no end token after {MAX_STEPS} steps: {tokenizer.decode(history[1:])!r}")


def check_person(value: dict) -> None:
    assert set(value) == {"name", "age", "role", "projects"}
    assert isinstance(value["name"], str) and len(value["name"]) <= 20
    assert isinstance(value["age"], int) and not isinstance(value["age"], bool)
    assert value["role"] in ("admin", "editor", "viewer")
    assert isinstance(value["projects"], list) and len(value["projects"]) <= 3
    for project in value["projects"]:
        assert set(project) == {"title", "stars"}
        assert isinstance(project["title"], str) and isinstance(project["stars"], int)


@pytest.mark.parametrize("response_format", [None, {"type": "text"}])
def test_free_text_has_no_grammar(response_format):
    assert response_format_grammar(response_format) is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_object_decodes_to_an_object(tokenizer, seed):
    processor = JsonConstraint(tokenizer, response_format_grammar({"type": "json_object"}), VOCAB_SIZE)
    text, ids = greedy(processor, tokenizer, seed, one_character_tokens(tokenizer))
    assert isinstance(json.loads(text), dict), text
    assert processor.done and processor.error is None
    assert max(ids[:-1]) < tokenizer.vocab_size  # nothing from the model's padding rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_decodes_to_a_valid_document(tokenizer, seed):
    processor = JsonConstraint(tokenizer, response_format_grammar(JSON_SCHEMA), VOCAB_SIZE)
    text, _ = greedy(processor, tokenizer, seed)
    value = json.loads(text)
    check_person(value)
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(value, SCHEMA)


def test_only_end_tokens_once_complete(tokenizer):
    processor = JsonConstraint(tokenizer, response_format_grammar({"type": "json_object"}), VOCAB_SIZE)
    history = [0]
    for token in tokenizer.encode('{"a": [1, {"b": null}]}'):
        assert end_ids(tokenizer).isdisjoint(allowed(processor, history))  # an unfinished object may not end
        assert not processor.done
        history.append(token)
    assert allowed(processor, history) == end_ids(tokenizer)
    assert processor.done


def test_the_first_call_does_not_advance(tokenizer):
    processor = JsonConstraint(tokenizer, response_format_grammar({"type": "json_object"}), VOCAB_SIZE)
    brace = tokenizer.encode("{")[0]
    assert brace in allowed(processor, [brace])  # the last id is the prompt's, not part of the reply
    assert brace not in allowed(processor, [brace, brace])  # now it was consumed: "{{" is not JSON


def test_special_tokens_never_inside_the_json(tokenizer):
    processor = JsonConstraint(tokenizer, response_format_grammar({"type": "json_object"}), VOCAB_SIZE)
    history = [0]
    allowed(processor, history)
    for token in tokenizer.encode('{"a": "some text'):
        history.append(token)
        inside_string = allowed(processor, history)
    assert len(inside_string) > 100_000
    specials = {tokenizer.token_id(t) for t in ("<think>", "</think>", "<tool_call>", "<|im_start|>")}
    assert not inside_string & (specials | end_ids(tokenizer))


def walk(tokenizer: Tokenizer, processor: JsonConstraint, text: str) -> list[int]:
    """Feed `text`'s tokens through `processor`, asserting each is allowed; the history, ready for one more step."""
    history = [0]
    for token in tokenizer.encode(text):
        assert token in allowed(processor, history), (text, tokenizer.decode([token]))
        history.append(token)
    return history


@pytest.mark.parametrize("indent", [None, 2, 4, "\t"])
def test_compact_and_pretty_json_are_allowed_and_the_answer_ends_with_its_value(tokenizer, indent):
    grammar = response_format_grammar({"type": "json_object"})
    document = {"a": 1, "b": [True, {"c": None}], "d": {"e": {"f": "g"}}}
    for separators in (None, (",", ":")):
        processor = JsonConstraint(tokenizer, grammar, VOCAB_SIZE)
        history = walk(tokenizer, processor, json.dumps(document, indent=indent, separators=separators))
        assert allowed(processor, history) == end_ids(tokenizer)
        assert processor.done


def test_whitespace_is_one_separator_never_a_run(tokenizer):
    grammar = response_format_grammar({"type": "json_object"})
    space, newline = tokenizer.encode(" ")[0], tokenizer.encode("\n")[0]
    processor = JsonConstraint(tokenizer, grammar, VOCAB_SIZE)
    history = walk(tokenizer, processor, '{"answer": 333')
    assert {space, newline} <= allowed(processor, history)
    history.append(space)  # `333 ` and then the padding a weak model reaches for: `\n \n \n ...`
    after_space = allowed(processor, history)
    assert not {space, newline} & after_space
    assert {tokenizer.encode(",")[0], tokenizer.encode("}")[0]} <= after_space

    processor = JsonConstraint(tokenizer, grammar, VOCAB_SIZE)
    history = walk(tokenizer, processor, '{"answer":\n' + " " * MAX_INDENT)
    assert not {space, newline} & allowed(processor, history)
    for padded in ('{"a": 1 \n', '{"a":\n\n', '{"a":  1', '{"a": 1}\n'):
        assert not accepts(tokenizer, grammar, padded), padded


def accepts(tokenizer: Tokenizer, grammar: str, text: str) -> bool:
    """Whether every token of `text` is allowed in turn."""
    processor, history = JsonConstraint(tokenizer, grammar, VOCAB_SIZE), [0]
    for token in tokenizer.encode(text):
        if token not in allowed(processor, history):
            return False
        history.append(token)
    return True


def test_copies_are_independent(tokenizer):
    processor = JsonConstraint(tokenizer, response_format_grammar({"type": "json_object"}), VOCAB_SIZE)
    brace = tokenizer.encode("{")[0]
    allowed(processor, [0])
    twin = copy.copy(processor)
    assert allowed(processor, [0, brace]) != allowed(twin, [0, tokenizer.encode('{"')[0]])
    assert allowed(copy.deepcopy(twin), [0, brace]) == allowed(twin, [0, brace])


def test_a_refused_token_ends_the_reply(tokenizer):
    processor = JsonConstraint(tokenizer, response_format_grammar({"type": "json_object"}), VOCAB_SIZE)
    allowed(processor, [0])
    assert allowed(processor, [0, tokenizer.encode("x")[0]]) == end_ids(tokenizer)
    assert processor.error


@pytest.mark.parametrize(
    ("response_format", "message"),
    [
        ("json", "response_format must be an object"),
        ({"type": "xml"}, "response_format.type is 'xml'"),
        ({}, "response_format.type is None"),
        ({"type": "json_schema"}, "response_format.json_schema must be an object"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema is missing"),
        ({"type": "json_schema", "json_schema": {"schema": [1]}}, "schema must be a JSON object, not list"),
        ({"type": "json_schema", "json_schema": {"name": 3, "schema": {}}}, "json_schema.name must be a string"),
        ({"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}, "strict must be true or false"),
        ({"type": "json_schema", "json_schema": {"schema": {"type": "strin"}}}, "not a usable JSON schema"),
        ({"type": "json_schema", "json_schema": {"schema": {"$ref": "#/$defs/nope"}}}, "not a usable JSON schema"),
    ],
)
def test_bad_response_formats_are_user_errors(response_format, message):
    with pytest.raises(QwenMLXError, match=message.replace("$", r"\$")) as caught:
        response_format_grammar(response_format)
    assert "\n" not in str(caught.value)
