"""The model picker (`/model` with no name) and the question asked before loading a model that will not fit.

Design decisions:
- The rows are `qwen-mlx list`'s (`qwen_mlx.models.list_models`, its cell formatting and its fit estimate at
  the model's context capped at `LIST_CONTEXT`), so the picker, the command and the warning never disagree.
- Gathering them reads config.json and safetensors headers and scans the Hugging Face cache, so it runs on a
  Textual thread worker, not the UI thread; the rows come back as a `ModelPicker.Listed` message. It builds
  no MLX array, so it needs no turn on the engine's thread (and does not wait behind a turn there).
- The picker only chooses: it dismisses with a `Choice`, and the app loads it by the path `/model NAME`
  takes, which asks `ConfirmLoad` first when the estimate says the model will not fit.
- Only an estimate that says "no" asks; an unknown fit (no memory figure, a model not downloaded yet, an
  endpoint's model) loads at once, and on Metal the loader still warns afterwards.
- In a chat on an endpoint the picker lists the endpoint's `/v1/models` (no fit: the memory is not ours).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import DataTable, Static

from qwen_mlx import memory, models
from qwen_mlx.errors import QwenMLXError
from qwen_mlx.memory import Estimate

LOCAL_COLUMNS = models.COLUMNS
ENDPOINT_COLUMNS = ("NAME", "CONTEXT")
CURRENT_MARK = "●"
KEYS_HINT = f"{CURRENT_MARK} the current model · ↑↓ move · Enter loads · Esc closes"


@dataclass(frozen=True)
class Choice:
    """One row of the picker: what `/model NAME` takes, the cells shown, and the fit estimate if known."""

    name: str
    cells: tuple[str, ...]
    fit: Estimate | None = None
    folder: Path | None = None
    detail: str = ""  # said under the table while the row is highlighted: why it is unreadable, or not built


def entry_cells(entry: models.Entry) -> tuple[str, ...]:
    """The cells `qwen-mlx list` prints for `entry`, in `LOCAL_COLUMNS` order; a model it cannot describe
    gets a short note (the long text is `entry_detail`'s, so one message does not widen the table)."""
    return models.entry_row(entry, note="not built yet" if entry.where == "demo" else "unreadable")


def entry_detail(entry: models.Entry) -> str:
    if entry.info is not None:
        return ""
    if entry.where == "demo":
        return f"{entry.name} is built the first time it loads (about a minute)"
    return f"{entry.name} is unreadable: {entry.error}"


def local_choices() -> list[Choice]:
    """Every model `qwen-mlx list` shows (reads headers and the Hub cache: call it off the UI thread)."""
    entries = models.list_models(budget=memory.memory_budget())
    return [Choice(e.name, entry_cells(e), e.fit, e.folder, entry_detail(e)) for e in entries]


def endpoint_choices(url: str, api_key: str | None) -> list[Choice]:
    """The models an OpenAI-compatible endpoint serves (one HTTP request: call it off the UI thread)."""
    from .endpoint import served_models

    return [
        Choice(name, (name, models.context_text(context) if context else "?"))
        for name, context in served_models(url, api_key)
    ]


def is_current(choice: Choice, model: str | None) -> bool:
    """Whether `choice` is the model the chat holds, named as it was given (`demo`, a name or a folder)."""
    model = model or "demo"
    if choice.name == model:
        return True
    path = Path(model).expanduser()
    return choice.folder is not None and path.is_dir() and path.resolve() == choice.folder.resolve()


def too_big(fit: Estimate | None) -> bool:
    return fit is not None and fit.fits is False


def fit_warning(name: str, fit: Estimate) -> str:
    """What the app asks before loading a model whose estimate does not fit."""
    return (
        f"{name} needs ~{models.size_text(fit.total)} (at {models.context_text(fit.context)} tokens of context), "
        f"this machine has ~{models.size_text(fit.budget or 0)}: load anyway? (Enter loads, Esc keeps the current "
        "model)"
    )


def local_folder(name: str) -> Path | None:
    """The folder `name` loads from when it is already on this machine; None when it would be downloaded."""
    from huggingface_hub import try_to_load_from_cache

    from qwen_mlx.demo import built_dir
    from qwen_mlx.loader import DEMO_NAMES, REPO_ID, find_named

    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if name in DEMO_NAMES:
        return built_dir(name)
    named = find_named(name)
    if isinstance(named, Path):
        return named
    repo = named or name
    if not REPO_ID.match(repo):
        return None
    config = try_to_load_from_cache(repo, "config.json")
    return Path(config).parent if isinstance(config, str) else None


def local_fit(name: str) -> Estimate | None:
    """The fit estimate `qwen-mlx list` would show for `name`; None when unknown (not here, unreadable)."""
    folder = local_folder(name)
    if folder is None:
        return None
    try:
        info = models.read_model(folder)
    except (QwenMLXError, OSError):
        return None  # the load itself says what is wrong with it
    return models.list_fit(info.shape, memory.memory_budget())


class ModelPicker(ModalScreen[Choice | None]):
    """A table of models: arrows move, Enter chooses (dismissing with the `Choice`), Esc closes."""

    BINDINGS = [Binding("escape", "dismiss", "Close")]

    class Listed(Message):
        """The rows, gathered on a worker thread, or why there are none."""

        def __init__(self, choices: list[Choice], error: str | None = None) -> None:
            super().__init__()
            self.choices = choices
            self.error = error

    def __init__(
        self,
        title: str,
        columns: tuple[str, ...],
        gather: Callable[[], list[Choice]],
        current: Callable[[Choice], bool],
    ) -> None:
        super().__init__()
        self.title_text = title
        self.columns = columns
        self.gather = gather
        self.current = current
        self.choices: list[Choice] = []

    def compose(self) -> ComposeResult:
        with Vertical(id="picker"):
            yield Static(self.title_text, id="picker-title", markup=False)
            yield DataTable(id="picker-table", cursor_type="row", zebra_stripes=True)
            yield Static("gathering the models…", id="picker-hint", markup=False)

    @property
    def table(self) -> DataTable:
        return self.query_one("#picker-table", DataTable)

    def on_mount(self) -> None:
        self.table.add_columns("", *self.columns)
        self.table.loading = True
        self.table.focus()
        self._gather()

    @work(thread=True, exclusive=True)
    def _gather(self) -> None:
        try:
            self.post_message(self.Listed(self.gather()))
        except QwenMLXError as error:
            self.post_message(self.Listed([], str(error)))
        except Exception as error:  # a model the listing trips on must not take the app down
            self.post_message(self.Listed([], f"{type(error).__name__}: {error}"))

    @on(Listed)
    def _listed(self, message: Listed) -> None:
        self.choices = message.choices
        table, current_row = self.table, 0
        for row, choice in enumerate(self.choices):
            here = self.current(choice)
            current_row = row if here else current_row
            table.add_row(CURRENT_MARK if here else "", *choice.cells, key=str(row))
        table.loading = False
        table.move_cursor(row=current_row)
        hint = self.query_one("#picker-hint", Static)
        if message.error:
            hint.update(f"could not list the models: {message.error}")
            hint.add_class("error")
        elif not self.choices:
            hint.update("no models: qwen-mlx pull NAME downloads one")
        else:
            hint.update(KEYS_HINT)  # until the cursor's row says more (RowHighlighted)

    @on(DataTable.RowHighlighted)
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        choice = self.choices[int(event.row_key.value)]
        hint = self.query_one("#picker-hint", Static)
        if choice.detail:
            hint.update(choice.detail)
        elif too_big(choice.fit):
            hint.update(f"{choice.name} will not fit by the estimate: Enter asks before loading it")
        else:
            hint.update(KEYS_HINT)
        hint.set_class(too_big(choice.fit), "warning")

    @on(DataTable.RowSelected)
    def _chosen(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.dismiss(self.choices[int(event.row_key.value)])


class ConfirmLoad(ModalScreen[bool]):
    """A yes/no question before a load: Enter is yes, Esc is no."""

    BINDINGS = [Binding("enter", "answer(True)", "Load anyway"), Binding("escape", "answer(False)", "Cancel")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm"):
            yield Static(self.question, id="confirm-question", markup=False)

    def action_answer(self, load: bool) -> None:
        self.dismiss(load)
