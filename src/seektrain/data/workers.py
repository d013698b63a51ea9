"""Worker-process side of `prepare`: per-batch cleaning and tokenization, and an ordered bounded map.

Workers are forked (POSIX; no re-import of `__main__`, which `spawn` would re-run in scripts without a
main guard; the children touch neither torch nor rich, and tokenizers' thread pool is off in them) and
hold their configuration in process state set by the pool initializer. Results come back in submission
order, so the output never depends on the number of workers.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from seektrain.data.clean import CleanConfig, Cleaned, clean_document
from seektrain.data.dedup import MinHasher
from seektrain.errors import UserError, first_line

_state: dict = {}  # this worker process's configuration (set once by the pool initializer)


def init_clean(cfg: CleanConfig, minhash: MinHasher | None) -> None:
    _state["clean"], _state["minhash"] = cfg, minhash


def clean_batch(raws: list[bytes | str]) -> list[Cleaned]:
    return [clean_document(r, _state["clean"], _state["minhash"]) for r in raws]


def init_tokenize(tokenizer_json: str, eos_id: int, roles: list[str], dtype: str, threads: bool) -> None:
    """The worker's tokenizer, which reads the `roles` tokens (BOS, EOS, PAD) in a document as text."""
    if not threads:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    # Text like "<|eos|>" inside a document is text: without this, HF tokenizers match special tokens in
    # the input even with add_special_tokens=False, and a document would hold fake document boundaries.
    # A given tokenizer may list the role tokens as plain added tokens, which this flag leaves matched:
    # they are made special first (same ids). On this copy only: neither is saved in tokenizer.json, so
    # generate and eval are unaffected.
    tok.add_special_tokens([AddedToken(token, special=True) for token in roles])
    tok.encode_special_tokens = True
    _state["tok"] = tok
    _state["eos"], _state["dtype"] = eos_id, np.dtype(dtype)


def tokenize_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the documents, each followed by EOS: ((N,) ids, (D,) per-document lengths incl. EOS)."""
    tok = _state["tok"]
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast skips offsets (tokenizers >= 0.20)
    try:
        encodings = encode(texts, add_special_tokens=False)
    except Exception as e:  # a given tokenizer that cannot encode some text (a WordPiece without [UNK])
        raise UserError(f"the tokenizer cannot encode the corpus: {first_line(e)}") from None
    lens = np.fromiter((len(e.ids) + 1 for e in encodings), dtype=np.int64, count=len(encodings))
    ids = np.empty(int(lens.sum()), dtype=_state["dtype"])
    pos = 0
    for e, n in zip(encodings, lens, strict=True):
        ids[pos : pos + n - 1] = e.ids
        ids[pos + n - 1] = _state["eos"]
        pos += n
    return ids, lens


def ordered_map(
    fn: Callable, tasks: Iterable, workers: int, initializer: Callable, initargs: tuple
) -> Iterator:
    """fn over tasks in order, on `workers` processes (inline when 1) with at most 2×workers
    tasks in flight, so a huge input never piles up in memory.

    The workers ignore SIGINT and SIGTERM, which a terminal, `timeout`, Slurm or systemd send to every
    process of the job: the parent stops them, with the pool's own end-of-work messages once their tasks
    in hand are done. Killed by such a signal, a worker could die in the middle of a message on the
    pool's pipes, and the pool waited forever for the rest of it (`multiprocessing.Pool`, for the queue
    lock such a worker held). On `concurrent.futures`' pool, a worker that dies anyway (the OOM killer)
    between messages fails the pending tasks with one error."""
    if workers <= 1:
        initializer(*initargs)
        yield from map(fn, tasks)
        return
    from concurrent.futures.process import BrokenProcessPool

    tasks = iter(tasks)
    first = next(tasks, _NO_TASK)  # read before the signals are blocked: it may take a while
    if first is _NO_TASK:
        return
    pool, future, processes = _start_pool(workers, fn, first, initializer, initargs)
    pending: deque = deque([future])
    try:
        for task in tasks:
            pending.append(pool.submit(fn, task))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        for process in processes:  # the pool stops the others with SIGTERM, which they ignore
            process.kill()
        raise UserError(
            "a worker process ended unexpectedly (killed by a signal, or by the system when out of memory: "
            "try fewer --workers)"
        ) from None
    finally:  # an error or an interrupt: the tasks not yet handed to a worker are dropped, the rest finish
        pool.shutdown(wait=True, cancel_futures=True)


_NO_TASK = object()


def _start_pool(workers: int, fn: Callable, first, initializer: Callable, initargs: tuple):
    """A process pool of `workers` forked processes, the future of fn(first) and the processes: that
    first submit forks them all, with SIGINT and SIGTERM blocked until `_start_worker` (and in the
    pool's threads, which leaves the signals to the main thread). Where not all can start (a process
    limit, memory), those that did are stopped (the pool would not stop them: its manager thread is not
    running yet)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    before = set(mp.active_children())
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _WORKER_SIGNALS)
    try:
        fork = mp.get_context("fork")
        start = (os.getpid(), initializer, initargs)
        pool = ProcessPoolExecutor(workers, fork, initializer=_start_worker, initargs=start)
        future = pool.submit(fn, first)
        return pool, future, set(mp.active_children()) - before
    except OSError as e:
        for child in set(mp.active_children()) - before:
            child.kill()
            child.join()
        raise UserError(
            f"cannot start {workers} worker processes ({e.strerror or e}): try fewer --workers"
        ) from None
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


# Workers are born with these blocked and ignore them once `_start_worker` runs (inherited, the CLI's
# Python handlers would end a worker wherever it is; a signal that came before the ignoring is dropped).
_WORKER_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_PR_SET_PDEATHSIG = 1  # <sys/prctl.h>


def _start_worker(parent: int, initializer: Callable, initargs: tuple) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the pool (see `ordered_map`)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _WORKER_SIGNALS)
    if sys.platform.startswith("linux"):  # SIGKILLed with the parent, were it killed alone: kept waiting on
        with contextlib.suppress(OSError, AttributeError):  # the pool's pipes, a worker would live on
            ctypes.CDLL("libc.so.6").prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # it died before that took effect
            os._exit(1)
    initializer(*initargs)
