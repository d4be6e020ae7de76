"""The project's exception types for errors a user can cause and fix.

Their message names the file, tensor, field or option at fault and says what to do; entry points print it
as one line (or an OpenAI-shaped error) instead of a traceback. Errors that a server answers with a
status of their own are subclasses, so the server chooses the status by type, never by message text.
"""

from __future__ import annotations

import argparse


class QwenMLXError(Exception):
    """Bad input from the user: a checkpoint, option or request we cannot use as given.

    `param` names the request field at fault, when there is one (the endpoint reports it).
    """

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthExceeded(QwenMLXError):
    """The prompt leaves no room in the model's context."""


class Overloaded(QwenMLXError):
    """Every slot and every waiting place of the server is taken."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage error said in one line and a pointer to `--help` (not the whole usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
