"""The checkpoint's chat template, rendered by us exactly as transformers renders it; end ids; bad files."""

from __future__ import annotations

import json
import shutil

import pytest
from fixtures import tokenizer_dir
from transformers import AutoTokenizer

from qwen_mlx.errors import QwenMLXError
from qwen_mlx.tokenizer import Tokenizer

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CONVERSATIONS = {
    "one user turn": [{"role": "user", "content": "What is 2 + 3?"}],
    "system and unicode": [
        {"role": "system", "content": "Réponds en français. 🙂"},
        {"role": "user", "content": "你好 /no_think"},
    ],
    "history with thinking stripped": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "<think>\nGreet back.\n</think>\n\nHello!"},
        {"role": "user", "content": "What can you do?"},
    ],
    "tool loop keeps reasoning_content": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "I should call the tool.",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": '{"temperature_c": 18}'},
        {"role": "tool", "content": '{"condition": "sunny"}'},
    ],
}


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return Tokenizer.load(tokenizer_dir())


@pytest.fixture(scope="module")
def reference():
    return AutoTokenizer.from_pretrained(str(tokenizer_dir()))


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("enable_thinking", [True, False])
@pytest.mark.parametrize("tools", [None, [WEATHER_TOOL]])
def test_template_matches_transformers(ours, reference, name, enable_thinking, tools):
    messages = CONVERSATIONS[name]
    expected = reference.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking
    )
    text = ours.apply_chat_template(messages, tools=tools, enable_thinking=enable_thinking)
    assert text == expected
    assert ours.encode(text) == reference.encode(text, add_special_tokens=False)


def test_special_ids_come_from_the_vocabulary(ours):
    assert (ours.think_start_id, ours.think_end_id) == (151667, 151668)
    assert (ours.tool_call_start_id, ours.tool_call_end_id) == (151657, 151658)
    assert ours.encode("<think></think>") == [151667, 151668]


def test_end_ids_come_from_generation_config(tmp_path):
    folder = shutil.copytree(tokenizer_dir(), tmp_path / "tok")
    assert Tokenizer.load(folder).end_token_ids == [151645, 151643]  # no generation_config.json: Qwen3's own
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 151645}))
    assert Tokenizer.load(folder).end_token_ids == [151645]


def test_chat_template_jinja_wins_over_tokenizer_config(tmp_path):
    folder = shutil.copytree(tokenizer_dir(), tmp_path / "tok")
    # A Thinking-2507-style template: the generation prompt opens the think block itself.
    template = json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]
    (folder / "chat_template.jinja").write_text(
        template.replace("{{- '<|im_start|>assistant\\n' }}", "{{- '<|im_start|>assistant\\n<think>\\n' }}")
    )
    text = Tokenizer.load(folder).apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_start|>assistant\n<think>\n")


def test_missing_or_broken_files_name_the_file(tmp_path):
    with pytest.raises(QwenMLXError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
    folder = shutil.copytree(tokenizer_dir(), tmp_path / "tok")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(QwenMLXError, match="no chat template"):
        Tokenizer.load(folder)
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(QwenMLXError, match="tokenizer.json is not a readable tokenizer"):
        Tokenizer.load(folder)


def test_template_errors_are_one_readable_line(ours):
    with pytest.raises(QwenMLXError, match="the chat template refused these messages: .*startswith"):
        ours.apply_chat_template([{"role": "user", "content": None}])
