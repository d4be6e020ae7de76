"""Starting a distributed run: check it, start every rank through `mlx.launch`, relay what the ranks say.

The launching `qwen-mlx` is not a rank itself: it checks the split once (so a mistake is one line, not one
per rank), runs `mlx.launch`, and gives back rank 0's exit status. `chat --distributed` runs the ranks as a
private loopback endpoint for the chat app.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .. import checkpoint, loader
from ..config import ModelArgs
from ..errors import QwenMLXError
from ..files import read_json
from .plan import MODES, check_tensor_parallel, quantization_group, split_layers

RANKS_GRACE_S = 5.0  # how long the other ranks get to end once rank 0 has


def read_hostfile(path: str) -> dict:
    """An `mlx.launch` hostfile, checked: a list of hosts (or {"hosts": [...]}) with ssh names and IPs."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise QwenMLXError(f"no hostfile at {file}")
    data = read_json(file)
    hosts = data.get("hosts") if isinstance(data, dict) else data
    if not isinstance(hosts, list) or not all(isinstance(h, dict) and isinstance(h.get("ssh"), str) for h in hosts):
        raise QwenMLXError(f'{file} must list hosts as [{{"ssh": "name", "ips": ["10.0.0.2"]}}, ...]')
    if len(hosts) < 2:
        raise QwenMLXError(f"{file} lists {len(hosts)} host; several Macs means two or more")
    backend = data.get("backend", "ring") if isinstance(data, dict) else "ring"
    if backend == "ring" and not all(h.get("ips") for h in hosts):
        missing = next(h["ssh"] for h in hosts if not h.get("ips"))
        raise QwenMLXError(f'{file}: host {missing} has no "ips"; the ring backend connects to IP addresses')
    return {"hosts": hosts, "backend": backend or "ring"}


def rank_count(hostfile: str | None, ranks: int | None) -> int:
    """How many ranks a run will have: one per host in the hostfile, else --ranks on this Mac."""
    if hostfile:
        return len(read_hostfile(hostfile)["hosts"])
    if ranks is None or ranks < 2:
        raise QwenMLXError("--distributed needs --hostfile hosts.json (several Macs) or --ranks N (N >= 2, this Mac)")
    return ranks


def _config_here(model: str, revision: str | None, required: bool) -> dict | None:
    """The model's config.json. When the ranks run here (`required`), the model is found (a Hub repo
    downloaded once, not once per rank) or the error said; on several Macs, where the folder need only
    exist on the hosts that run the ranks, only what this host already has is read, or None."""
    if Path(model).expanduser().is_dir() or model in loader.DEMO_NAMES or required:
        return checkpoint.read_config(loader.resolve_model_path(model, revision))
    if not loader.is_hub_repo(model):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, "config.json", revision=revision)
    except Exception:  # an odd cache or repo id: the ranks will say what is wrong
        return None
    return read_json(Path(found), obj=True) if isinstance(found, str) else None


def preflight(model: str, mode: str, *, hostfile: str | None, ranks: int | None, layers: str | None = None,
              quantize: int | None = None, revision: str | None = None) -> None:  # fmt: skip
    """Check before launching what every rank would otherwise find out (and say) N times: the hosts, the
    mode, and whether the model splits that many ways. `demo` is built here once, not once per rank."""
    if mode not in MODES:
        raise QwenMLXError(f"--distributed {mode!r} is not a mode: use tp (tensor parallel) or pp (pipeline)")
    n = rank_count(hostfile, ranks)
    if layers and mode != "pp":
        raise QwenMLXError("--layers sets the pipeline's stages: it goes with --distributed pp")
    config = _config_here(model, revision, required=not hostfile)
    if config is None:
        return
    args = ModelArgs.from_dict(config, source=f"{model}/config.json")
    checkpoint.refuse_requantizing(config, quantize, model)
    if mode == "tp":
        check_tensor_parallel(args, n, quantization_group(config, quantize))
    else:
        split_layers(args.num_hidden_layers, n, layers, [1.0] * n)


