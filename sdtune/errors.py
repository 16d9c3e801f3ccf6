"""The one error type for bad user input.

Anything the user can fix (a wrong config key, a missing folder, a model that cannot be found)
raises `SdtuneError` with a one-line message that names what is wrong and what would be right.
The CLI prints that line and exits with status 2, without a traceback.
"""


class SdtuneError(Exception):
    """A problem with the user's input or environment, explained in one line."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """A library exception's message cut to one short line, to quote inside an SdtuneError."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
