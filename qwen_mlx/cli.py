"""The `qwen-mlx` command: one entry point, one subcommand per job.

Errors a user can cause (`QwenMLXError`) print as one line on stderr with exit status 1; argparse's own
usage errors print as one line too (`errors.OneLineParser`, with a pointer to `--help`) and exit with
status 2. Nothing else is caught, so a real bug still shows its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import OneLineParser, QwenMLXError

GIB = 1 << 30


def info(args: argparse.Namespace) -> int:
    """Describe a model without reading its weights: architecture, size, quantization."""
    from .loader import load_model
    from .memory import model_nbytes
    from .quant import bits_per_weight, parameter_count

    loaded = load_model(args.model, revision=args.revision, lazy=True)
    model = loaded.model
    a = model.args
    summary = {
        "path": str(loaded.path),
        "model_type": a.model_type,
        "layers": a.num_hidden_layers,
        "hidden_size": a.hidden_size,
        "attention_heads": f"{a.num_attention_heads} query / {a.num_key_value_heads} key-value, head_dim {a.head_dim}",
        "vocab_size": a.vocab_size,
        "tied_embeddings": a.tie_word_embeddings,
        "rope": f"{a.rope_type}, theta {a.rope_theta:g}",
        "parameters": parameter_count(model),
        "bits_per_weight": round(bits_per_weight(model), 3),
        "weights_gib": round(model_nbytes(model) / GIB, 3),
        "quantization": loaded.config.get("quantization"),
    }
    if a.num_experts:
        summary["experts"] = f"{a.num_experts_per_tok} of {a.num_experts}, expert width {a.moe_intermediate_size}"
    if args.context is not None:
        summary["memory"] = memory_estimate(loaded.path, args.context, args.kv_bits)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    width = max(map(len, summary))
    for key, value in summary.items():
        if key == "quantization":
            value = _describe_quantization(value)
        elif key == "parameters":
            value = f"{value:,}"
        elif key == "memory":
            value = "; ".join(f"{k.replace('_', ' ')} {v}" for k, v in value.items())
        print(f"{key.replace('_', ' '):<{width}}  {value}")
    return 0


def memory_estimate(path: Path, context: int, kv_bits: int | None) -> dict:
    """`info --context N`: the fit estimate at N tokens and the longest context that fits."""
    from .memory import estimate, largest_context, memory_budget
    from .models import read_model, size_text

    if context < 1:
        raise QwenMLXError("--context must be at least 1 token")
    shape = read_model(path).shape
    budget = memory_budget()
    fit = estimate(shape, context, kv_bits, budget=budget)
    parts = {"context": f"{context:,}", "weights": fit.weights, "kv_cache": fit.kv_cache,
             "activations": fit.activations, "total": fit.total, "budget": budget}  # fmt: skip
    result = {k: size_text(v) if isinstance(v, int) else (v or "unknown") for k, v in parts.items()}
    if budget is not None:
        result["fits"] = "yes" if fit.fits else "no"
        result["largest_context"] = f"{largest_context(shape, budget, kv_bits):,}"
    if context > shape.context_length:
        result["note"] = f"beyond the model's own context ({shape.context_length:,} tokens)"
    return result


def list_models(args: argparse.Namespace) -> int:
    """`qwen-mlx list`: every model this machine can run, and whether it fits."""
    from .models import format_table, list_models

    print(format_table(list_models()))
    return 0


def pull(args: argparse.Namespace) -> int:
    """`qwen-mlx pull NAME`: download (and with --quantize, convert) a model; its folder on the last line."""
    from .models import pull

    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    folder = pull(args.name, args.quantize, evaluate=not args.no_eval, log=log)
    print(folder)
    return 0


def remove(args: argparse.Namespace) -> int:
    """`qwen-mlx rm NAME`: delete a pulled model, after asking (or with --yes)."""
    from .models import remove

    def confirm(question: str) -> bool:
        if args.yes:
            return True
        if not sys.stdin.isatty():
            raise QwenMLXError(f"{question.rstrip('?')}: pass --yes to remove without a terminal to ask on")
        return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")

    print(f"removed {remove(args.name, confirm)}")
    return 0


def _describe_quantization(block: dict | None) -> str:
    if not block:
        return "none (full precision)"
    overrides = sum(isinstance(v, dict) for v in block.values())
    text = f"{block['bits']}-bit affine, group {block['group_size']}"
    return text + (f", {overrides} module(s) with their own bits" if overrides else "")


DIM, RESET = "\033[2m", "\033[0m"


def load_model(args: argparse.Namespace):
    """The model for a command (a `Loaded`): the whole of it, or this rank's part on several Macs."""
    if getattr(args, "distributed", None):
        from .distributed import load_part

        return load_part(
            args.model, args.distributed, layers=args.layers, quantize=args.quantize, revision=args.revision
        )
    from .loader import load_model as load

    return load(args.model, quantize=args.quantize, revision=args.revision)


