"""The one exception type for errors a user can cause and fix.

Its message names the file, tensor, field or option at fault and says what to do; entry points print it
as one line (or an OpenAI-shaped error) instead of a traceback.
"""


class QwenMLXError(Exception):
    """Bad input from the user: a checkpoint, option or request we cannot use as given."""
