"""Unit tests of the reply parser and stop strings: raw Qwen3 outputs tokenized with the real tokenizer.

No model here: the "model output" is a string we write, encoded with the real Qwen3 tokenizer and fed
token by token with the real streaming detokenizer, as the chat layer does.
"""

from __future__ import annotations

import pytest
from fixtures import tokenizer_dir

from qwen_mlx.chat import Reply
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.format import (
    ANSWER,
    JSON_TOOL_CALLS,
    START,
    THINKING,
    XML_TOOL_CALLS,
    SpecialIds,
    arguments_as_objects,
    normalize_messages,
    prompt_phase,
    thinking_mode,
    tool_call_format,
)
from qwen_mlx.parser import Answer, Reasoning, ReplyParser, StopStrings, ToolCall, ToolCallError, typed_value
from qwen_mlx.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.load(tokenizer_dir())


def run(tokenizer: Tokenizer, output: str, in_thinking: bool = False, stop=(), **options) -> tuple[list, ReplyParser]:
    parser = ReplyParser(SpecialIds.of(tokenizer), in_thinking, stop, **options)
    detokenizer = tokenizer.detokenizer()
    events = []
    for token in tokenizer.encode(output):
        events += parser.feed(token, detokenizer.add(token))
        if parser.stopped:
            break
    events += parser.finish()
    return events, parser


def gather(events) -> Reply:
    return Reply.gather(iter(events))


def test_thinking_then_answer(tokenizer):
    events, parser = run(tokenizer, "<think>\nLet me add.\n2 + 3 = 5.\n</think>\n\n2 + 3 = **5**.")
    reply = gather(events)
    assert reply.reasoning == "Let me add.\n2 + 3 = 5."
    assert reply.answer == "2 + 3 = **5**."
    assert parser.thought_tokens == len(tokenizer.encode("\nLet me add.\n2 + 3 = 5.\n"))


def test_empty_think_block_of_no_think(tokenizer):
    reply = gather(run(tokenizer, "<think>\n\n</think>\n\nHello!")[0])
    assert (reply.reasoning, reply.answer) == ("", "Hello!")


def test_answer_without_think_block(tokenizer):
    # enable_thinking=False: the template pre-filled the empty block, so the output is the answer alone.
    reply = gather(run(tokenizer, "Hello!\n\nHow are you?")[0])
    assert (reply.reasoning, reply.answer) == ("", "Hello!\n\nHow are you?")


def test_thinking_opened_by_the_template(tokenizer):
    # Thinking-2507 templates end the prompt with "<think>\n": the output holds only "</think>".
    prompt = tokenizer.encode("<|im_start|>assistant\n<think>\n")
    special = SpecialIds.of(tokenizer)
    assert prompt_phase(prompt, special) == THINKING
    assert prompt_phase(tokenizer.encode("<|im_start|>assistant\n<think>\n\n</think>\n\n"), special) == ANSWER
    # Only the last turn counts: an earlier turn's open block says nothing about the new one.
    earlier = tokenizer.encode("<|im_start|>assistant\n<think>\nx<|im_end|>\n<|im_start|>assistant\n")
    assert prompt_phase(earlier, special) == START
    reply = gather(run(tokenizer, "Short thought.\n</think>\n\nThe answer.", in_thinking=True)[0])
    assert (reply.reasoning, reply.answer) == ("Short thought.", "The answer.")


def test_generation_stopping_inside_thinking_keeps_the_reasoning(tokenizer):
    events, parser = run(tokenizer, "<think>\nStill thinking about it\n\n")
    reply = gather(events)
    assert (reply.reasoning, reply.answer) == ("Still thinking about it", "")
    assert parser.in_thinking


def test_several_tool_calls_come_out_structured(tokenizer):
    output = (
        "<think>\nTwo cities.\n</think>\n\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"北京\\"}"}\n</tool_call>'
    )
    events, parser = run(tokenizer, output)
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert [(c.name, c.arguments) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "北京"}),
    ]
    assert calls[0].id != calls[1].id and calls[0].id.startswith("call_")
    assert gather(events).answer.strip() == ""
    assert parser.tool_calls == 2


def test_tool_call_inside_thinking_is_reasoning(tokenizer):
    output = '<think>\nI could write <tool_call>{"name": "x"}</tool_call> here.\n</think>\n\nNo tool needed.'
    events, _ = run(tokenizer, output)
    assert not [e for e in events if isinstance(e, (ToolCall, ToolCallError))]
    reply = gather(events)
    assert reply.reasoning == 'I could write <tool_call>{"name": "x"}</tool_call> here.'
    assert reply.answer == "No tool needed."


