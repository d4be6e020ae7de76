"""`qwen-mlx ps` against a real server: what it has loaded, its key, and a server that is not there."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import httpx
from conftest import running_server

KEY = "ps-test-key"


def ps(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "QWEN_MLX_API_KEY"} | (env or {})
    return subprocess.run([sys.executable, "-m", "qwen_mlx", "ps", *args], capture_output=True, text=True,
                          timeout=120, env=environment)  # fmt: skip


def test_ps_prints_the_loaded_model_and_needs_the_servers_key(checkpoint):
    with running_server(checkpoint("dense_tied"), "--model-name", "tiny", "--api-key", KEY) as url:
        refused = ps("--url", url)
        assert refused.returncode == 1 and refused.stdout == ""
        assert refused.stderr.strip().splitlines() == [
            f"qwen-mlx: error: the server at {url} wants its API key: pass --api-key or set QWEN_MLX_API_KEY"
        ]
        for result in (ps("--url", f"{url}/v1", "--api-key", KEY), ps("--url", url, env={"QWEN_MLX_API_KEY": KEY})):
            assert result.returncode == 0, result.stderr
            header, row = result.stdout.strip().splitlines()
            assert header.split() == ["NAME", "MEMORY", "CONTEXT", "IDLE"]
            name, size, unit, context, *idle = row.split()
            assert name == "tiny" and unit == "MiB" and float(size) > 30 and context == "64"
            assert idle[-1] == "s" and float(idle[0]) >= 0
        served = httpx.get(f"{url}/api/ps", headers={"x-api-key": KEY}).json()["models"]
        assert [m["id"] for m in served] == ["tiny"] and served[0]["in_flight"] == 0


def test_ps_without_a_server_is_one_line_and_exit_1():
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    result = ps("--url", f"http://127.0.0.1:{port}")
    assert result.returncode == 1 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"qwen-mlx: error: no server answers at http://127.0.0.1:{port} (")
    assert line.endswith("start one with qwen-mlx serve, or give its address with --url")