def generate(args: argparse.Namespace) -> int:
    """Stream one reply: reasoning (dimmed on a terminal), then the answer and tool calls, then stats."""
    from .chat import ChatSession
    from .speculative import drafter
    from .tokenizer import Tokenizer

    turn_options = read_turn_options(args)  # bad files or flags fail before the model loads
    speculation(args)
    loaded = load_model(args)
    link = loaded.link
    if link is not None and not link.leader:
        from .distributed import run_follower

        return run_follower(loaded)
    tokenizer = Tokenizer.load(loaded.path)
    session = ChatSession(
        loaded.model,
        tokenizer,
        kv_bits=args.kv_bits,
        generation_config=loaded.generation_config,
        link=link,
        draft=drafter(speculation(args), loaded.model, tokenizer, kv_bits=args.kv_bits),
        num_draft_tokens=args.num_draft_tokens,
    )
    try:
        return stream_reply(args, session, turn_options)
    finally:
        if link is not None:
            link.close()


def read_turn_options(args: argparse.Namespace) -> dict:
    """`--tools FILE`, `--tool-choice`, `--json` and `--json-schema FILE` as `ChatSession.stream` options."""
    from .files import read_json

    options: dict = {}
    tools = getattr(args, "tools", None)
    if tools:
        options["tools"] = read_json(Path(tools))
        if not isinstance(options["tools"], list) or not all(isinstance(t, dict) for t in options["tools"]):
            raise QwenMLXError(f"{tools} must hold a JSON list of OpenAI tool definitions")
    choice = getattr(args, "tool_choice", None)
    if choice is not None:
        if not tools and choice != "none":
            raise QwenMLXError("--tool-choice needs --tools FILE (the tools to choose from)")
        options["tool_choice"] = choice
    schema = getattr(args, "json_schema", None)
    if schema:
        schema_file = Path(schema)
        if not schema_file.is_file():
            raise QwenMLXError(f"no JSON schema file at {schema_file}")
        body = read_json(schema_file)
        options["response_format"] = {"type": "json_schema", "json_schema": {"name": schema_file.stem, "schema": body}}
    elif getattr(args, "json", False):
        options["response_format"] = {"type": "json_object"}
    if "response_format" in options:  # a bad schema is one line now, not after the model has loaded
        from .constrain import response_format_grammar

        response_format_grammar(options["response_format"])
    return options


def stream_reply(args: argparse.Namespace, session, turn_options: dict | None = None) -> int:
    from .parser import Answer, Reasoning, ToolCall, ToolCallError
    from .sampling import Sampling
    from .turn import Done

    sampling = Sampling(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    prompt = sys.stdin.read().rstrip("\n") if args.prompt == "-" else args.prompt
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": prompt}
    ]
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    out = sys.stdout
    in_reasoning = False
    events = session.stream(
        messages,
        enable_thinking=not args.no_think,
        thinking_budget=args.thinking_budget,
        max_tokens=args.max_tokens,
        sampling=sampling,
        stop=args.stop or (),
        on_prefill=show_prefill if sys.stderr.isatty() else None,
        **(turn_options or {}),
    )
    try:
        for event in events:
            if isinstance(event, Reasoning):
                if not in_reasoning:
                    out.write(DIM if color else "")
                    in_reasoning = True
                out.write(event.text)
            else:
                if in_reasoning:
                    out.write((RESET if color else "") + "\n\n")
                    in_reasoning = False
                if isinstance(event, Answer):
                    out.write(event.text)
                elif isinstance(event, ToolCall):
                    out.write(f"\n[tool call {event.name}] {json.dumps(event.arguments, ensure_ascii=False)}\n")
                elif isinstance(event, ToolCallError):
                    out.write(f"\n[malformed tool call: {event.error}] {event.raw}\n")
                elif isinstance(event, Done):
                    out.write("\n")
                    out.flush()
                    for note in event.stats.notes:
                        print(f"qwen-mlx: note: {note}", file=sys.stderr)
                    print(format_stats(event.stats), file=sys.stderr)
            out.flush()
    finally:
        if in_reasoning and color:  # interrupted mid-thought: don't leave the terminal dimmed
            out.write(RESET + "\n")
            out.flush()
    return 0


def show_prefill(done: int, total: int) -> None:
    """A long prompt's progress on the terminal, erased once the first token arrives."""
    if done < total:
        print(f"\rreading the prompt: {done:,} / {total:,} tokens", end="", file=sys.stderr, flush=True)
    else:
        print("\r\033[K", end="", file=sys.stderr, flush=True)


def format_stats(stats) -> str:
    """One line: tokens, speeds, memory, speculation's work when it ran, and why it stopped."""
    parts = [
        f"prompt {stats.prompt_tokens} tokens ({stats.cached_tokens} cached) at {stats.prompt_tps:.1f} tok/s",
        f"{stats.completion_tokens} generated ({stats.reasoning_tokens} thinking) at {stats.generation_tps:.1f} tok/s",
        f"first token {stats.ttft_s:.2f} s",
        f"peak memory {stats.peak_memory / GIB:.2f} GiB",
        f"finish: {stats.finish_reason}",
    ]
    if stats.draft_tokens:
        parts.insert(
            2,
            f"drafts {stats.accepted_tokens}/{stats.draft_tokens} kept ({stats.acceptance:.0%}), "
            f"{stats.passes_per_token:.2f} passes/token",
        )
    return " · ".join(parts)


