"""The one exception type for user mistakes: the CLI prints it as `error: …` and exits 2."""


class UserError(Exception):
    """Bad input (config, paths, data). Raised with a message a user can act on."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when empty): a library's multi-line
    error must not break the one-line report."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
