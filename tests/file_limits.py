"""A subprocess whose files may not grow past a size: writes past it fail with EFBIG, as on a full disk."""


def file_size_limit(limit: int):
    """A `preexec_fn` for subprocess: RLIMIT_FSIZE at `limit` bytes, SIGXFSZ ignored (so that a write past
    the limit fails with an OSError instead of killing the process)."""

    def apply() -> None:
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply
