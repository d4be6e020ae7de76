"""A chat as the app holds it: settings plus messages, with each answer's reasoning kept apart.

The reasoning is stored beside the answer, never inside it: a reloaded chat shows it folded, and the next
prompt is built from `prompt_messages`, which leaves it out (as Qwen3's template does for past turns).

A conversation remembers the stored version it last saw (`saved`, set by the store on load and save), so a
save can tell "my own chat, updated" from "someone else's newer chat under this name" (see `store.Store.save`).
It is left out of equality: two chats with the same content are the same chat, wherever they were saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Message:
    role: str  # "user" or "assistant"
    content: str
    reasoning: str = ""  # assistant only: the thinking, shown folded, never sent back
    reasoning_tokens: int = 0
    thought_s: float = 0.0  # seconds from the first reasoning token to the first answer token
    stopped: bool = False  # the user stopped this answer before it ended


@dataclass(frozen=True)
class SavedVersion:
    """Which stored version of a chat this conversation is: its name then, and that save's revision token."""

    name: str
    revision: str


@dataclass
class Conversation:
    name: str | None = None  # set by /save or --resume; a named chat is saved after every turn
    model: str = ""  # what the chat was last held with (a model name or an endpoint URL)
    system: str = ""
    thinking: bool = True
    budget: int | None = None  # thinking budget in tokens; None: unlimited
    temperature: float | None = None  # None: the model's own generation settings
    messages: list[Message] = field(default_factory=list)
    saved: SavedVersion | None = field(default=None, compare=False)  # None: never loaded or saved

    def prompt_messages(self) -> list[dict]:
        """The OpenAI-style messages for the next turn: the system prompt, then answers without reasoning."""
        prompt = [{"role": "system", "content": self.system}] if self.system else []
        prompt += [{"role": m.role, "content": m.content} for m in self.messages]
        return prompt