def launch_command(argv: list[str], *, hostfile: str | None, ranks: int | None, status_file: str) -> list[str]:
    """The `mlx.launch` command that starts this same `qwen-mlx` command on every rank."""
    launcher = shutil.which("mlx.launch") or str(Path(sys.executable).with_name("mlx.launch"))
    if hostfile:
        backend = read_hostfile(hostfile)["backend"]
        where = ["--hostfile", str(Path(hostfile).expanduser())]
    else:
        backend = "ring"
        where = ["--hosts", "127.0.0.1", "-n", str(rank_count(None, ranks))]
    joins = "jaccl" if backend.startswith("jaccl") else backend  # mlx.launch's jaccl-ring is jaccl inside
    env = [f"QWEN_MLX_STATUS_FILE={status_file}", f"QWEN_MLX_BACKEND={joins}"]
    for name in ("QWEN_MLX_PEER_TIMEOUT", "QWEN_MLX_CACHE", "HF_HUB_OFFLINE", "HF_HOME"):
        if name in os.environ:
            env.append(f"{name}={os.environ[name]}")
    return [
        launcher, "--backend", backend, *where, "--cwd", os.getcwd(),
        *(arg for e in env for arg in ("--env", e)),
        "--", sys.executable, "-m", "qwen_mlx", *argv,
    ]  # fmt: skip


def start_ranks(command: list[str], **popen: Any):
    """Start `mlx.launch` in a session of its own, so that stopping it reaches every local rank."""
    import subprocess

    try:
        return subprocess.Popen(command, start_new_session=True, **popen)
    except FileNotFoundError:
        raise QwenMLXError(f"{command[0]} was not found; it comes with MLX (pip install mlx)") from None


def stop_ranks(process) -> None:
    """End `mlx.launch` and every local process it started: SIGTERM, then SIGKILL for what is left after
    5 s (a rank that is stopped or stuck ignores SIGTERM, and `mlx.launch` would wait on it forever)."""
    import subprocess

    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)


ANSI = re.compile(r"\x1b\[[0-9;]*m")
# The launcher prints its note in pieces, which another thread's output can split under load: the note is
# known by its words alone, and a "[WARN]" left on a line of its own is dropped with it.
NODE_EXIT = re.compile(r"(?:\[WARN\])?\s*Node with rank (\d+) (?:exited with code (-?\d+)|was killed)")
WARN_ALONE = re.compile(r"^\s*\[WARN\]\s*$")
PEER_ENDED = "stopped: another rank of the distributed run ended"
RANK_LINE = re.compile(r"^qwen-mlx: (?:error \(rank (\d+)\)|error|rank (\d+)): (.*)$")


class Relay:
    """The ranks' stderr as `mlx.launch` passes it on, made readable. A failure that every rank finds is
    said once: rank 0's lines show as they come, the other ranks' error lines are held to the end of the
    run and shown only when rank 0 did not say the same (a follower's failure ends the run, so it is not
    held long). The launcher's coloured exit notes are dropped, except for a rank that died of a signal
    other than the SIGTERM that ends a run."""

    def __init__(self) -> None:
        self.leader_said: set[str] = set()
        self.held: dict[str, str] = {}  # a follower's message -> its first line
        self.leader_exit: int | None = None  # rank 0's exit code, when `mlx.launch` reported a failure
        self.leader_stopped: str | None = None  # rank 0 ended because another rank did

    def clean(self, line: str) -> str | None:
        plain = ANSI.sub("", line).rstrip("\n")
        if (line.strip() and not plain.strip()) or WARN_ALONE.match(plain):  # a piece of a launcher note
            return None
        if found := NODE_EXIT.search(plain):
            code = int(found[2]) if found[2] else -signal.SIGTERM  # "was killed": mlx.launch stopped it
            if found[1] == "0":
                self.leader_exit = code
            if code >= 0 or code == -signal.SIGTERM:
                return None
            try:
                how = signal.Signals(-code).name
            except ValueError:
                how = f"signal {-code}"
            return f"qwen-mlx: rank {found[1]} was ended by {how}\n"
        if found := RANK_LINE.match(plain):
            rank, message = found[1] or found[2] or "0", found[3]
            line = line if line.endswith("\n") else line + "\n"
            if rank != "0":
                self.held.setdefault(message, line)
                return None
            if message.startswith(PEER_ENDED):  # an effect: said only if no rank gives the cause
                self.leader_stopped = self.leader_stopped or line
                return None
            self.leader_said.add(message)
        return line

    def rest(self) -> list[str]:
        """The followers' own failures at the end of the run, or rank 0's "another rank ended" if none."""
        held = [(message, line) for message, line in self.held.items() if message not in self.leader_said]
        causes = [line for message, line in held if not message.startswith(PEER_ENDED)]
        if causes or self.leader_said:  # someone said why: "another rank ended" is only its echo
            return causes
        effects = [self.leader_stopped] if self.leader_stopped else [line for _, line in held]
        return effects[:1]

    def lines(self, lines) -> list[str]:
        kept = [kept for line in lines if (kept := self.clean(line)) is not None]
        return kept + self.rest()


