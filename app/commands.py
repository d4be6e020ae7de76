"""Slash commands: parsing, checking and completion, with no drawing (plain unit tests cover it).

A command line is checked here, so the app only acts on values that are already valid; a bad one raises
`QwenMLXError` with the usage line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qwen_mlx.errors import QwenMLXError


@dataclass(frozen=True)
class Spec:
    usage: str
    help: str


COMMANDS: dict[str, Spec] = {
    "/think": Spec("/think", "think before answering (following turns)"),
    "/no_think": Spec("/no_think", "answer directly, without thinking (following turns)"),
    "/budget": Spec("/budget N | off", "end thinking after N tokens"),
    "/system": Spec("/system TEXT", "set the system prompt (no text: clear it)"),
    "/temp": Spec("/temp X | default", "sampling temperature, 0 to 2"),
    "/clear": Spec("/clear", "start a new conversation (saved chats are kept)"),
    "/save": Spec("/save [NAME]", "save this chat and export it as Markdown"),
    "/load": Spec("/load NAME", "open a saved chat"),
    "/model": Spec("/model [NAME]", "no name: choose from a list (arrows, Enter, Esc); NAME: load that local model"),
    "/help": Spec("/help", "commands and keys"),
}
MAX_TEMPERATURE = 2.0


@dataclass(frozen=True)
class Command:
    name: str  # "/budget"
    value: object = None  # the checked argument: an int, a float, a str, or None


def parse(line: str) -> Command:
    """`/budget 512` -> Command("/budget", 512). Raises QwenMLXError naming the usage."""
    name, _, rest = line.strip().partition(" ")
    rest = rest.strip()
    spec = COMMANDS.get(name)
    if spec is None:
        near = complete(name)
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise QwenMLXError(f"unknown command {name}{hint}: /help lists them")

    def bad(why: str) -> QwenMLXError:
        return QwenMLXError(f"{why}: usage {spec.usage}")

    if name in ("/think", "/no_think", "/clear", "/help"):
        if rest:
            raise bad(f"{name} takes no argument")
        return Command(name)
    if name == "/budget":
        if rest.lower() in ("off", "none"):
            return Command(name, None)
        if not rest.isdigit():
            raise bad(f"budget {rest!r} is not a whole number of tokens" if rest else "give a budget")
        return Command(name, int(rest))
    if name == "/temp":
        if rest.lower() == "default":
            return Command(name, None)
        try:
            value = float(rest)
        except ValueError:
            raise bad(f"temperature {rest!r} is not a number" if rest else "give a temperature") from None
        if not (math.isfinite(value) and 0 <= value <= MAX_TEMPERATURE):
            raise bad(f"temperature {rest} is out of range")
        return Command(name, value)
    if name == "/load" and not rest:
        raise bad("give the name of a saved chat")
    return Command(name, rest or None)


def complete(prefix: str, names: list[str] | None = None) -> list[str]:
    """Completions of a partly typed command line; after `/load ` they are the saved chats' names."""
    if prefix.startswith("/load ") and names is not None:
        start = prefix[len("/load ") :]
        return [f"/load {n}" for n in names if n.startswith(start)]
    if " " in prefix:
        return []
    return [name for name in COMMANDS if name.startswith(prefix)]


def help_markdown(keys: list[tuple[str, str]]) -> str:
    """The /help text: every command, then the keys."""

    def cell(text: str) -> str:  # a `|` in a cell (`/budget N | off`) would split it: GFM's escape keeps it
        return text.replace("|", "\\|")

    lines = ["| command | does |", "|---|---|"]
    lines += [f"| `{cell(spec.usage)}` | {cell(spec.help)} |" for spec in COMMANDS.values()]
    lines += ["", "| key | does |", "|---|---|"]
    lines += [f"| {cell(key)} | {cell(does)} |" for key, does in keys]
    return "\n".join(lines)
