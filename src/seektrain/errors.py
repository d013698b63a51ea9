"""The one exception type for user mistakes: the CLI prints it as `error: …` and exits 2."""


class UserError(Exception):
    """Bad input (config, paths, data). Raised with a message a user can act on."""