def speculation(args: argparse.Namespace) -> str | None:
    """`--draft-model M` or `--prompt-lookup` as a `ChatSession` draft option, checked before any model loads."""
    from .speculative import draft_option

    draft = draft_option(args.draft_model, args.prompt_lookup, args.num_draft_tokens)
    if draft and getattr(args, "distributed", None):
        raise QwenMLXError("--draft-model and --prompt-lookup do not run across several Macs yet")
    return draft


def add_speculation_options(parser: argparse.ArgumentParser) -> None:
    from .engine import DEFAULT_DRAFT_TOKENS

    group = parser.add_argument_group("speculative decoding (the same tokens, fewer passes of the model)")
    drafts = group.add_mutually_exclusive_group()
    drafts.add_argument(
        "--draft-model", metavar="M", help="draft with a smaller Qwen3 of the same tokenizer (e.g. Qwen3-0.6B)"
    )
    drafts.add_argument(
        "--prompt-lookup", action="store_true", help="draft from the prompt and reply so far (no second model)"
    )
    group.add_argument(
        "--num-draft-tokens",
        type=int,
        default=DEFAULT_DRAFT_TOKENS,
        metavar="K",
        help=f"tokens drafted per pass (default {DEFAULT_DRAFT_TOKENS})",
    )


def demo_build(args: argparse.Namespace) -> int:
    """Train and verify the offline demo model (or demo-coder); progress on stderr, the folder last on stdout."""
    from .demo import build, build_coder

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    folder = (build_coder if args.coder else build)(args.output, force=args.force, log=log)
    print(folder)
    return 0


def serve(args: argparse.Namespace) -> int:
    """Serve one model (loaded now) or several (each loaded on its first request) until interrupted."""
    from . import transport
    from .scheduler import Scheduler
    from .server import REASONING_FIELDS, Settings, bind, create_app, is_loopback, single_model
    from .tokenizer import Tokenizer

    if args.api_key and args.api_key_file:
        raise QwenMLXError("--api-key and --api-key-file both give the key: keep one")
    api_key = args.api_key or _read_api_key(args.api_key_file) or os.environ.get("QWEN_MLX_API_KEY") or None
    if not is_loopback(args.host) and not api_key:
        raise QwenMLXError(
            f"refusing to listen on {args.host} without --api-key (or --api-key-file): anyone who can reach this "
            "machine could use it"
        )
    if args.reasoning_field not in REASONING_FIELDS:
        raise QwenMLXError(f"--reasoning-field must be one of {', '.join(REASONING_FIELDS)}")
    for name in ("max_batch", "prefill_step_size"):
        if getattr(args, name) < 1:
            raise QwenMLXError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_tokens_default is not None and args.max_tokens_default < 1:
        raise QwenMLXError("--max-tokens-default must be at least 1")
    if not args.keepalive > 0:
        raise QwenMLXError("--keepalive must be a number of seconds above 0")
    if args.max_waiting < 0:  # 0 is no queue: a request beyond --max-batch gets 429 at once
        raise QwenMLXError("--max-waiting must be at least 0")
    if not args.read_timeout > 0:
        raise QwenMLXError("--read-timeout must be a number of seconds above 0")
    if args.max_connections is not None and args.max_connections < 1:
        raise QwenMLXError("--max-connections must be at least 1")
    if args.ttl is not None and not args.ttl > 0:
        raise QwenMLXError("--ttl must be a number of seconds above 0")
    if args.memory_budget is not None and not args.memory_budget > 0:
        raise QwenMLXError("--memory-budget must be a number of GiB above 0")
    several = len(args.models) != 1
    if several and args.model_name:
        raise QwenMLXError("--model-name names the one model served: with several, each keeps its own name")
    hosts = transport.allowed_hosts(args.host, args.allowed_hosts)
    transport.raise_fd_limit()  # before the model's files open
    if getattr(args, "distributed", None) and os.environ.get("MLX_RANK") != "0":
        from .distributed import run_follower

        return run_follower(load_model(args))  # the other ranks follow rank 0, which serves
    served = served_models(args) if several else None  # names and folders checked before the port is taken
    sock = bind(args.host, args.port)  # before the model loads: a port in use fails at once
    draft = speculation(args)

    def load_draft(loaded, tokenizer):
        from .speculative import load_draft

        print(f"qwen-mlx: loading the draft model {draft}", file=sys.stderr, flush=True)
        return load_draft(draft, loaded.model.args.vocab_size, tokenizer)

    def make_scheduler(source: str) -> Scheduler:
        def load_with_tokenizer():
            loaded = load_model(argparse.Namespace(**{**vars(args), "model": source}))
            return loaded, Tokenizer.load(loaded.path)

        return Scheduler(
            load_with_tokenizer,
            max_batch=args.max_batch,
            max_waiting=args.max_waiting,
            prefill_step_size=args.prefill_step_size,
            default_max_tokens=args.max_tokens_default,
            load_draft=load_draft if draft not in (None, "lookup") else None,
            speculative=(("lookup" if draft == "lookup" else "model"), args.num_draft_tokens) if draft else None,
        )

    budget = int(args.memory_budget * GIB) if args.memory_budget is not None else None
    settings = Settings(model_id="", reasoning_field=args.reasoning_field, keepalive_s=args.keepalive)
    if served is not None:
        from .memory import memory_budget
        from .mlxlm import submodule
        from .registry import Registry

        registry = Registry(served, lambda model: make_scheduler(model.source), ttl=args.ttl,
                            budget=budget if budget is not None else memory_budget())  # fmt: skip
        for name in ("generate", "models.cache"):  # what a scheduler imports: see connection_limit below
            submodule(name)
        try:
            return _serve_app(args, sock, hosts, api_key, create_app(registry, settings, api_key=api_key,
                              cors_origins=args.cors_origin or (), max_body=args.max_body_mb << 20),
                              f"{len(served)} models ({_names(served)}; each loads on its first request)")  # fmt: skip
        finally:
            registry.close()
    scheduler = make_scheduler(args.model)
    model_id = args.model_name or (
        args.model if not os.path.isdir(args.model) else os.path.basename(os.path.abspath(args.model))
    )
    patterns = alias_patterns(args.alias or (), Settings(model_id=model_id, aliases=(args.model,)))
    print(f"qwen-mlx: loading {args.model}", file=sys.stderr, flush=True)
    scheduler.start()
    try:  # only now: importing mlx-lm's utils (the scheduler does) resets the descriptor limit to 2048 of 4096
        max_connections = transport.connection_limit(args.max_connections)
    except QwenMLXError:
        scheduler.stop()
        raise
    path = scheduler.loaded.path
    settings = Settings(
        model_id=model_id,
        aliases=(args.model, str(path), os.path.basename(str(path))),
        reasoning_field=args.reasoning_field,
        patterns=tuple(patterns),
        keepalive_s=args.keepalive,
    )
    registry = single_model(scheduler, settings, lambda model: make_scheduler(args.model), ttl=args.ttl,
                            budget=budget)  # fmt: skip
    app = create_app(registry, settings, api_key=api_key, cors_origins=args.cors_origin or (),
                     max_body=args.max_body_mb << 20)  # fmt: skip
    try:
        return _serve_app(args, sock, hosts, api_key, app, model_id, max_connections)
    finally:
        registry.close()


