"""Finding and loading a model by name: a local folder, `demo`, a pulled model, or a Hugging Face Hub repo id.

Design decisions:
- Hub downloads go through `huggingface_hub.snapshot_download` with only the files a Qwen3 runtime needs,
  its own progress bars and cache, and its offline mode (`HF_HUB_OFFLINE=1`).
- `demo` and `demo-coder` (when no folder of that name is here) are the offline demo models (Qwen3's format
  and Qwen3-Coder's XML tool calls), built into the cache on first use.
- The order: a folder path, `demo` or `demo-coder`, a folder in the models folder (`qwen-mlx pull --quantize`),
  a short name (`qwen3:8b`, `FAMILY` below), a Hub repo id.
- Reading the folder is `qwen_mlx.checkpoint`'s; `load` gives the bare model (the public one-liner),
  `load_model` the whole `Loaded` result (config, folder, generation settings).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from .checkpoint import Loaded, assemble, shard_index
from .errors import QwenMLXError
from .model import Model

HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "merges.txt", "vocab.json", "tokenizer.model"]
HUB_METADATA = [pattern for pattern in HUB_FILES if pattern != "*.safetensors"]  # a pipeline stage's first fetch
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

FAMILY = {
    "qwen3:0.6b": "Qwen/Qwen3-0.6B",
    "qwen3:1.7b": "Qwen/Qwen3-1.7B",
    "qwen3:4b": "Qwen/Qwen3-4B",
    "qwen3:8b": "Qwen/Qwen3-8B",
    "qwen3:14b": "Qwen/Qwen3-14B",
    "qwen3:32b": "Qwen/Qwen3-32B",
    "qwen3:30b-a3b": "Qwen/Qwen3-30B-A3B",
    "qwen3:235b-a22b": "Qwen/Qwen3-235B-A22B",
    "qwen3:4b-2507-instruct": "Qwen/Qwen3-4B-Instruct-2507",
    "qwen3:4b-2507-thinking": "Qwen/Qwen3-4B-Thinking-2507",
    "qwen3:30b-a3b-2507-instruct": "Qwen/Qwen3-30B-A3B-Instruct-2507",
    "qwen3:30b-a3b-2507-thinking": "Qwen/Qwen3-30B-A3B-Thinking-2507",
    "qwen3-coder:30b": "Qwen/Qwen3-Coder-30B-A3B-Instruct",
}
QUANTIZED_REPO = "mlx-community/{name}-{bits}bit"
DEFAULT_QUANT = "4bit"
QUANTS = ("4bit", "8bit", "bf16")
MODELS_FOLDER = "models"
NAME_QUANT = re.compile(r"^(?P<base>.+):(?P<bits>4|8)(?:bit)?$")
DEMO_NAMES = ("demo", "demo-coder")  # the offline demo models, trained here on first use (qwen_mlx.demo)


def models_dir() -> Path:
    """Where `pull --quantize` writes: `models` in qwen-mlx's cache folder ($QWEN_MLX_CACHE, ...)."""
    from .demo import cache_root

    return cache_root() / MODELS_FOLDER


def split_quant(name: str) -> tuple[str, int | None]:
    """`REPO:4bit` / `qwen3:8b:8` -> (REPO, 4); anything else -> (name, None)."""
    match = NAME_QUANT.match(name)
    return (match["base"], int(match["bits"])) if match else (name, None)


def short_name(name: str) -> tuple[str, str] | None:
    """A family short name as (the official repo, the quant asked: 4bit, 8bit or bf16); None otherwise."""
    base, quant = name.lower(), DEFAULT_QUANT
    for suffix in QUANTS:
        if base.endswith(":" + suffix) or base.endswith(":" + suffix.removesuffix("bit")):
            base, quant = base.rsplit(":", 1)[0], suffix
            break
    return (FAMILY[base], quant) if base in FAMILY else None


def converted_name(repo_id: str, bits: int) -> str:
    return f"{repo_id.rsplit('/', 1)[-1]}-{bits}bit"


