"""The chat app's model picker (`/model` with no name), driven by Textual's Pilot on the real app: the demo
model and a tiny real checkpoint in a models folder of their own, the fit estimate of `qwen-mlx list`, and a
real `qwen-mlx serve` for the endpoint's list."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from test_app import SIZE, errors, ready, send, status_line, wait_until
from textual.pilot import Pilot

from qwen_mlx import memory, models
from qwen_mlx.app import commands
from qwen_mlx.app.app import KEYS, ChatApp, Source
from qwen_mlx.app.picker import ConfirmLoad, ModelPicker, fit_warning, local_fit, too_big
from qwen_mlx.app.store import Store

TINY = "tiny"  # the second model's name in the models folder
SMALL_BUDGET = 1 << 20  # 1 MiB: no model fits
LARGE_BUDGET = 64 << 30  # fixed, so the picker and `list` judge the same budget (MemAvailable moves)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "chats.sqlite3")


@pytest.fixture
def models_home(tmp_path: Path, demo_model_path: Path, checkpoint, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A qwen-mlx cache of this test's own: the built demo model, and `models/tiny` (a real tiny checkpoint)."""
    cache = tmp_path / "qwen-mlx"
    (cache / "models").mkdir(parents=True)
    (cache / demo_model_path.name).symlink_to(demo_model_path)
    (cache / "models" / TINY).symlink_to(checkpoint("dense_tied"))
    monkeypatch.setenv("QWEN_MLX_CACHE", str(cache))
    return cache


@pytest.fixture
def make_app(models_home: Path, store: Store) -> Callable[..., ChatApp]:
    def make(source: Source | None = None) -> ChatApp:
        return ChatApp(source or Source(model="demo"), store=store)

    return make


async def open_picker(pilot: Pilot) -> ModelPicker:
    app: ChatApp = pilot.app
    await send(pilot, "/model")
    await wait_until(lambda: isinstance(app.screen, ModelPicker) and app.screen.choices, what="the picker's rows")
    await pilot.pause()
    return app.screen


def row(picker: ModelPicker, name: str) -> int:
    return [choice.name for choice in picker.choices].index(name)


def marked(picker: ModelPicker) -> list[str]:
    """The names of the rows marked as the current model."""
    table = picker.table
    return [picker.choices[i].name for i in range(table.row_count) if table.get_row_at(i)[0]]


async def move_to(pilot: Pilot, picker: ModelPicker, name: str) -> None:
    """Arrow keys, as a user would, down or up to the row of `name`."""
    steps = row(picker, name) - picker.table.cursor_row
    await pilot.press(*(["down"] * steps if steps > 0 else ["up"] * -steps))
    assert picker.table.cursor_row == row(picker, name)


async def loaded(app: ChatApp, label: str) -> None:
    await wait_until(
        lambda: app.engine.backend is not None and app.engine.backend.label == label and not app.status.state,
        what=f"{label} to load",
    )


async def test_the_picker_lists_what_qwen_mlx_list_shows_and_enter_loads_the_choice(make_app, monkeypatch):
    monkeypatch.setattr(memory, "memory_budget", lambda: LARGE_BUDGET)
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(app)
        picker = await open_picker(pilot)
        names = [choice.name for choice in picker.choices]
        assert "demo" in names and TINY in names, names
        assert marked(picker) == ["demo"] and picker.table.cursor_row == row(picker, "demo")
        # The same cells as `qwen-mlx list` (its columns and its fit estimate), read from the same disk.
        listed = models.format_table(models.list_models(budget=LARGE_BUDGET)).splitlines()
        assert listed[0].split() == ["NAME", "ARCH", "PARAMS", "BITS", "SIZE", "CONTEXT", "FITS"]
        tiny_line = next(line for line in listed if line.startswith(TINY + " "))
        cells = picker.table.get_row_at(row(picker, TINY))
        assert cells[1] == TINY and cells[2] == "qwen3" and cells[-1].startswith("yes (")
        assert all(cell in tiny_line for cell in cells[1:]), (cells, tiny_line)

        await move_to(pilot, picker, TINY)
        await pilot.press("enter")
        await loaded(app, TINY)
        assert app.screen is app.main_screen
        assert app.source.model == TINY and app.conversation.model == TINY
        assert status_line(app).startswith(f"{TINY} · ")
        assert not errors(app)

        picker = await open_picker(pilot)  # the new model is the marked one now
        assert marked(picker) == [TINY] and picker.table.cursor_row == row(picker, TINY)
        await pilot.press("escape")
        assert app.screen is app.main_screen