def _serve_app(args, sock, hosts, api_key, app, what: str, max_connections: int | None = None) -> int:
    """Run `app` on `sock` until interrupted, after the `serving WHAT at URL/v1` line (tests wait for it)."""
    import uvicorn

    from . import transport

    if max_connections is None:
        max_connections = transport.connection_limit(args.max_connections)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"qwen-mlx: serving {what} at http://{host}:{sock.getsockname()[1]}/v1", file=sys.stderr, flush=True)
    protocol = transport.http_protocol(args.read_timeout, max_connections)
    config = uvicorn.Config(transport.Gate(app, hosts), http=protocol, ws="none", log_level=args.log_level,
                            timeout_graceful_shutdown=2)  # fmt: skip
    transport.quiet_logs()  # after uvicorn.Config, which configures logging
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def _names(served, most: int = 4) -> str:
    names = [m.name for m in served]
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def served_models(args: argparse.Namespace) -> list:
    """The models a server of several serves (`ServedModel`s): every `--model` given, else every model
    `qwen-mlx list` shows (an unreadable one is left out, with a line saying why); `--alias NAME=MODEL`."""
    from .demo import built_dir
    from .loader import DEMO_NAMES, find_named, is_hub_repo, resolve_model_path
    from .models import hub_cache_models, list_models
    from .registry import ServedModel, shape_facts

    served = []
    if not args.models:
        for entry in list_models():
            if entry.error is not None:
                print(f"qwen-mlx: leaving out {entry.name}: {entry.error}", file=sys.stderr, flush=True)
                continue
            folder = entry.folder
            source = str(folder) if folder is not None else entry.name  # a demo model not built yet: built when asked
            memory = entry.fit.total if entry.fit is not None else None
            context = entry.info.shape.context_length if entry.info is not None else None
            names = (str(folder), folder.name) if entry.where == "models" else (str(folder),) if folder else ()
            served.append(ServedModel(entry.name, source, folder, names, memory=memory, context_length=context))
    hub = dict(hub_cache_models()) if any(is_hub_repo(m) for m in args.models) else {}
    for given in args.models:
        if given in DEMO_NAMES and not os.path.isdir(given):
            folder, name = built_dir(given), given
        elif os.path.isdir(given):
            folder, name = Path(given), os.path.basename(os.path.abspath(given))
        elif isinstance(found := find_named(given), Path):
            folder, name = found, given
        elif is_hub_repo(given):
            folder, name = hub.get(given), given  # a repo not in the cache yet downloads when first asked for
        else:
            resolve_model_path(given)  # raises the one line that says what is wrong with the name
            raise QwenMLXError(f"--model {given}: not a model folder, a models-folder name or a Hub repo id")
        names = tuple(dict.fromkeys(n for n in (given, str(folder or ""), folder.name if folder else "") if n))
        memory, context = shape_facts(folder)
        served.append(ServedModel(name, str(folder or given), folder, names, memory=memory, context_length=context))
    seen: dict[str, str] = {}
    for model in served:
        if model.name in seen:
            given = model.names[0] if model.names else model.source
            raise QwenMLXError(f"--model {seen[model.name]} and --model {given} are both named {model.name!r}: "
                               "serve one, or a copy of its folder under another name")  # fmt: skip
        seen[model.name] = model.names[0] if model.names else model.source
    for alias in args.alias or ():
        name, _, target = alias.partition("=")
        if not name or not target:
            raise QwenMLXError(f"--alias {alias!r}: with several models, say which one: --alias NAME=MODEL")
        model = next((m for m in served if m.answers_to(target)), None)
        if model is None:
            raise QwenMLXError(f"--alias {alias}: no served model is named {target!r} ({_names(served)})")
        model.patterns = (*model.patterns, name)
    return served