@pytest.mark.parametrize(
    "body, error",
    [
        ('\n{"name": "get_weather", "arguments": {"city": \n', "not valid JSON"),
        ('\n{"arguments": {}}\n', '"name"'),
        ('\n{"name": "f", "arguments": [1, 2]}\n', "must be a JSON object"),
        ('\n{"name": "f", "arguments": "{not json"}\n', "arguments are not valid JSON"),
    ],
)
def test_malformed_tool_call_is_an_error_event_with_the_raw_text(tokenizer, body, error):
    events, _ = run(tokenizer, f"Calling.<tool_call>{body}</tool_call>")
    errors = [e for e in events if isinstance(e, ToolCallError)]
    assert len(errors) == 1 and error in errors[0].error
    assert errors[0].raw == f"<tool_call>{body}</tool_call>"
    assert gather(events).answer == "Calling."


CODER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "metric": {"type": "boolean"},
                    "at": {"type": "object"},
                    "hours": {"type": "array", "items": {"type": "integer"}},
                    "threshold": {"type": ["number", "null"]},
                    "unit": {"enum": ["celsius", "fahrenheit"]},
                },
            },
        },
    }
]
# What Qwen3-Coder's template renders for a call, and so what the model writes.
CODER_CALL = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nNew York\n</parameter>\n"
    "<parameter=days>\n3\n</parameter>\n<parameter=metric>\ntrue\n</parameter>\n"
    '<parameter=at>\n{"lat": 40.7, "lon": -74.0}\n</parameter>\n<parameter=hours>\n[9, 12]\n</parameter>\n'
    "<parameter=threshold>\n2.5\n</parameter>\n<parameter=unit>\n3\n</parameter>\n"
    "<parameter=note>\nline one\nline two\n</parameter>\n</function>\n</tool_call>"
)


def test_qwen3_coder_xml_calls_come_out_typed_by_the_tool_schema(tokenizer):
    events, parser = run(tokenizer, "Checking.\n" + CODER_CALL, tool_format=XML_TOOL_CALLS, tools=CODER_TOOLS)
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert [(c.name, c.arguments) for c in calls] == [
        (
            "get_weather",
            {
                "city": "New York",
                "days": 3,
                "metric": True,
                "at": {"lat": 40.7, "lon": -74.0},
                "hours": [9, 12],
                "threshold": 2.5,
                "unit": "3",  # an enum of strings: the text as written
                "note": "line one\nline two",  # not in the schema: text, its inner line break kept
            },
        )
    ]
    assert gather(events).answer.strip() == "Checking." and "<function=" not in gather(events).answer
    assert parser.tool_calls == 1
    # The same call read as JSON is an error, not a silent loss: the format decides the reading.
    json_events, _ = run(tokenizer, CODER_CALL, tool_format=JSON_TOOL_CALLS)
    assert [type(e) for e in json_events] == [ToolCallError]


@pytest.mark.parametrize(
    ("text", "schema", "value"),
    [
        ("42", {"type": "integer"}, 42),
        ("4.0", {"type": "integer"}, 4),
        ("4.5", {"type": "integer"}, "4.5"),  # not an integer: kept as written, never rounded
        ("-1e3", {"type": "number"}, -1000.0),
        ("True", {"type": "boolean"}, True),
        ("yes", {"type": "boolean"}, "yes"),
        ("null", {"anyOf": [{"type": "integer"}, {"type": "null"}]}, None),
        ("[1, 2", {"type": "array"}, "[1, 2"),
        ('{"a": 1}', {"type": "array"}, '{"a": 1}'),
        ("007", {"type": "string"}, "007"),
        ("true", None, "true"),
    ],
)
def test_xml_values_are_typed_only_where_they_parse_as_their_type(text, schema, value):
    assert typed_value(text, schema) == value and type(typed_value(text, schema)) is type(value)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("\n<parameter=city>\nParis\n</parameter>\n", "one <function=NAME>"),
        ("\n<function=get_weather>\nParis\n</function>\n", "outside its <parameter"),
        ("\n<function=get_weather>\n<parameter=city>\nParis\n", "one <function=NAME>"),
    ],
)
def test_malformed_xml_tool_call_is_an_error_event(tokenizer, body, error):
    events, _ = run(tokenizer, f"<tool_call>{body}</tool_call>", tool_format=XML_TOOL_CALLS, tools=CODER_TOOLS)
    assert [type(e) for e in events] == [ToolCallError] and error in events[0].error


