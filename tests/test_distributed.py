"""Several Macs as one, tested as 2 and 4 ranks on loopback with `mlx.launch --backend ring`.

Each distributed run is checked against one process on the same fixture (dense and MoE, float and 4-bit):
the same greedy tokens (forced tokens and an early stop included), the same sampled tokens on every
rank, and about 1/N of the weights resident on each. Then the one-command front ends (`generate`,
`serve` with the openai SDK), bad input, and ranks that die or go silent.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import running_server

from qwen_mlx.config import ModelArgs
from qwen_mlx.distributed.launch import launch_command, read_hostfile
from qwen_mlx.distributed.plan import check_tensor_parallel, split_layers
from qwen_mlx.errors import QwenMLXError

PROBE = Path(__file__).with_name("distributed_probe.py")
LAUNCH = str(Path(sys.executable).with_name("mlx.launch"))
# Replicated per rank: the norms (and the MoE router); everything else is split N ways.
MEMORY_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def models(checkpoint, tmp_path_factory) -> dict[str, Path]:
    """dense/moe x float/4bit; the 4-bit ones written by our converter (the dense one in several shards)."""
    from qwen_mlx.convert import convert

    out = tmp_path_factory.mktemp("distributed")
    found = {"dense-float": checkpoint("dist_dense"), "moe-float": checkpoint("dist_moe")}
    for kind in ("dense", "moe"):
        folder = out / f"{kind}-4bit"
        convert(found[f"{kind}-float"], folder, bits=4, evaluate=False, progress=False,
                max_shard_bytes=10 << 20, log=lambda _: None)  # fmt: skip
        found[f"{kind}-4bit"] = folder
    return found


def probe(model: Path | str, mode: str, ranks: int = 1, *options: str, env: dict | None = None) -> dict[int, dict]:
    """Run the probe on `ranks` ranks (or one plain process for mode "single"); {rank: record}."""
    command = [sys.executable, str(PROBE), str(model), mode, *options]
    if mode != "single":
        command = [LAUNCH, "--backend", "ring", "--hosts", "127.0.0.1", "-n", str(ranks), "--", *command]
    environ = os.environ | (env or {})
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environ)
    records = {}
    for line in done.stdout.splitlines():
        if line.startswith("PROBE "):
            record = json.loads(line[6:])
            records[record["rank"]] = record
    assert len(records) == max(ranks, 1), f"not every rank reported:\n{done.stdout}\n{done.stderr}"
    return records


_single: dict[str, dict] = {}


def single(model: Path) -> dict:
    if str(model) not in _single:
        _single[str(model)] = probe(model, "single")[0]
    return _single[str(model)]


RUNS = [
    ("dense-float", "tp", 2),
    ("dense-float", "pp", 2),
    ("dense-4bit", "tp", 2),
    ("dense-4bit", "pp", 2),
    ("moe-float", "tp", 2),
    ("moe-float", "pp", 2),
    ("moe-4bit", "tp", 2),
    ("moe-4bit", "pp", 2),
    ("dense-float", "tp", 4),
    ("moe-4bit", "pp", 4),
]


@pytest.mark.parametrize(("kind", "mode", "ranks"), RUNS, ids=[f"{k}-{m}-{n}" for k, m, n in RUNS])
def test_ranks_match_one_process(models, kind: str, mode: str, ranks: int):
    reference = single(models[kind])
    records = probe(models[kind], mode, ranks)
    greedy, stopped_early, sampled = reference["tokens"]
    assert len(greedy) == 10 and len(stopped_early) == 4

    for rank, record in records.items():
        # Greedy: exactly one process's tokens, forced tokens and the consumer's early stop included.
        assert record["tokens"][:2] == [greedy, stopped_early], f"rank {rank} differs from one process"
        # Sampled from an RNG seeded differently per rank: every rank still feeds rank 0's draw.
        assert record["tokens"][2] == records[0]["tokens"][2], f"rank {rank} sampled its own tokens"
        # About 1/N of the weights on each rank: counted, and resident as MLX measures it.
        share = reference["weights"] / ranks
        assert abs(record["weights"] - share) <= MEMORY_TOLERANCE * share, (rank, record["weights"], share)
        assert record["active"] <= (1 + MEMORY_TOLERANCE) * share, (rank, record["active"], share)
        # ... and no more while loading: each rank reads its slices of the tensors, never a whole one.
        assert record["peak"] <= (1 + MEMORY_TOLERANCE) * share, (rank, record["peak"], share)
    assert records[0]["tokens"][2] != greedy[:8], "temperature 1 should not reproduce the greedy tokens"


def test_pipeline_layers_by_hand(models):
    """--layers 3,1: rank 0 runs three of the four layers (and holds more), the output is unchanged."""
    reference = single(models["dense-float"])
    records = probe(models["dense-float"], "pp", 2, "--layers", "3,1")
    assert records[0]["tokens"][:2] == reference["tokens"][:2]
    assert records[0]["weights"] > records[1]["weights"]


def test_pipeline_stages_download_only_their_shards(checkpoint, tmp_path):
    """A Hub repo on several Macs: each stage fetches the config and index, then only the shards holding its
    layers (and the embedding and head, which every rank splits by vocabulary), never the whole model."""
    from hub_stand_in import serving

    from qwen_mlx.convert import convert

    repo = tmp_path / "repo"  # one shard per layer, so that the stages' shards differ
    convert(checkpoint("dist_dense"), repo, bits=4, evaluate=False, progress=False, max_shard_bytes=64 << 10,
            log=lambda _: None)  # fmt: skip
    weight_map = json.loads((repo / "model.safetensors.index.json").read_text())["weight_map"]
    shards_of = {
        stage: {f for name, f in weight_map.items() if not name.startswith("model.layers.") or
                int(name.split(".")[2]) in layers}
        for stage, layers in ((0, {0, 1}), (1, {2, 3}))
    }  # fmt: skip
    assert shards_of[0] != shards_of[1]
    with serving(repo, "qwen-mlx-tests/dist-dense") as (endpoint, fetched):
        records = probe("qwen-mlx-tests/dist-dense", "pp", 2, "--hub-cache", str(tmp_path / "hub"),
                        env={"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0"})  # fmt: skip
    for rank in (0, 1):
        (snapshot,) = (tmp_path / "hub" / f"rank{rank}").glob("models--*/snapshots/*")
        assert {f.name for f in snapshot.glob("*.safetensors")} == shards_of[rank]
        assert (snapshot / "config.json").is_file() and (snapshot / "tokenizer.json").is_file()
    # Each shard went over the wire once per stage that needs it, and no more.
    assert sorted(name for name in fetched if name.endswith(".safetensors")) == sorted([*shards_of[0], *shards_of[1]])
    assert records[0]["tokens"][:2] == single(repo)["tokens"][:2]


# -- planning and bad input (no ranks needed) ---------------------------------------------------------------


def args_of(path: Path) -> ModelArgs:
    return ModelArgs.from_dict(json.loads((path / "config.json").read_text()))


def test_tensor_parallel_refuses_an_uneven_split(checkpoint):
    args = args_of(checkpoint("dist_dense"))  # 8 query heads, 4 key-value heads
    check_tensor_parallel(args, 2)
    check_tensor_parallel(args, 4)
    with pytest.raises(QwenMLXError, match=r"key-value heads \(4\) to divide by 3: use 2 or 4 ranks.*pp"):
        check_tensor_parallel(args, 3)
    moe = args_of(checkpoint("dist_moe"))  # 8 experts, 4 key-value heads
    with pytest.raises(QwenMLXError, match="divide by 8"):
        check_tensor_parallel(moe, 8)
    with pytest.raises(QwenMLXError, match="quantization group"):
        check_tensor_parallel(args, 4, group_size=128)  # the MLP (512) in pieces of 128 is fine; 256/4 is not


def test_pipeline_split():
    assert split_layers(4, 2) == (2, 2)
    assert split_layers(5, 2) == (3, 2)
    assert split_layers(10, 2, weights=[64.0, 16.0]) == (8, 2)  # a 64 GB Mac and a 16 GB one
    assert split_layers(4, 2, "3,1") == (3, 1)
    for bad in ("3,2", "4,0", "a,b", "1,1,2"):
        with pytest.raises(QwenMLXError, match="--layers"):
            split_layers(4, 2, bad)
    with pytest.raises(QwenMLXError, match="too few"):
        split_layers(2, 4)


def test_hostfile_checks(tmp_path):
    hosts = tmp_path / "hosts.json"
    with pytest.raises(QwenMLXError, match="no hostfile"):
        read_hostfile(str(hosts))
    hosts.write_text("{not json")
    with pytest.raises(QwenMLXError, match="not valid JSON"):
        read_hostfile(str(hosts))
    hosts.write_text(json.dumps([{"ssh": "mac1", "ips": ["10.0.0.1"]}]))
    with pytest.raises(QwenMLXError, match="two or more"):
        read_hostfile(str(hosts))
    hosts.write_text(json.dumps([{"ssh": "mac1", "ips": ["10.0.0.1"]}, {"ssh": "mac2"}]))
    with pytest.raises(QwenMLXError, match='mac2 has no "ips"'):
        read_hostfile(str(hosts))
    hosts.write_text(json.dumps([{"ssh": "mac1", "ips": ["10.0.0.1"]}, {"ssh": "mac2", "ips": ["10.0.0.2"]}]))
    command = launch_command(["generate", "--model", "m"], hostfile=str(hosts), ranks=None, status_file="/s")
    assert command[command.index("--hostfile") + 1] == str(hosts)
    assert command[command.index("--") + 1 :] == [sys.executable, "-m", "qwen_mlx", "generate", "--model", "m"]


def qwen_mlx(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwen_mlx", *args], capture_output=True, text=True, timeout=timeout)


def one_error(done: subprocess.CompletedProcess) -> str:
    """The single line a failed command printed (not one per rank, no launcher notes, no traceback)."""
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_cli_bad_input_is_one_line(checkpoint):
    model = str(checkpoint("dist_dense"))  # 4 layers, 4 key-value heads
    ask = ["generate", "--model", model, "--prompt", "hi", "--distributed"]
    assert "--hostfile" in one_error(qwen_mlx(*ask, "tp"))
    # What the launching process can see is checked before any rank starts.
    line = one_error(qwen_mlx(*ask, "tp", "--ranks", "3"))
    assert "tensor parallelism over 3 ranks needs the model's key-value heads (4) to divide by 3" in line
    assert "too few for 5 pipeline stages" in one_error(qwen_mlx(*ask, "pp", "--ranks", "5"))
    assert "add up to the model's 4 layers" in one_error(qwen_mlx(*ask, "pp", "--ranks", "2", "--layers", "3,2"))
    assert "goes with --distributed pp" in one_error(qwen_mlx(*ask, "tp", "--ranks", "2", "--layers", "2,2"))
    assert "no model folder at" in one_error(qwen_mlx(*ask[:2], "/nope/model", *ask[3:], "pp", "--ranks", "2"))
    assert "--hostfile goes with --distributed" in one_error(qwen_mlx(*ask[:-1], "--hostfile", "hosts.json"))


def test_what_every_rank_finds_is_said_once(tmp_path):
    """On several Macs the model need only be on the hosts that run it, so the ranks find a missing
    one themselves (here two loopback "hosts"): the launcher says it once."""
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 2))
    done = qwen_mlx("generate", "--model", str(tmp_path / "absent"), "--prompt", "hi",
                    "--distributed", "pp", "--hostfile", str(hosts))  # fmt: skip
    # Whichever rank looked first says it (rank 0 may stop because its peer already failed).
    assert re.match(r"qwen-mlx: error( \(rank 1\))?: no model folder at ", one_error(done)), done.stderr


def test_relay_of_the_ranks_stderr():
    """A unit test of the line filter alone, on lines as `mlx.launch` relays them (no ranks run)."""
    from qwen_mlx.distributed.launch import Relay

    lines = [
        "qwen-mlx: error (rank 2): the model has 2 layers, too few for 4 pipeline stages; use fewer ranks\n",
        "qwen-mlx: error: the model has 2 layers, too few for 4 pipeline stages; use fewer ranks\n",
        "qwen-mlx: error (rank 1): the model has 2 layers, too few for 4 pipeline stages; use fewer ranks\n",
        "qwen-mlx: error (rank 3): no model folder at /m\n",
        "qwen-mlx: rank 2: stopped: another rank of the distributed run ended\n",
        "\x1b[33m[WARN] Node with rank 1 exited with code 1 \x1b[0m\n",
        "\x1b[33m[WARN] Node with rank 0 exited with code -15 \x1b[0m\n",
        "\x1b[33m[WARN] Node with rank 2 exited with code -9 \x1b[0m\n",
        "\x1b[33m[WARN] Node with rank 3 was killed \x1b[0m\n",
        "\x1b[0m\n",  # a colour reset that arrived on a line of its own
        "\x1b[33m[WARN]\n",  # a note split by another thread's output under load (seen in a test run)
        " Node with rank 1 exited with code 1 \x1b[0m\n",
        "INFO:     Uvicorn running\n",
    ]
    relay = Relay()
    assert relay.lines(lines) == [
        "qwen-mlx: error: the model has 2 layers, too few for 4 pipeline stages; use fewer ranks\n",
        "qwen-mlx: rank 2 was ended by SIGKILL\n",
        "INFO:     Uvicorn running\n",
        "qwen-mlx: error (rank 3): no model folder at /m\n",  # a cause: rank 2's "stopped" is its effect
    ]
    assert relay.leader_exit == -15
    # Rank 0 stopped because a follower failed first: the follower's reason is the one line.
    stopped = "qwen-mlx: rank 0: stopped: another rank of the distributed run ended, or the run was interrupted\n"
    cause = "qwen-mlx: error (rank 1): no model folder at /m\n"
    assert Relay().lines([stopped, cause]) == [cause]
    assert Relay().lines([stopped]) == [stopped]  # nobody said why: rank 0's line is all there is
    # Rank 0 found it first and its follower stopped because of that: rank 0's line alone.
    said = "qwen-mlx: error: no model folder at /m\n"
    echo = "qwen-mlx: rank 1: stopped: another rank of the distributed run ended, or the run was interrupted\n"
    assert Relay().lines([said, echo]) == [said]


def test_rank_0s_status_on_this_mac_or_another(tmp_path, capsys):
    """Rank 0 on this Mac leaves a file; on another, `mlx.launch` reports only its failures."""
    from qwen_mlx.distributed.launch import leader_status

    status_file = tmp_path / "status"
    assert leader_status(str(status_file), None, 0) == 0  # rank 0 elsewhere ended well
    assert leader_status(str(status_file), 1, 0) == 1
    assert leader_status(str(status_file), -9, 0) == 1
    assert capsys.readouterr().err == ""
    assert leader_status(str(status_file), None, -15) == 1  # the launcher itself was stopped
    assert "ended before rank 0 finished" in capsys.readouterr().err
    status_file.write_text("0")
    assert leader_status(str(status_file), -15, -15) == 0  # rank 0 here finished before the others were stopped


# -- the one command --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["tp", "pp"])
def test_generate_command_matches_one_process(demo_model_path, mode):
    prompt = ["--model", str(demo_model_path), "--prompt", "What is 2 + 3?", "--temperature", "0"]
    alone = qwen_mlx("generate", *prompt)
    together = qwen_mlx("generate", *prompt, "--distributed", mode, "--ranks", "2")
    assert alone.returncode == 0 and together.returncode == 0, together.stderr
    assert together.stdout == alone.stdout
    assert "5" in together.stdout


def guided_requests(client) -> list[tuple]:
    """Requests whose logits processors read the token history: a JSON schema, a forced tool call, penalties."""
    ask = {"model": "demo", "messages": [{"role": "user", "content": "What is 2 + 3?"}], "temperature": 0}
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    add = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    replies = [
        client.chat.completions.create(
            **ask,
            max_tokens=48,
            response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
        ),  # fmt: skip
        client.chat.completions.create(
            **ask,
            max_tokens=24,
            tools=[{"type": "function", "function": {"name": "add", "parameters": add}}],
            tool_choice="required",
            extra_body={"chat_template_kwargs": {"enable_thinking": False}},
        ),  # fmt: skip
        client.chat.completions.create(**ask, max_tokens=40, frequency_penalty=1.5, presence_penalty=0.5),
    ]
    return [(r.choices[0].message.content, r.choices[0].finish_reason) for r in replies]


def test_serve_command_with_the_openai_sdk(demo_model_path):
    from openai import OpenAI

    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    with running_server(demo_model_path, "--model-name", "demo", "--distributed", "pp", "--ranks", "2") as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="none")
        first = client.chat.completions.create(model="demo", messages=messages, temperature=0, max_tokens=64)
        # Streaming, and a conversation that continues on the same cache.
        chunks = client.chat.completions.create(
            model="demo", messages=messages, temperature=0, max_tokens=64, stream=True
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        again = client.chat.completions.create(
            model="demo",
            messages=[*messages, {"role": "assistant", "content": first.choices[0].message.content},
                      {"role": "user", "content": "And 2 + 2?"}],
            temperature=0,
            max_tokens=64,
        )  # fmt: skip
        guided = guided_requests(client)
    with running_server(demo_model_path, "--model-name", "demo") as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="none")
        alone = client.chat.completions.create(model="demo", messages=messages, temperature=0, max_tokens=64)
        guided_alone = guided_requests(client)
    assert first.choices[0].message.content == alone.choices[0].message.content
    assert guided == guided_alone  # the guide and the penalties see the same tokens as in one process
    assert re.match(r'\{\s?"answer"\s?:', guided[0][0]) and guided[1][0].startswith("<tool_call>")
    assert "5" in first.choices[0].message.content
    assert streamed == first.choices[0].message.content
    assert again.choices[0].message.content and again.usage.prompt_tokens_details.cached_tokens > 0


# -- ranks that die or go silent --------------------------------------------------------------------------------


def rank_pids(root: int) -> dict[int, int]:
    """{rank: pid} of the processes under `root` that `mlx.launch` started as ranks."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
    found, todo = {}, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        with contextlib.suppress(OSError):
            cmdline = (Path(f"/proc/{pid}/cmdline")).read_bytes().split(b"\0")
            environ = (Path(f"/proc/{pid}/environ")).read_bytes().split(b"\0")
            rank = next((e[9:] for e in environ if e.startswith(b"MLX_RANK=")), None)
            if rank is not None and b"qwen_mlx" in cmdline:
                found[int(rank)] = pid
    return found