class _Models(argparse.Action):
    """`--model` given once or more: every one in `models`; `model` is the first (what one-model code reads)."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.models = [*namespace.models, values]
        namespace.model = namespace.models[0]


DEFAULT_URL = "http://127.0.0.1:1234"  # `serve`'s default address


def ps(args: argparse.Namespace) -> int:
    """`qwen-mlx ps`: what a running server has loaded (its `/api/ps`), as a table like `list`'s."""
    import httpx

    from .models import context_text, size_text, table_text

    if args.api_key and args.api_key_file:
        raise QwenMLXError("--api-key and --api-key-file both give the key: keep one")
    key = args.api_key or _read_api_key(args.api_key_file) or os.environ.get("QWEN_MLX_API_KEY")
    url = args.url.rstrip("/").removesuffix("/v1")
    try:
        response = httpx.get(f"{url}/api/ps", headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=10)
    except httpx.HTTPError as e:
        raise QwenMLXError(f"no server answers at {url} ({e or type(e).__name__}); start one with qwen-mlx serve, "
                           "or give its address with --url") from None  # fmt: skip
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code == 401:
        raise QwenMLXError(f"the server at {url} wants its API key: pass --api-key or set QWEN_MLX_API_KEY")
    if response.status_code != 200 or not isinstance(body, dict) or not isinstance(body.get("models"), list):
        raise QwenMLXError(f"{url} answered /api/ps with HTTP {response.status_code}: is it a qwen-mlx server?")
    rows = [("NAME", "MEMORY", "CONTEXT", "IDLE")]
    for model in body["models"]:
        busy = model.get("in_flight") or 0
        idle = f"busy ({busy} request{'s' * (busy != 1)})" if busy else _duration(model.get("idle_seconds", 0))
        context = model.get("context_length")
        rows.append((model.get("id") or model.get("name", "?"), size_text(model.get("size") or 0),
                     context_text(context) if context else "?", idle))  # fmt: skip
    print(table_text(rows))
    return 0


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _read_api_key(path: str | None) -> str | None:
    """`--api-key-file`: the key on the file's one line (so it is not in `ps` and the shell's history)."""
    if path is None:
        return None
    if not os.path.isfile(path):  # a FIFO would hang the read below
        found = "is not a regular file" if os.path.exists(path) else "no such file"
        raise QwenMLXError(f"--api-key-file {path}: {found}; put the key on one line of a file")
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read(4096).strip()
    except (OSError, UnicodeDecodeError) as e:
        raise QwenMLXError(f"--api-key-file {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    if not text or "\n" in text:
        found = "several lines" if text else "empty"
        raise QwenMLXError(f"--api-key-file {path}: it must hold the key on one line, and it is {found}")
    return text


def alias_patterns(aliases, settings) -> list[str]:
    """`--alias NAME` or `--alias NAME=MODEL`, checked: MODEL must be the one model this server serves."""
    patterns = []
    for alias in aliases:
        name, _, target = alias.partition("=")
        if not name:
            raise QwenMLXError(f"--alias {alias!r} needs a name (or a pattern such as 'claude-*')")
        if target and not settings.serves(target):
            raise QwenMLXError(f"--alias {alias}: this server serves {settings.model_id!r}, not {target!r}")
        patterns.append(name)
    return patterns


def chat(args: argparse.Namespace) -> int:
    """The Textual chat app (app/, installed as qwen_mlx.app)."""
    from .app import run

    for option, value in (("--budget", args.budget), ("--temp", args.temp)):
        if value is not None and value < 0:
            raise QwenMLXError(f"{option} {value} is invalid: it must be >= 0")
    if args.distributed:
        import contextlib

        from .distributed import serve_in_background

        if args.endpoint:
            raise QwenMLXError("--distributed runs the model here: leave out --endpoint")
        if not args.model:  # the model a resumed chat was held with, else the demo, as without --distributed
            stored = _resumed_model(args.resume) if args.resume else None
            args.model = stored or "demo"
        with contextlib.ExitStack() as ranks:
            args.endpoint, args.api_key = ranks.enter_context(serve_in_background(args))
            args.quantize = None  # the ranks quantize; the app only talks to them
            return run(args, cleanup=ranks.close)
    return run(args)


def _resumed_model(name: str) -> str | None:
    """The model a saved chat was held with (None for one held with an endpoint)."""
    from .app import held_with
    from .app.store import Store

    store = Store()
    try:
        return held_with(store.load(name).model)[1]
    finally:
        store.close()


def add_distributed_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('several Macs (see the README\'s "Several Macs")')
    group.add_argument(
        "--distributed",
        choices=("tp", "pp"),
        help="split the model across hosts: tp (tensor parallel, fast links) or pp (pipeline, slow links)",
    )
    group.add_argument("--hostfile", metavar="FILE", help="mlx.launch's hosts.json: the Macs and their IPs")
    group.add_argument("--ranks", type=int, metavar="N", help="run N ranks on this machine instead (testing)")
    group.add_argument("--layers", metavar="A,B,...", help="pp: layers per rank (default: by each host's memory)")
    group.add_argument(
        "--peer-timeout",
        type=float,
        metavar="S",
        help="end the run when the other ranks give no answer for S seconds (default 120)",
    )


def build_parser() -> argparse.ArgumentParser:
    from .loader import FAMILY

    parser = OneLineParser(prog="qwen-mlx", description="Run Qwen3 on Apple Silicon with MLX.")
    parser.add_argument("--version", action="version", version=f"qwen-mlx {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info_parser = commands.add_parser(
        "info",
        help="describe a model: architecture, parameters, quantization",
        description="Describe a model without loading its weights. Example: qwen-mlx info Qwen/Qwen3-4B",
    )
    info_parser.add_argument("model", help="a model folder, or a Hugging Face repo id (owner/name)")
    info_parser.add_argument("--revision", help="a branch, tag or commit of a Hub repo")
    info_parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    info_parser.add_argument(
        "--context", type=int, metavar="N", help="estimate the memory at N tokens, and the longest context that fits"
    )
    info_parser.add_argument("--kv-bits", type=int, choices=(4, 8), help="with --context: a 4- or 8-bit KV cache")
    info_parser.set_defaults(handler=info)

    pull_parser = commands.add_parser(
        "pull",
        help="download a model (short names: qwen3:8b, qwen3:30b-a3b, qwen3-coder:30b, ...)",
        description="Download a model into the Hugging Face cache; with --quantize, convert a float repo into "
        "the models folder. Examples: qwen-mlx pull qwen3:8b; qwen-mlx pull Qwen/Qwen3-8B --quantize 4. "
        "Short names: " + ", ".join(FAMILY) + " (add :4bit, :8bit or :bf16; the default is 4-bit).",
    )
    pull_parser.add_argument("name", help="a short name, or a Hub repo id (REPO or REPO:4bit)")
    pull_parser.add_argument("--quantize", type=int, choices=(4, 8), help="convert float weights to 4 or 8 bits")
    pull_parser.add_argument("--no-eval", action="store_true", help="with --quantize: skip the quality report")
    pull_parser.set_defaults(handler=pull)

    list_parser = commands.add_parser(
        "list",
        help="the models this machine can run, and whether each fits",
        description="List the demo, the models folder and the Hugging Face cache's Qwen3 repos, from their "
        "config and safetensors headers (no weights are read).",
    )
    list_parser.set_defaults(handler=list_models)

    rm_parser = commands.add_parser(
        "rm",
        help="remove a model from the models folder or the Hugging Face cache",
        description="Remove a model that `qwen-mlx list` shows. Example: qwen-mlx rm Qwen3-8B-4bit",
    )
    rm_parser.add_argument("name", help="a name as `qwen-mlx list` shows it")
    rm_parser.add_argument("--yes", action="store_true", help="remove without asking")
    rm_parser.set_defaults(handler=remove)

    gen = commands.add_parser(
        "generate",
        help="answer one prompt, streaming the thinking and then the answer",
        description="Answer one prompt. Example: qwen-mlx generate --model demo --prompt 'What is 2 + 3?'",
    )
    gen.add_argument("--model", required=True, help="a model folder, a Hugging Face repo id, or demo")
    gen.add_argument("--prompt", required=True, help="the user message (- reads it from stdin)")
    gen.add_argument("--system", help="a system message")
    gen.add_argument("--no-think", action="store_true", help="answer directly (enable_thinking=False)")
    gen.add_argument("--thinking-budget", type=int, metavar="N", help="stop thinking after N tokens and answer")
    gen.add_argument("--max-tokens", type=int, default=4096, help="most tokens to generate (default 4096)")
    gen.add_argument("--temperature", type=float, help="0 is greedy (default: the model's, else Qwen3's 0.6/0.7)")
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--min-p", type=float)
    gen.add_argument("--presence-penalty", type=float, default=0.0)
    gen.add_argument("--frequency-penalty", type=float, default=0.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", metavar="TEXT", help="stop the answer at TEXT (repeatable)")
    gen.add_argument("--tools", metavar="FILE", help="a JSON list of OpenAI tool definitions the model may call")
    gen.add_argument(
        "--tool-choice",
        metavar="auto|none|required|NAME",
        help="after thinking: let the model choose (auto), no call (none), some call (required), or call NAME",
    )
    answer_format = gen.add_mutually_exclusive_group()
    answer_format.add_argument("--json", action="store_true", help="answer with a JSON object (after thinking)")
    answer_format.add_argument("--json-schema", metavar="FILE", help="answer with JSON that this schema accepts")
    gen.add_argument("--kv-bits", type=int, choices=(4, 8), help="quantize the KV cache to 4 or 8 bits")
    gen.add_argument("--quantize", type=int, choices=(4, 8), help="quantize float weights on load")
    gen.add_argument("--revision", help="a branch, tag or commit of a Hub repo")
    add_speculation_options(gen)
    add_distributed_options(gen)
    gen.set_defaults(handler=generate)

    srv = commands.add_parser(
        "serve",
        help="an OpenAI-compatible endpoint on 127.0.0.1:1234 (LM Studio's port)",
        description="Serve models over the OpenAI, Anthropic and Ollama APIs. With one --model, that model, "
        "loaded now. With several, or none (every model `qwen-mlx list` shows), a request's `model` picks "
        "one; it loads on its first request and unloads after --ttl idle or when another needs its memory "
        "(--memory-budget). Examples: qwen-mlx serve --model demo; qwen-mlx serve --ttl 3600",
    )
    srv.add_argument(
        "--model",
        action=_Models,
        metavar="M",
        help="a model folder, a Hugging Face repo id, or demo (repeatable; default: every model `list` shows)",
    )
    srv.set_defaults(models=[])
    srv.add_argument(
        "--ttl",
        type=float,
        metavar="S",
        help="unload a model after S seconds without a request (default: never; the budget still evicts)",
    )
    srv.add_argument(
        "--memory-budget",
        type=float,
        metavar="GIB",
        help="GiB the loaded models may take, by the estimate `list` prints; past it the least recently used "
        "idle model unloads (default: the GPU's working set, else the memory available at start)",
    )
    srv.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=1234, help="the port (default 1234; 0 picks a free one)")
    srv.add_argument("--api-key", help="require this key (Bearer or x-api-key); also $QWEN_MLX_API_KEY")
    srv.add_argument("--api-key-file", metavar="FILE", help="require the key on FILE's one line (off the command line)")
    srv.add_argument(
        "--allowed-hosts",
        metavar="HOST[,HOST...]",
        help="Host header names to accept besides loopback ones, or '*' (default: any, if bound beyond loopback)",
    )
    srv.add_argument("--cors-origin", action="append", metavar="ORIGIN", help="allow browser calls from ORIGIN")
    srv.add_argument(
        "--reasoning-field",
        default="reasoning_content",
        help="where thinking goes: reasoning_content (default), reasoning, or think (inline <think> text)",
    )
    srv.add_argument("--model-name", help="the id /v1/models reports (one --model only; default: its argument)")
    srv.add_argument(
        "--max-tokens-default",
        type=int,
        metavar="N",
        help="max tokens for a request that sets none (default: the room left in the context)",
    )
    srv.add_argument(
        "--keepalive",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds without a token (a long prefill) before a stream sends a keep-alive (default 10)",
    )
    srv.add_argument(
        "--alias",
        action="append",
        metavar="NAME",
        help="also answer to NAME (with several models: NAME=MODEL); glob patterns allowed, e.g. 'claude-*' for "
        "Claude Code (repeatable)",
    )
    srv.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    srv.add_argument("--max-waiting", type=int, default=32, help="requests queued beyond those; more get 429")
    srv.add_argument("--prefill-step-size", type=int, default=512, help="prompt tokens per step (default 512)")
    srv.add_argument("--max-body-mb", type=int, default=16, help="the largest request body in MiB (default 16)")
    srv.add_argument(
        "--read-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds a client has to send its whole request, head and body (default 60); answers are not limited",
    )
    srv.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        help="connections held at once; beyond, the oldest idle one closes (default: what ulimit -n allows, <= 4096)",
    )
    srv.add_argument("--quantize", type=int, choices=(4, 8), help="quantize float weights on load")
    srv.add_argument("--revision", help="a branch, tag or commit of a Hub repo")
    srv.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))
    add_distributed_options(srv)
    add_speculation_options(srv)
    srv.set_defaults(handler=serve)

    ps_parser = commands.add_parser(
        "ps",
        help="the models a running server has loaded: memory, context, idle time",
        description="Ask a running `qwen-mlx serve` what it has loaded. Example: qwen-mlx ps --url http://127.0.0.1:1234",
    )
    ps_parser.add_argument("--url", default=DEFAULT_URL, help=f"the server (default {DEFAULT_URL})")
    ps_parser.add_argument("--api-key", help="the server's key (default $QWEN_MLX_API_KEY)")
    ps_parser.add_argument("--api-key-file", metavar="FILE", help="the key on FILE's one line")
    ps_parser.set_defaults(handler=ps)

    chat_parser = commands.add_parser(
        "chat",
        help="the terminal chat app, over a local model or an OpenAI-compatible endpoint",
        description="Chat in the terminal. Examples: qwen-mlx chat --model demo; "
        "qwen-mlx chat --endpoint http://127.0.0.1:1234/v1",
    )
    chat_parser.add_argument("--model", help="a model folder, a Hugging Face repo id, or demo (the default)")
    chat_parser.add_argument("--quantize", type=int, choices=(4, 8), help="quantize float weights on load")
    chat_parser.add_argument("--endpoint", metavar="URL", help="chat with an OpenAI-compatible server instead")
    chat_parser.add_argument(
        "--api-key",
        default=os.environ.get("QWEN_MLX_API_KEY"),
        help="the endpoint's key (default $QWEN_MLX_API_KEY; $OPENAI_API_KEY is never sent to an endpoint)",
    )
    chat_parser.add_argument("--resume", metavar="NAME", help="reopen a chat saved with /save NAME")
    add_speculation_options(chat_parser)
    chat_parser.add_argument("--no-think", action="store_true", help="start with thinking off (/think turns it on)")
    chat_parser.add_argument("--budget", type=int, metavar="N", help="end thinking after N tokens (/budget N)")
    chat_parser.add_argument("--temp", type=float, metavar="X", help="sampling temperature (/temp X)")
    chat_parser.add_argument("--system", metavar="TEXT", help="a system prompt (/system TEXT)")
    chat_parser.add_argument(
        "--thinking-panels",
        choices=("open", "folded"),
        default="open",
        help="whether a thinking panel is open while it streams (it folds when the answer starts)",
    )
    add_distributed_options(chat_parser)
    chat_parser.set_defaults(handler=chat)

    demo = commands.add_parser(
        "demo",
        help="the offline demo model (qwen-mlx demo build)",
        description="The tiny demo model that replays scripted chats; `--model demo` builds it on first use.",
    )
    demo_commands = demo.add_subparsers(dest="demo_command", required=True, metavar="ACTION")
    demo_build_parser = demo_commands.add_parser(
        "build",
        help="train, verify and save the demo model (about a minute on a CPU)",
        description="Train, verify and save the demo model. Example: qwen-mlx demo build -o /tmp/qwen3-demo",
    )
    demo_build_parser.add_argument(
        "-o", "--output", help="the folder to write (default: the cache folder that --model demo uses)"
    )
    demo_build_parser.add_argument("--force", action="store_true", help="rebuild, replacing what is there")
    demo_build_parser.add_argument(
        "--coder",
        action="store_true",
        help="build demo-coder instead: Qwen3-Coder's XML tool calls (the folder --model demo-coder uses)",
    )
    demo_build_parser.set_defaults(handler=demo_build)

    # Parsed by the converter's own parser (see main); listed here so `qwen-mlx --help` shows it.
    commands.add_parser(
        "convert",
        add_help=False,
        help="convert a Hugging Face checkpoint into an MLX folder, quantized (qwen-mlx convert --help)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["convert"]:
        from .convert.cli import main as convert_main

        return convert_main(argv[1:], prog="qwen-mlx convert")
    args = build_parser().parse_args(argv)
    distributed = getattr(args, "distributed", None)
    rank = os.environ.get("MLX_RANK") if distributed else None
    try:
        if not distributed:
            for flag in ("hostfile", "ranks", "layers", "peer_timeout"):
                if getattr(args, flag, None) is not None:
                    raise QwenMLXError(f"--{flag.replace('_', '-')} goes with --distributed tp or --distributed pp")
        if distributed:
            if args.peer_timeout is not None:
                os.environ["QWEN_MLX_PEER_TIMEOUT"] = str(args.peer_timeout)
            if args.command == "serve" and (len(args.models) != 1 or args.ttl is not None):  # before any rank starts
                raise QwenMLXError("--distributed serves one model for the server's life: give one --model, no --ttl")
            if rank is None and args.command != "chat":  # the launching process: start every rank
                from .distributed import launch, preflight

                preflight(args.model, distributed, hostfile=args.hostfile, ranks=args.ranks, layers=args.layers,
                          quantize=args.quantize, revision=getattr(args, "revision", None))  # fmt: skip
                return launch(argv, hostfile=args.hostfile, ranks=args.ranks)
            if rank is not None:
                from .distributed import watch_signals

                watch_signals()
        status = args.handler(args)
    except QwenMLXError as error:
        where = f" (rank {rank})" if rank not in (None, "0") else ""
        print(f"qwen-mlx: error{where}: {error}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        status = 130
    if rank is not None:
        from .distributed import report_status

        report_status(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