def test_a_json_call_under_an_xml_template_still_parses(tokenizer):
    """A Coder model that writes a JSON call anyway (fine-tunes do) is still understood."""
    output = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    events, _ = run(tokenizer, output, tool_format=XML_TOOL_CALLS, tools=CODER_TOOLS)
    assert [(e.name, e.arguments) for e in events] == [("get_weather", {"city": "Paris"})]


def test_the_call_format_is_read_from_what_the_template_renders(tokenizer):
    assert tool_call_format(tokenizer.chat_template) == JSON_TOOL_CALLS
    coder = "{{- '<tool_call>\\n<function=' ~ tool_call.name ~ '>\\n' -}}{{- '<parameter=' ~ k ~ '>\\n' -}}"
    assert tool_call_format(coder) == XML_TOOL_CALLS
    history = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"city": "Paris"}'}},
            {"id": "c2", "type": "function", "function": {"name": "f", "arguments": "not json"}},
        ]},
    ]  # fmt: skip
    calls = arguments_as_objects(history)[1]["tool_calls"]
    assert calls[0]["function"]["arguments"] == {"city": "Paris"}
    assert calls[1]["function"]["arguments"] == "not json"
    assert history[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'  # the caller's, untouched


def test_cut_off_tool_call_is_an_error_event(tokenizer):
    events, _ = run(tokenizer, '<tool_call>\n{"name": "get_weather", "argu')
    errors = [e for e in events if isinstance(e, ToolCallError)]
    assert len(errors) == 1 and "cut off" in errors[0].error
    assert errors[0].raw == '<tool_call>\n{"name": "get_weather", "argu'


def test_multibyte_text_is_never_split(tokenizer):
    text = "你好！很高兴见到你 😊🎉 — 龘 🦩🫠 naïve café 👩‍💻"
    events, _ = run(tokenizer, text)
    pieces = [e.text for e in events if isinstance(e, Answer)]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    # These characters take several byte-level tokens each, so the stream had to hold bytes back.
    assert all(len(tokenizer.encode(c)) > 1 for c in "龘🦩🫠")


def test_stop_string_cuts_the_answer_and_is_never_emitted(tokenizer):
    events, parser = run(tokenizer, "<think>\nEND is a word\n</think>\n\nCount: 1, 2, 3 END 4, 5", stop=["END"])
    reply = gather(events)
    assert reply.reasoning == "END is a word"  # stops apply to the answer only
    assert reply.answer == "Count: 1, 2, 3 "
    assert parser.stopped and parser.stop_sequence == "END"


def test_partial_stop_string_is_held_back_then_released():
    stops = StopStrings(["</answer>"])
    assert stops.feed("Hello </an") == "Hello "
    assert stops.feed("swered") == "</answered"
    assert stops.feed(" fine </") == " fine "
    assert stops.flush() == "</"
    assert not stops.stopped


def test_stop_string_split_across_pieces():
    stops = StopStrings(["STOP", "\n\n"])
    emitted = [stops.feed(piece) for piece in ["one S", "T", "OP two"]]
    assert emitted == ["one ", "", ""]
    assert stops.stopped and stops.matched == "STOP"


def test_the_earliest_stop_string_is_the_one_matched():
    stops = StopStrings(["two", "one"])
    assert stops.feed("zero one two") == "zero " and stops.matched == "one"
    stops = StopStrings(["STOP", "\n\n"])
    assert stops.feed("a\n") == "a" and stops.feed("\nb") == "" and stops.stopped


def test_soft_switches_latest_wins():
    def mode(*contents, enable_thinking=True):
        return thinking_mode(normalize_messages([{"role": "user", "content": c} for c in contents]), enable_thinking)

    assert mode("Hi")
    assert not mode("Hi /no_think")
    assert mode("Hi /no_think", "Now think /think")
    assert not mode("Hi /think", "quick one /no_think")
    assert not mode("Hi /think", enable_thinking=False)  # the template's switch is a hard off


def test_messages_are_normalized_for_the_template():
    messages = normalize_messages(
        [
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]},
        ]
    )
    assert messages[0]["content"] == "ab" and messages[1]["content"] == ""
    with pytest.raises(QwenMLXError, match="role 'robot'"):
        normalize_messages([{"role": "robot", "content": "x"}])
    with pytest.raises(QwenMLXError, match="only text"):
        normalize_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    with pytest.raises(QwenMLXError, match="messages is empty"):
        normalize_messages([])


def test_events_are_typed(tokenizer):
    events, _ = run(tokenizer, "<think>\nx\n</think>\n\ny")
    assert [type(e) for e in events] == [Reasoning, Answer]
