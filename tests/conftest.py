"""Shared fixtures: tiny real checkpoints built once per session, the prompt, the transformers reference."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
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
    from qwen_mlx.demo import build, demo_dir

    cache = tmp_path_factory.mktemp("qwen-mlx-cache")
    return build(out=cache / demo_dir().name)
