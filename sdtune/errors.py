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


def quote(value: object, limit: int = 80) -> str:
    """`repr(value)` cut to `limit` characters, to quote a user's value inside a message."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[: limit - 20]}... ({len(text)} characters)"


def quote_path(value: object) -> str:
    """`quote` for a path the user gave: kept whole up to a length any real path fits in, since
    a cut path no longer names the file."""
    return quote(value, limit=400)


def pickle_refusal(exc: BaseException) -> str | None:
    """The reason torch's weights-only unpickler gave for refusing an object, or None when
    `exc` is not such a refusal (a torn file, say). torch's own text advises rerunning with
    `weights_only=False`; only its reason is kept."""
    text = str(exc)
    if "weights only" not in text.lower() and "unsupported" not in text.lower():
        return None
    if "unsupported operand" in text.lower():  # a byte that is no pickle opcode: torn, not code
        return None
    reasons = [line.strip() for line in text.splitlines() if "unsupported" in line.lower()]
    return reasons[0][:200] if reasons else "an object other than tensors"
