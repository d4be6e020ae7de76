"""Shared fixtures: tiny real checkpoints built once per session, the prompt, the transformers reference."""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

# The test modules import `fixtures` by name; this keeps that working under any pytest import mode.
sys.path.insert(0, str(Path(__file__).parent))

from fixtures import build_checkpoint  # noqa: E402

PROMPT_TEXT = (
    "The Qwen3 family of language models includes dense and mixture-of-experts variants. "
    "Each model can switch between a thinking mode for complex reasoning and a fast mode for "
    "everyday chat, in over a hundred languages."
)

CheckpointFactory = Callable[[str], Path]
TorchLogits = Callable[[Path, Sequence[Sequence[int]]], np.ndarray]


# The quick tier (`python -m pytest -m "not slow"`) leaves out what trains the demo model (about 40 s, then
# end-to-end turns on it), runs several processes (ranks, servers under load, tmux), or fuzzes the endpoint.
SLOW_FIXTURES = {"demo_model_path"}
SLOW_MODULES = {
    "test_distributed",
    "test_app_tmux",
    "test_app_snapshots",
    "test_serve_load",
    "test_serve_schema",
    "test_agents",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: left out of the quick tier (python -m pytest -m 'not slow')")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__.rpartition(".")[2] if item.module else ""
        if module in SLOW_MODULES or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> CheckpointFactory:
    """`checkpoint("dense_tied") -> Path`: builds a variant on first request, then reuses it."""
    root = tmp_path_factory.mktemp("checkpoints")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_checkpoint(name, root / name)
        return built[name]

    return get


@pytest.fixture(scope="session")
def prompt_ids(checkpoint: CheckpointFactory) -> list[int]:
    """~40 ids of real text, encoded with the real Qwen3 tokenizer the fixtures carry."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(checkpoint("dense_tied") / "tokenizer.json"))
    ids = tokenizer.encode(PROMPT_TEXT).ids
    # Long enough to run past the YaRN fixtures' original_max_position_embeddings (16) twice over.
    assert len(ids) >= 32, len(ids)
    return ids


@functools.lru_cache(maxsize=4)
def _torch_model(path: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@functools.lru_cache(maxsize=64)
def _torch_logits(path: str, batch: tuple[tuple[int, ...], ...]) -> np.ndarray:
    with torch.inference_mode():
        logits = _torch_model(path)(torch.tensor(batch, dtype=torch.long)).logits
    return logits.float().numpy()


def torch_reference_logits(path: Path, batch: Sequence[Sequence[int]]) -> np.ndarray:
    """Logits (B, L, vocab) from transformers' own model for the checkpoint at `path`, float32."""
    return _torch_logits(str(path), tuple(tuple(row) for row in batch))


@pytest.fixture(scope="session")
def torch_logits() -> TorchLogits:
    return torch_reference_logits


@pytest.fixture(scope="session")
def mlx_lm_converted(checkpoint: CheckpointFactory, tmp_path_factory: pytest.TempPathFactory):
    """`mlx_lm_converted(variant, bits, group_size, recipe=None) -> Path`: made once by `mlx_lm.convert`."""
    from mlx_lm import convert

    root = tmp_path_factory.mktemp("mlx_lm_converted")
    made: dict[tuple, Path] = {}

    def get(name: str, bits: int, group_size: int, recipe: str | None = None) -> Path:
        key = (name, bits, group_size, recipe)
        if key not in made:
            out = root / "-".join(str(part) for part in key)
            convert(
                str(checkpoint(name)),
                mlx_path=str(out),
                quantize=True,
                q_bits=bits,
                q_group_size=group_size,
                dtype="float32",
                quant_predicate=recipe,
            )
            made[key] = out
        return made[key]

    return get


@pytest.fixture(scope="session")
def demo_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The offline demo model, trained and verified once per session into `<tmp cache>/demo-<hash>`.

    The folder's parent is laid out like the real cache, so a test may point $QWEN_MLX_CACHE at it.
    """
    from filelock import FileLock

    from qwen_mlx.demo import build, demo_dir

    # One build for every pytest-xdist worker of the run: the first trains it, the others wait and reuse it.
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent
    cache = shared / "qwen-mlx-cache"
    cache.mkdir(exist_ok=True)
    with FileLock(str(cache / ".build.lock")):
        return build(out=cache / demo_dir().name)


# The servers `running_server` has running, by base URL: (process, stderr lines), for a test that reads a
# server's memory (/proc/PID/status) or its log.
SERVERS: dict[str, tuple[subprocess.Popen, list[str]]] = {}


@contextlib.contextmanager
def running_server(
    model: Path | str | None, *options: str, timeout: float = 180, env: dict[str, str] | None = None
) -> Iterator[str]:
    """`qwen-mlx serve` in a subprocess on a free loopback port; yields its base URL (http://127.0.0.1:PORT).

    `model` None leaves `--model` to `options` (none: every model `list` shows); `env` adds to the
    environment. The server prints `serving <id> at http://HOST:PORT/v1` on stderr once it listens; its
    stderr is kept in `SERVERS[url]` lines for a failing test to show.
    """
    chosen = [] if model is None else ["--model", str(model)]
    command = [sys.executable, "-m", "qwen_mlx", "serve", *chosen, "--port", "0", *options]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                               env={**os.environ, **env} if env else None)  # fmt: skip
    lines: list[str] = []
    found: queue.Queue[str] = queue.Queue()

    def drain() -> None:
        for line in process.stderr:
            lines.append(line)
            match = re.search(r"serving .* at (http://\S+)/v1", line)
            if match:
                found.put(match.group(1))
        found.put("")

    threading.Thread(target=drain, daemon=True).start()
    url = ""
    try:
        try:
            url = found.get(timeout=timeout)
        except queue.Empty:
            url = ""
        if not url:
            raise RuntimeError("the server did not start:\n" + "".join(lines))
        SERVERS[url] = (process, lines)
        yield url
    finally:
        SERVERS.pop(url, None)
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def demo_server(demo_model_path: Path) -> Iterator[str]:
    """One `qwen-mlx serve` of the demo model for the whole session (tests must not depend on its cache)."""
    with running_server(demo_model_path, "--model-name", "demo") as url:
        yield url