@contextlib.contextmanager
def distributed_server(model: Path, *options: str):
    """`qwen-mlx serve --distributed tp --ranks 2`; yields (process, url, stderr lines)."""
    command = [sys.executable, "-m", "qwen_mlx", "serve", "--model", str(model), "--port", "0",
               "--model-name", "demo", "--distributed", "tp", "--ranks", "2", *options]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    ready = threading.Event()
    url: list[str] = []

    def drain():
        for line in process.stderr:
            lines.append(line)
            if "serving" in line and "http://" in line:
                url.append(line.split(" at ")[1].strip().removesuffix("/v1"))
                ready.set()

    threading.Thread(target=drain, daemon=True).start()
    ranks: dict[int, int] = {}
    try:
        assert ready.wait(180), "".join(lines)
        ranks.update(rank_pids(process.pid))
        yield process, url[0], lines
    finally:
        for pid in ranks.values():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        process.kill()
        process.wait()


def wait_exit(process, within: float) -> float:
    start = time.monotonic()
    process.wait(timeout=within)
    return time.monotonic() - start


def test_a_killed_rank_ends_the_run_with_a_message(demo_model_path):
    with distributed_server(demo_model_path) as (process, url, lines):
        ranks = rank_pids(process.pid)
        assert sorted(ranks) == [0, 1]
        os.kill(ranks[1], signal.SIGKILL)
        assert wait_exit(process, within=60) < 60
        time.sleep(0.5)  # the last lines
        text = "".join(lines)
    assert process.returncode == 1
    assert "qwen-mlx: rank 0: stopped: another rank of the distributed run ended" in text, text
    assert "qwen-mlx: rank 1 was ended by SIGKILL" in text, text


