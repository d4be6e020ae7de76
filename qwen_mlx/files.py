"""Reading the files of a checkpoint folder, with one readable error naming the file (one reader for all).

Design decisions:
- Every file is looked at with `os.stat` before it is opened: a FIFO, socket or device named `config.json`
  or `model.safetensors` would block the reader forever, and a directory, a symlink loop or a file we may
  not read would fail with an `OSError` deep inside a parser. Each is refused with one line naming it.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from .errors import QwenMLXError

# What `stat` can find in place of a regular file, as a user would name it.
FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def file_exists(path: Path) -> bool:
    """Whether a regular file is at `path` (False when nothing is there); anything else there is an error.

    Symbolic links are followed; a broken one, a loop of them, a directory, a FIFO, a socket or a device
    is refused, never opened (opening a FIFO blocks until a writer comes).
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.lexists(path):
            raise QwenMLXError(f"{path} is a symbolic link to nothing; replace it with the file itself") from None
        return False
    except OSError as e:  # ELOOP, EACCES, ENOTDIR, ENAMETOOLONG...
        raise QwenMLXError(f"cannot read {path} ({e.strerror or e})") from None
    if stat.S_ISREG(mode):
        return True
    kind = next((name for test, name in FILE_KINDS if test(mode)), "not a regular file")
    raise QwenMLXError(f"{path} is {kind}, not a regular file; replace it with the file itself")


def read_text(path: Path) -> str:
    """A UTF-8 text file's contents, checked to be a regular file first."""
    path = Path(path)
    if not file_exists(path):
        raise QwenMLXError(f"cannot read {path} (no such file)")
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise QwenMLXError(f"cannot read {path} ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise QwenMLXError(f"{path} is not UTF-8 text ({e})") from None


def read_json(path: Path, *, obj: bool = False) -> Any:
    """A JSON file's contents; with `obj`, it must hold a JSON object."""
    path = Path(path)
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise QwenMLXError(f"{path} is not valid JSON ({e})") from None
    except RecursionError:
        raise QwenMLXError(f"{path} is not valid JSON (nested too deeply)") from None
    if obj and not isinstance(data, dict):
        raise QwenMLXError(f"{path} must hold a JSON object")
    return data


def read_generation_config(folder: Path) -> dict:
    """`generation_config.json` as a dict ({} when the checkpoint has none)."""
    path = Path(folder) / "generation_config.json"
    return read_json(path, obj=True) if file_exists(path) else {}
