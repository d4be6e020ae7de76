"""The qwen-mlx chat app (`qwen-mlx chat`): a Textual terminal chat over the local engine or an endpoint.

Installed as `qwen_mlx.app`. `run` is the command's entry; `ChatApp` is the app itself.
"""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> int:
    """Start the app from `qwen-mlx chat`'s arguments; bad arguments raise QwenMLXError before it draws."""
    from qwen_mlx.errors import QwenMLXError

    from .app import ChatApp, Source
    from .conversation import Conversation
    from .store import Store

    if args.endpoint and args.quantize:
        raise QwenMLXError("--quantize applies to a local model, not to --endpoint")
    store = Store()
    conversation = store.load(args.resume) if args.resume else None
    model = args.model or (conversation.model if conversation and not args.endpoint else None)
    if conversation and conversation.model.startswith(("http://", "https://")) and not args.endpoint:
        model = args.model  # the chat was held with an endpoint: without --endpoint, talk to a local model
    source = Source(
        model=model or (None if args.endpoint else "demo"),
        quantize=args.quantize,
        endpoint=args.endpoint,
        api_key=args.api_key,
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
    app.run()
    return app.return_code or 0