def _relay(relay: Relay, stream, out) -> None:
    for line in stream:
        if (kept := relay.clean(line)) is not None:
            out.write(kept)
            out.flush()
    out.writelines(relay.rest())
    out.flush()


def launch(argv: list[str], *, hostfile: str | None, ranks: int | None) -> int:
    """Run `qwen-mlx <argv>` on every rank through `mlx.launch` and return rank 0's exit status."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="qwen-mlx-") as scratch:
        status_file = os.path.join(scratch, "status")
        command = launch_command(argv, hostfile=hostfile, ranks=ranks, status_file=status_file)
        process = start_ranks(command, stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1)
        relay = Relay()
        relaying = threading.Thread(target=_relay, args=(relay, process.stderr, sys.stderr), daemon=True)
        relaying.start()
        previous = signal.signal(signal.SIGTERM, lambda *_: stop_ranks(process))
        try:
            finished_at = None
            while process.poll() is None:
                # Once rank 0 is done, a rank that does not end (a silent host) is not waited for long.
                if finished_at is None and (os.path.exists(status_file) or relay.leader_exit is not None):
                    finished_at = time.monotonic()
                if finished_at is not None and time.monotonic() - finished_at > RANKS_GRACE_S:
                    stop_ranks(process)
                time.sleep(0.2)
        except KeyboardInterrupt:
            stop_ranks(process)
            return 130
        finally:
            signal.signal(signal.SIGTERM, previous)
            stop_ranks(process)  # a rank mlx.launch left behind
            relaying.join(timeout=2)  # the last lines
        return leader_status(status_file, relay.leader_exit, process.returncode)


def leader_status(status_file: str, leader_exit: int | None, launcher_exit: int | None) -> int:
    """Rank 0's exit status: from the file it leaves when it runs on this Mac; else (rank 0 on another
    Mac) from `mlx.launch`, which reports a rank's failure and says nothing of a rank that ended well."""
    with contextlib.suppress(OSError, ValueError):
        return int(Path(status_file).read_text())
    if leader_exit is not None:
        return leader_exit if leader_exit > 0 else 1
    if launcher_exit == 0:
        return 0
    print("qwen-mlx: error: the distributed run ended before rank 0 finished (see above)", file=sys.stderr)
    return 1


@contextlib.contextmanager
def serve_in_background(args):
    """`qwen-mlx chat --distributed`: the ranks serve the model on a private loopback port, and the chat
    app (which needs this terminal, which `mlx.launch` does not give its ranks) talks to rank 0 there."""
    import secrets
    import socket
    import subprocess
    import tempfile
    import urllib.request

    if not args.model:
        raise QwenMLXError("--distributed needs --model (the model to split across the Macs)")
    preflight(args.model, args.distributed, hostfile=args.hostfile, ranks=args.ranks, layers=args.layers,
              quantize=args.quantize, revision=getattr(args, "revision", None))  # fmt: skip
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    api_key = secrets.token_urlsafe(24)
    # `--api-key=KEY` in one word: a url-safe key may begin with "-", which argparse takes for an option.
    argv = ["serve", "--model", args.model, "--port", str(port), f"--api-key={api_key}",
            "--distributed", args.distributed]  # fmt: skip
    for flag, value in (
        ("--quantize", args.quantize),
        ("--layers", args.layers),
        ("--peer-timeout", args.peer_timeout),
    ):
        if value is not None:
            argv += [flag, str(value)]
    with tempfile.TemporaryDirectory(prefix="qwen-mlx-") as scratch:
        status_file = os.path.join(scratch, "status")
        log_file = os.path.join(scratch, "ranks.log")
        command = launch_command(argv, hostfile=args.hostfile, ranks=args.ranks, status_file=status_file)
        with open(log_file, "wb") as log:
            print(f"qwen-mlx: starting the ranks ({args.distributed}); their log: {log_file}", file=sys.stderr)
            ranks = start_ranks(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        endpoint = f"http://127.0.0.1:{port}/v1"
        try:
            while True:  # until rank 0 answers, or the ranks give up
                if ranks.poll() is not None:
                    log_lines = Path(log_file).read_text(errors="replace").strip().splitlines(keepends=True)
                    tail = [line.rstrip("\n") for line in Relay().lines(log_lines)][-5:]
                    raise QwenMLXError("the distributed run ended while loading:\n" + "\n".join(tail))
                request = urllib.request.Request(f"{endpoint}/models", headers={"Authorization": f"Bearer {api_key}"})
                try:
                    with urllib.request.urlopen(request, timeout=2):
                        break
                except OSError:
                    time.sleep(0.5)
            yield endpoint, api_key
        finally:
            stop_ranks(ranks)
