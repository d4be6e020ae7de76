"""The real coding agents against `qwen-mlx serve`: Claude Code (`claude -p`, Anthropic Messages) and Codex CLI
(`codex exec`, OpenAI Responses), with only the environment the README gives.

The demo model answers their 10-20K-token prompts with nonsense; what is checked is that each client accepts
the stream and exits 0. They run where `node` and the packages are installed (`.ci/run` installs them into
`.ci/agents` when npm can reach its registry; `npm install @anthropic-ai/claude-code @openai/codex` anywhere on
PATH works too), and are skipped otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import running_server

AGENTS_BIN = Path(__file__).resolve().parent.parent / ".ci" / "agents" / "node_modules" / ".bin"
AGENT_TIMEOUT_S = 600  # a 20K-token prompt prefilled on a CPU, then the demo's reply


def agent(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(AGENTS_BIN))
    if not found or not shutil.which("node"):
        pytest.skip(f"{name} is not installed (npm install @anthropic-ai/claude-code @openai/codex)")
    return found


def test_claude_code_completes_a_request(demo_model_path, tmp_path):
    claude = agent("claude")
    with running_server(demo_model_path, "--model-name", "demo", "--alias", "claude-*") as url:
        env = {
            **os.environ,
            "HOME": str(tmp_path),  # no login, settings or history of the machine's user
            "ANTHROPIC_BASE_URL": url,
            "ANTHROPIC_API_KEY": "local",
            "DISABLE_TELEMETRY": "1",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        }
        done = subprocess.run(
            [claude, "-p", "What is 2 + 3?"], env=env, cwd=tmp_path, capture_output=True, text=True,
            timeout=AGENT_TIMEOUT_S,
        )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "API Error" not in done.stdout + done.stderr


def test_codex_completes_a_request(demo_model_path, tmp_path):
    codex = agent("codex")
    home = tmp_path / "codex"
    home.mkdir()
    with running_server(demo_model_path, "--model-name", "demo", "--alias", "gpt-*") as url:
        (home / "config.toml").write_text(
            'model_provider = "qwen-mlx"\n'
            "[model_providers.qwen-mlx]\n"
            'name = "qwen-mlx"\n'
            f'base_url = "{url}/v1"\n'
            'wire_api = "responses"\n'
            'env_key = "QWEN_MLX_API_KEY"\n'
        )
        env = {**os.environ, "HOME": str(tmp_path), "CODEX_HOME": str(home), "QWEN_MLX_API_KEY": "local"}
        done = subprocess.run(
            [codex, "exec", "--skip-git-repo-check", "-m", "gpt-5", "What is 2 + 3?"], env=env, cwd=tmp_path,
            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=AGENT_TIMEOUT_S,
        )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tokens used" in done.stderr + done.stdout  # Codex's summary: it read a whole response
