"""Reading the JSON files of a checkpoint folder, with one readable error naming the file (one reader for all)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import QwenMLXError


def read_json(path: Path, *, obj: bool = False) -> Any:
    """A JSON file's contents; with `obj`, it must hold a JSON object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise QwenMLXError(f"cannot read {path} ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QwenMLXError(f"{path} is not valid JSON ({e})") from None
    if obj and not isinstance(data, dict):
        raise QwenMLXError(f"{path} must hold a JSON object")
    return data


def read_generation_config(folder: Path) -> dict:
    """`generation_config.json` as a dict ({} when the checkpoint has none)."""
    path = Path(folder) / "generation_config.json"
    return read_json(path, obj=True) if path.is_file() else {}