async def test_esc_closes_the_picker_and_keeps_the_model(make_app):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(app)
        backend = app.engine.backend
        picker = await open_picker(pilot)
        await move_to(pilot, picker, TINY)
        await pilot.press("escape")
        await pilot.pause()
        assert app.screen is app.main_screen
        assert app.engine.backend is backend and app.source.model == "demo"
        assert not app.status.state and status_line(app).startswith("demo · ")
        # Enter on the current model is no reload either.
        picker = await open_picker(pilot)
        assert picker.table.cursor_row == row(picker, "demo")
        await pilot.press("enter")
        await pilot.pause()
        assert app.screen is app.main_screen and app.engine.backend is backend and not app.status.state
        # The chat's keys are its own again: a message goes to the model that was kept.
        await send(pilot, "What is 2 + 3?")
        await wait_until(lambda: len(app.conversation.messages) == 2, what="the answer")
        assert app.conversation.messages[-1].content


async def test_a_model_that_will_not_fit_asks_before_it_loads(make_app, monkeypatch):
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await ready(app)
        backend = app.engine.backend
        monkeypatch.setattr(memory, "memory_budget", lambda: SMALL_BUDGET)
        picker = await open_picker(pilot)
        assert picker.table.get_row_at(row(picker, TINY))[-1].startswith("no (")
        await move_to(pilot, picker, TINY)
        await pilot.press("enter")
        await wait_until(lambda: isinstance(app.screen, ConfirmLoad), what="the question")
        question = app.screen.question
        fit = picker.choices[row(picker, TINY)].fit
        assert question == fit_warning(TINY, fit)
        assert (
            question.startswith(f"{TINY} needs ~{models.size_text(fit.total)}")
            and "this machine has ~1.0 MiB" in question
        )
        assert "load anyway? (Enter" in question
        await pilot.pause(0.3)  # nothing loads while it asks
        assert app.engine.backend is backend and not app.status.state
        await pilot.press("escape")
        await pilot.pause()
        assert app.screen is app.main_screen and app.engine.backend is backend and app.source.model == "demo"

        # `/model NAME` asks the same question; Enter loads it anyway.
        await send(pilot, f"/model {TINY}")
        await wait_until(lambda: isinstance(app.screen, ConfirmLoad), what="the question for /model NAME")
        assert app.screen.question == question
        assert app.engine.backend is backend
        await pilot.press("enter")
        await loaded(app, TINY)
        assert app.source.model == TINY and app.screen is app.main_screen and not errors(app)


async def test_a_chat_on_an_endpoint_picks_among_the_endpoints_models(demo_server, store):
    app = ChatApp(Source(endpoint=demo_server, model="no-such-model"), store=store)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(lambda: errors(app), what="the wrong model's error")
        assert "has no model 'no-such-model'" in errors(app)[0] and app.engine.backend is None
        picker = await open_picker(pilot)
        assert picker.columns == ("NAME", "CONTEXT") and "demo" in [c.name for c in picker.choices]
        assert marked(picker) == []  # nothing is loaded
        await move_to(pilot, picker, "demo")
        await pilot.press("enter")
        await wait_until(lambda: app.engine.backend is not None and not app.status.state, what="the connection")
        assert app.source.endpoint == demo_server and app.source.model == "demo"
        assert app.engine.backend.model == "demo" and len(errors(app)) == 1
        assert status_line(app).startswith("demo @ 127.0.0.1:")

        # Enter on the model already held closes the picker and keeps the connection.
        backend = app.engine.backend
        picker = await open_picker(pilot)
        assert marked(picker) == ["demo"]
        await pilot.press("enter")
        await pilot.pause()
        assert app.screen is app.main_screen and app.engine.backend is backend and not app.status.state


async def test_a_distributed_chat_says_why_there_is_no_picker(store):
    app = ChatApp(Source(model="/no/such/model", distributed="pp over 2 ranks"), store=store)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(lambda: errors(app), what="the load error")
        await send(pilot, "/model")
        await wait_until(lambda: len(errors(app)) == 2, what="the notice")
        assert "split over the ranks (pp over 2 ranks)" in errors(app)[1]
        assert app.screen is app.main_screen


def test_fit_estimate_for_a_name_and_help(models_home, monkeypatch):
    monkeypatch.setattr(memory, "memory_budget", lambda: SMALL_BUDGET)
    fit = local_fit(TINY)
    assert fit is not None and fit.budget == SMALL_BUDGET and too_big(fit)
    assert local_fit(str(models_home / "models" / TINY)).total == fit.total  # a folder path: the same model
    assert local_fit("nobody/not-downloaded") is None and not too_big(None)  # unknown: loads without asking
    from qwen_mlx.demo import demo_coder_dir

    assert local_fit("demo-coder") is None  # not built yet: built on load, without asking
    demo_coder_dir().symlink_to((models_home / "models" / TINY).resolve())  # a stand-in for a built one
    assert local_fit("demo-coder").total == fit.total
    assert "| `/model [NAME]` | no name: choose from a list" in commands.help_markdown(KEYS)
