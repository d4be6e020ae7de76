"""Smoke test: the real `qwen-mlx chat` in a real terminal (tmux), driven by keystrokes, read from the screen."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (.ci/run installs it)")


class Tmux:
    """One tmux server of our own (its own socket), one window running `command`."""

    def __init__(self, socket: Path, command: list[str], env: dict[str, str], size=(100, 30)):
        self.base = ["tmux", "-S", str(socket)]
        exports = [f"{key}={value}" for key, value in env.items()]
        self.run("new-session", "-d", "-x", str(size[0]), "-y", str(size[1]), "env", *exports, *command)
        self.run("set-option", "-g", "remain-on-exit", "on")  # keep the screen to read after the app ends

    def run(self, *args: str) -> str:
        return subprocess.run([*self.base, *args], check=True, capture_output=True, text=True).stdout

    def keys(self, *keys: str, literal: bool = False) -> None:
        self.run("send-keys", *(["-l"] if literal else []), *keys)

    def screen(self) -> str:
        return self.run("capture-pane", "-p")

    def wait_for(self, *texts: str, timeout: float = 120) -> str:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            screen = self.screen()
            if all(text in screen for text in texts):
                return screen
            time.sleep(0.2)
        raise AssertionError(f"never saw {texts} on the screen:\n{self.screen()}")

    def kill(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True)


def test_chat_in_a_real_terminal(demo_model_path: Path, tmp_path: Path):
    env = {
        "QWEN_MLX_CACHE": str(demo_model_path.parent),
        "QWEN_MLX_DATA": str(tmp_path / "data"),
        "TERM": "xterm-256color",
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", str(tmp_path)),
    }
    # The wrapper writes the app's exit status to a file once the app has ended.
    status = tmp_path / "exit-status"
    wrapper = "import pathlib, subprocess as s, sys; pathlib.Path(sys.argv[1]).write_text(str(s.call(sys.argv[2:])))"
    command = [sys.executable, "-c", wrapper, str(status), sys.executable, "-m", "qwen_mlx", "chat", "--model", "demo"]
    tmux = Tmux(tmp_path / "tmux.sock", command, env)
    try:
        tmux.wait_for("demo · think", "ctx 0/40,960")
        tmux.keys("What is 2 + 3?", literal=True)
        tmux.keys("Enter")
        screen = tmux.wait_for("Thought for", "tokens", "2 + 3 = 5", "tok/s")
        assert "The user asks for 2 + 3" not in screen  # the thinking is folded
        tmux.keys("/save smoke", literal=True)
        tmux.keys("Enter")
        tmux.wait_for("saved as 'smoke'")
        assert (tmp_path / "data" / "exports" / "smoke.md").exists()
        tmux.keys("C-q")
        start = time.monotonic()
        while not status.exists() and time.monotonic() - start < 30:
            time.sleep(0.2)
        assert status.exists() and status.read_text() == "0", tmux.run("capture-pane", "-p", "-S", "-200")
        assert "Traceback" not in tmux.run("capture-pane", "-p", "-S", "-200")
    finally:
        tmux.kill()