def test_a_silent_rank_ends_the_run_after_the_peer_timeout(demo_model_path):
    import httpx

    with distributed_server(demo_model_path, "--peer-timeout", "3") as (process, url, lines):
        ranks = rank_pids(process.pid)
        os.kill(ranks[1], signal.SIGSTOP)  # a host that vanished without closing its connections
        body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        try:
            wait_exit(process, within=60)
        except subprocess.TimeoutExpired:
            raise AssertionError("".join(lines)) from None
        time.sleep(0.5)
        text = "".join(lines)
    assert process.returncode == 1
    assert "qwen-mlx: rank 0: no answer from the other ranks for 3 s" in text, text


def test_chat_starts_the_ranks_as_a_private_endpoint(demo_model_path):
    """`qwen-mlx chat --distributed`: the app needs the terminal, so the ranks serve on a keyed loopback port."""
    import argparse

    import httpx
    from openai import OpenAI

    from qwen_mlx.distributed import serve_in_background

    args = argparse.Namespace(model=str(demo_model_path), distributed="pp", hostfile=None, ranks=2,
                              quantize=None, layers=None, peer_timeout=None)  # fmt: skip
    with serve_in_background(args) as (endpoint, api_key):
        assert endpoint.startswith("http://127.0.0.1:")
        assert httpx.get(f"{endpoint}/models").status_code == 401  # the key is the app's alone
        client = OpenAI(base_url=endpoint, api_key=api_key)
        (model,) = client.models.list().data
        reply = client.chat.completions.create(
            model=model.id, messages=[{"role": "user", "content": "What is 2 + 3?"}], temperature=0, max_tokens=64
        )
        assert "5" in reply.choices[0].message.content
    with pytest.raises(httpx.HTTPError):  # the ranks are gone with the app
        httpx.get(f"{endpoint}/models", timeout=5)
