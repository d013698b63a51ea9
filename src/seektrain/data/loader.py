"""`TokenLoader`: memory-mapped, rank-sharded, exactly resumable stream of (x, y) training windows.

The split's shards form one token stream of N tokens, cut into n = (N-1) // T windows of T+1 tokens
(window i starts at token i*T, so every token is a target exactly once per epoch). The GLOBAL order of
windows depends only on (data, T, seed): epoch e visits them in a pseudorandom permutation keyed by
(seed, e) and computed pointwise (`permute`: O(1) memory however large the data), or in order when
shuffle=False; epochs follow each other forever. Optimizer step g consumes global windows
[g*GB, (g+1)*GB); rank r owns the contiguous slice [r*GB/W, (r+1)*GB/W) of it, in micro-batches of
mb. The state is therefore just the position in the global stream (sequences consumed, plus the
micro-batch within the current step), so a resume on a different number of ranks, or with another
global batch size, continues the same stream.

No DataLoader worker processes: a batch is a few memory-mapped slices copied into an int64 array,
far faster than any model step (see bench/RESULTS.md), so workers would only add state to resume.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from seektrain.data.shards import load_manifest, verify_shards
from seektrain.errors import UserError

STATE_VERSION = 1
_OPEN_SHARDS = 64
_CHUNK = 8192  # stream positions permuted at once: amortizes numpy's per-call cost of `permute`


_M64 = (1 << 64) - 1


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: a fast, well-mixing bijection on uint64 (wraps on overflow by design)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def permute(i: np.ndarray, n: int, seed: int, epoch: int, rounds: int = 6) -> np.ndarray:
    """A pseudorandom permutation of [0, n), evaluated pointwise in O(1) memory: a keyed Feistel network
    on the smallest even-bit domain 2^k >= n, with cycle walking (re-applied while the image is >= n,
    which maps [0, n) onto itself; under 4 rounds trips expected). (B,) uint64 -> (B,) uint64."""
    half = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
    shift, mask = np.uint64(half), np.uint64((1 << half) - 1)
    base = (seed * 0x9E3779B97F4A7C15 + epoch * 0xD1B54A32D192ED03) & _M64
    keys = _mix(np.arange(rounds, dtype=np.uint64) + np.uint64(base))  # (rounds,) round keys

    def feistel(x: np.ndarray) -> np.ndarray:
        left, right = x >> shift, x & mask
        for key in keys:
            left, right = right, left ^ (_mix(right ^ key) & mask)
        return (left << shift) | right

    with np.errstate(over="ignore"):
        out = feistel(i)
        while (walk := out >= n).any():
            out[walk] = feistel(out[walk])
    return out


class TokenLoader:
    """Infinite (train) or finite (`epoch()`) batches of x, y: int64 (mb, T), y = x shifted by one."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str = "train",
        seq_len: int = 256,
        micro_batch_size: int = 8,
        global_batch_size: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        verify: bool = True,
    ):
        manifest = load_manifest(data_dir)
        if split not in manifest["splits"]:
            raise UserError(f"{data_dir} has no split {split!r} (has: {', '.join(manifest['splits'])})")
        if global_batch_size is None:
            global_batch_size = micro_batch_size * world_size
        shape = (seq_len, micro_batch_size, global_batch_size, rank, world_size, seed)
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in shape) or (
            seq_len < 1
            or micro_batch_size < 1
            or global_batch_size < 1
            or world_size < 1
            or not 0 <= rank < world_size
        ):
            raise UserError(
                f"bad loader shape: seq_len={seq_len!r}, micro_batch_size={micro_batch_size!r}, "
                f"global_batch_size={global_batch_size!r}, rank={rank!r}, world_size={world_size!r}, "
                f"seed={seed!r} (integers; sizes and world size positive, 0 <= rank < world size)"
            )
        if global_batch_size % (micro_batch_size * world_size):
            raise UserError(
                f"global batch size {global_batch_size} must be a multiple of micro batch size × "
                f"ranks = {micro_batch_size} × {world_size}"
            )
        verify_shards(data_dir, manifest, split, checksums=verify)
        self.data_dir, self.split, self.seed, self.shuffle = Path(data_dir), split, int(seed), bool(shuffle)
        self.seq_len, self.micro_batch_size, self.global_batch_size = (
            seq_len,
            micro_batch_size,
            global_batch_size,
        )
        self.rank, self.world_size = rank, world_size
        self.vocab_size, self.eos_id = int(manifest["vocab_size"]), int(manifest["eos_id"])
        specials = manifest.get("special_tokens", {})  # bos / eos / pad of the tokenizer, those it has
        self.special_ids = {role: int(spec["id"]) for role, spec in specials.items()}
        self.tokens_per_step = global_batch_size * seq_len
        self.micro_steps = global_batch_size // (
            micro_batch_size * world_size
        )  # micro-batches per step per rank

        shards = [s for s in manifest["splits"][split]["shards"] if s["tokens"] > 0]
        dtype = np.dtype(manifest["dtype"])
        self._files, self._dtype = [self.data_dir / s["file"] for s in shards], dtype
        self._maps: OrderedDict[int, np.memmap] = OrderedDict()  # open shards, least recently used first
        self._starts = np.cumsum([0] + [s["tokens"] for s in shards])  # (S+1,) first token of each shard
        self.num_tokens = int(self._starts[-1])
        self.num_sequences = (self.num_tokens - 1) // seq_len if self.num_tokens else 0
        if self.num_sequences < 1:
            raise UserError(
                f"split {split!r} of {data_dir} has {self.num_tokens} tokens, fewer than seq_len+1 = "
                f"{seq_len + 1}: use a shorter seq_len or more data"
                + (f" (or a {'larger' if split == 'val' else 'smaller'} --val-fraction in prepare)")
            )
        self._fingerprint = hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()[:16]
        self._chunk: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.int64))  # window ids of one chunk
        # sequences of the global stream consumed before the current step; micro-batch within it (this rank)
        self.position, self.micro = 0, 0

    # --- global order -------------------------------------------------------------------------------
    def _window_ids(self, positions: np.ndarray) -> np.ndarray:
        """Global stream positions (sequences since the start) -> window indices in the token stream."""
        if not self.shuffle:
            return positions % self.num_sequences
        chunks = positions // _CHUNK
        out = np.empty_like(positions)
        for c in np.unique(chunks):  # usually one: a micro-batch is a contiguous run of positions
            if self._chunk[0] != c:
                self._chunk = (
                    int(c),
                    self._permuted(np.arange(c * _CHUNK, (c + 1) * _CHUNK, dtype=np.int64)),
                )
            mask = chunks == c
            out[mask] = self._chunk[1][positions[mask] - c * _CHUNK]
        return out

    def _permuted(self, positions: np.ndarray) -> np.ndarray:
        epochs, offsets = np.divmod(positions, self.num_sequences)
        out = np.empty_like(offsets)
        for e in np.unique(epochs):
            mask = epochs == e
            out[mask] = permute(offsets[mask].astype(np.uint64), self.num_sequences, self.seed, int(e))
        return out

    def _shard(self, k: int) -> np.memmap:
        """Shard k, memory-mapped on first use; at most _OPEN_SHARDS stay open (each holds a file
        descriptor, and a large corpus has thousands of shards)."""
        if k in self._maps:
            self._maps.move_to_end(k)
        else:
            if len(self._maps) >= _OPEN_SHARDS:
                self._maps.popitem(last=False)
            self._maps[k] = np.memmap(self._files[k], dtype=self._dtype, mode="r")
        return self._maps[k]

    def _gather(self, windows: np.ndarray):
        """(B,) window indices -> x, y torch int64 (B, T)."""
        import torch

        T = self.seq_len
        buf = np.empty((len(windows), T + 1), dtype=np.int64)  # (B, T+1)
        for row, w in enumerate(windows):
            start = int(w) * T
            k = int(np.searchsorted(self._starts, start, side="right")) - 1
            local, filled = start - int(self._starts[k]), 0
            while filled < T + 1:  # a window may continue into the next shard(s)
                piece = self._shard(k)[local : local + T + 1 - filled]
                buf[row, filled : filled + len(piece)] = piece
                filled, k, local = filled + len(piece), k + 1, 0
        t = torch.from_numpy(buf)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    # --- infinite training stream -----------------------------------------------------------------
    def __iter__(self) -> TokenLoader:
        return self

    def __next__(self):
        per_rank = self.global_batch_size // self.world_size
        first = self.position + self.rank * per_rank + self.micro * self.micro_batch_size
        positions = np.arange(first, first + self.micro_batch_size, dtype=np.int64)
        self.micro += 1
        if self.micro == self.micro_steps:
            self.position, self.micro = self.position + self.global_batch_size, 0
        return self._gather(self._window_ids(positions))

    def state_dict(self) -> dict:
        """Global position in the stream (JSON-safe, the same on every rank at a step boundary)."""
        consumed = self.position
        return {
            "version": STATE_VERSION,
            "sequences_consumed": consumed,
            "epoch": consumed // self.num_sequences,
            "micro": self.micro,
            "global_batch_size": self.global_batch_size,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_sequences": self.num_sequences,
            "data": self._fingerprint,
            # only needed to resume in the middle of a step (same ranks and micro batch size then):
            "world_size": self.world_size,
            "micro_batch_size": self.micro_batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue the global stream from `state`; any world size and batch size work at a step boundary
        as long as the stream (data, seq_len, seed, shuffle) is the same: the next step reads the global
        batch that starts at the saved position, split among this loader's ranks."""
        try:
            mine = self.state_dict()
            for key in ("version", "seq_len", "seed", "shuffle", "num_sequences", "data"):
                if state[key] != mine[key]:
                    raise UserError(
                        f"loader state does not match this data/loader: {key} was {state[key]!r}, "
                        f"now {mine[key]!r} (resuming would not continue the same token stream)"
                    )
            consumed, micro = state["sequences_consumed"], state["micro"]
            if not all(type(v) is int for v in (consumed, micro)):  # not "5", 4.7 (cut to 4) or True
                raise TypeError(f"sequences_consumed={consumed!r} and micro={micro!r} must be integers")
            out_of_range = UserError(
                f"loader state out of range: sequences_consumed={consumed}, micro={micro} "
                f"(a step here has {self.micro_steps} micro-batches per rank)"
            )
            if consumed < 0 or micro < 0:
                raise out_of_range
            if micro and (state["world_size"], state["micro_batch_size"], state["global_batch_size"]) != (
                self.world_size,
                self.micro_batch_size,
                self.global_batch_size,
            ):
                raise UserError(
                    "loader state was saved in the middle of a step: resume with the same world size, "
                    "micro and global batch size, or from a step boundary"
                )
            if micro >= self.micro_steps:
                raise out_of_range
        except KeyError as e:
            raise UserError(f"loader state lacks {e}: not a TokenLoader state") from e
        except (TypeError, ValueError) as e:
            raise UserError(f"not a TokenLoader state: {type(state).__name__} ({e})") from e
        self.position, self.micro = consumed, micro

    # --- one finite pass (evaluation) ----------------------------------------------------------------
    def micro_batches(self, indices: Iterable[int]) -> Iterator:
        """The micro-batches at `indices` of one in-order pass over the split, as one process numbers them
        (batch i holds windows [i·mb, (i+1)·mb), the last one may be short): ranks that take turns at
        scoring a split read only their own batches."""
        count = -(-self.num_sequences // self.micro_batch_size)
        for i in indices:
            if not 0 <= i < count:
                raise IndexError(f"micro-batch {i} of a pass that has {count}")
            start = i * self.micro_batch_size
            stop = min(start + self.micro_batch_size, self.num_sequences)
            yield self._gather(self._window_ids(np.arange(start, stop, dtype=np.int64)))

    def epoch(self) -> Iterator:
        """One pass over the split's windows (epoch 0 order), this rank's share of each global batch;
        the last global batch may be short and split unevenly."""
        n, gb = self.num_sequences, self.global_batch_size
        for first in range(0, n, gb):
            size = min(gb, n - first)
            bounds = np.linspace(0, size, self.world_size + 1).astype(
                np.int64
            )  # equal slices when size == gb
            lo, hi = first + bounds[self.rank], first + bounds[self.rank + 1]
            for start in range(lo, hi, self.micro_batch_size):
                positions = np.arange(start, min(start + self.micro_batch_size, hi), dtype=np.int64)
                yield self._gather(self._window_ids(positions))
