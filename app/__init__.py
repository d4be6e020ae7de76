"""The qwen-mlx chat app (`qwen-mlx chat`): a Textual terminal chat over the local engine or an endpoint.

Installed as `qwen_mlx.app`. `run` is the command's entry; `ChatApp` is the app itself.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable


def held_with(stored: str) -> tuple[str | None, str | None]:
    """(endpoint, model) from what a saved chat records it was held with: an endpoint URL or a model."""
    if stored.startswith(("http://", "https://")):
        return stored, None
    return None, stored or None


def _split(args: argparse.Namespace) -> str | None:
    """How `chat --distributed` splits the model, for the status bar: "pp over 2 ranks"."""
    if not getattr(args, "distributed", None):
        return None
    from qwen_mlx.distributed.launch import rank_count

    return f"{args.distributed} over {rank_count(args.hostfile, args.ranks)} ranks"


def run(args: argparse.Namespace, cleanup: Callable[[], None] | None = None) -> int:
    """Start the app from `qwen-mlx chat`'s arguments; bad arguments raise QwenMLXError before it draws.

    `cleanup` runs after the app, before the process leaves (it leaves with `os._exit`, see below, so
    context managers and atexit handlers around this call would never run).
    """
    from qwen_mlx.errors import QwenMLXError
    from qwen_mlx.speculative import draft_option

    from .app import ChatApp, Source
    from .conversation import Conversation
    from .store import Store

    if args.endpoint and args.quantize:
        raise QwenMLXError("--quantize applies to a local model, not to --endpoint")
    draft = draft_option(args.draft_model, args.prompt_lookup, args.num_draft_tokens)
    if args.endpoint and draft:
        raise QwenMLXError("--draft-model and --prompt-lookup apply to a local model, not to --endpoint")
    store = Store()
    conversation = store.load(args.resume) if args.resume else None
    model, endpoint = args.model, args.endpoint
    if conversation and not (model or endpoint):  # resume with what the chat was held with
        endpoint, model = held_with(conversation.model)
    source = Source(
        model=model or (None if endpoint else "demo"),
        quantize=args.quantize,
        draft=draft,
        num_draft_tokens=args.num_draft_tokens,
        endpoint=endpoint,
        api_key=args.api_key,
        distributed=_split(args),
    )
    if conversation is None:
        conversation = Conversation(
            model=source.label,
            thinking=not args.no_think,
            budget=args.budget,
            temperature=args.temp,
            system=args.system or "",
        )
    app = ChatApp(source, conversation=conversation, store=store, panels_open=args.thinking_panels == "open")
    try:
        app.run()
    finally:
        store.close()
        if cleanup is not None:
            cleanup()
    # Everything is saved and closed, and the engine thread has cleared its MLX streams. Leave without the
    # interpreter's teardown anyway: MLX's thread-local resources can still abort there (SIGABRT, "terminate
    # called without an active exception"; ml-explore/mlx#4506 is open), turning a clean quit into exit 134.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(app.return_code or 0)