def find_named(name: str) -> Path | str | None:
    """A models-folder name or a short name: its folder (a Path) or its Hub repo id (a str); else None."""
    if "/" not in name and "\\" not in name and name not in (".", ".."):
        folder = models_dir() / name
        if (folder / "config.json").is_file():
            return folder
    family = short_name(name)
    if family is None:
        return None
    repo, quant = family
    if quant == "bf16":
        return repo
    converted = models_dir() / converted_name(repo, int(quant.removesuffix("bit")))
    if (converted / "config.json").is_file():
        return converted
    return QUANTIZED_REPO.format(name=repo.rsplit("/", 1)[-1], bits=quant.removesuffix("bit"))


def is_hub_repo(path_or_repo: str | Path) -> bool:
    """True when `path_or_repo` names a Hub repo (to download) rather than a folder here or the demo."""
    text = str(path_or_repo)
    return (
        text not in DEMO_NAMES
        and not Path(text).expanduser().exists()
        and bool(REPO_ID.match(text))
        and not text.startswith((".", "~"))
    )


def resolve_model_path(path_or_repo: str | Path, revision: str | None = None, *, weights: bool = True) -> Path:
    """A local folder as it is; a Hub repo id downloaded (or found in the cache) with huggingface_hub.

    `demo` and `demo-coder` (when no folder of that name is here) are the offline demo models, built into the
    cache on first use. `weights=False` fetches a repo's config, index and tokenizer only (`fetch_shards`
    brings the weights).
    """
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    if str(path_or_repo) in DEMO_NAMES:
        from .demo import ensure_demo, ensure_demo_coder  # imported here: the demo module loads models itself

        return ensure_demo() if str(path_or_repo) == "demo" else ensure_demo_coder()
    if path.exists():
        raise QwenMLXError(f"{path} is a file; pass the model folder that holds config.json")
    text = str(path_or_repo)
    named = find_named(text)
    if isinstance(named, Path):
        return named
    text = named or text
    if not REPO_ID.match(text) or text.startswith((".", "~")):
        raise QwenMLXError(f"no model folder at {path}, and {text!r} is not a Hugging Face repo id (owner/name)")
    return _download(text, revision, HUB_FILES if weights else HUB_METADATA)


def fetch_shards(repo_id: str, revision: str | None, path: Path, keep: Callable[[str], bool]) -> None:
    """Download only the safetensors shards that hold a tensor `keep` accepts, as the index in `path` (the
    repo's snapshot) maps them: a pipeline stage fetches its own layers' shards, not the whole model."""
    weight_map = shard_index(path)
    names = sorted({file for name, file in weight_map.items() if keep(name)}) if weight_map else ["*.safetensors"]
    _download(repo_id, revision, names)


def _download(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except GatedRepoError:
        raise QwenMLXError(f"{repo_id} is gated: accept its terms on the Hub and log in with `hf auth login`") from None
    except RepositoryNotFoundError:
        raise QwenMLXError(
            f"Hugging Face repo {repo_id!r} was not found (check the name; private repos need `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise QwenMLXError(f"{repo_id} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        raise QwenMLXError(
            f"{repo_id} is not in the local Hugging Face cache and the Hub cannot be reached (no network, or "
            "HF_HUB_OFFLINE=1); download it once while online, or pass a local folder"
        ) from None
    except (HfHubHTTPError, OSError) as error:
        raise QwenMLXError(f"could not download {repo_id}: {error}") from None


def load_model(
    path_or_repo: str | Path,
    *,
    quantize: int | None = None,
    group_size: int = 64,
    dtype: str | None = None,
    revision: str | None = None,
    lazy: bool = False,
    fuse: bool = True,
) -> Loaded:
    """Load a Qwen3 model and what came with it; `quantize=4|8` quantizes a full-precision checkpoint on load;
    `fuse=False` keeps q/k/v and gate/up as separate matmuls (`qwen_mlx.fuse`)."""
    path = resolve_model_path(path_or_repo, revision)
    return assemble(path, quantize=quantize, group_size=group_size, dtype=dtype, lazy=lazy, fuse=fuse)


def load(path_or_repo: str | Path, **options) -> Model:
    """The model alone (`load_model` gives its config, folder and generation settings too)."""
    return load_model(path_or_repo, **options).model
