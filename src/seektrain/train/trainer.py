"""The training loop: set up a run, step, log, evaluate, checkpoint, guard, resume.

`Trainer(cfg, run_dir, resume).fit()` returns the process exit code (0, or 130/143 after
SIGINT/SIGTERM once a checkpoint is written). Everything is validated before anything is written,
so bad input never harms an existing run directory: a new run (`--resume never`, or another run's
checkpoint) is refused where a run already is. The gradient path of one step lives in `step.py`; this
file is the loop around it.

Under torchrun every rank runs this same loop on its slice of each global batch (DDP or FSDP2 applied
from outside the model, `distributed/`); rank 0 alone prints and writes run files, and every decision
(guard, stop on a signal) is taken from all-reduced values, so the ranks never diverge. The setup
fails on all ranks or none (`agree`), so a bad input is reported once, by rank 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch

from seektrain.checkpoint.manager import CheckpointManager, load_checkpoint, resolve_resume
from seektrain.checkpoint.sharded import load_training_state, save_training_state
from seektrain.config import RunConfig
from seektrain.data.shards import TOKENIZER_FILE, load_manifest
from seektrain.distributed import parallelize
from seektrain.distributed.env import (
    DistEnv,
    agree,
    build_mesh,
    detect,
    init_process_group,
    pick_device,
    ranks_on_this_host,
)
from seektrain.errors import UserError
from seektrain.host_limits import fit_torch_threads
from seektrain.paths import DirLock, atomic_write_bytes, check_writable_dir, remove_stale_temp_files
from seektrain.train import balance, resume
from seektrain.train.display import Display
from seektrain.train.guard import OK, ROLLBACK, SKIP, Guard
from seektrain.train.host_memory import RanksOnHost, check_training_state_fits, keep_freed_host_memory
from seektrain.train.metrics import METRICS_FILE, MetricsLog, flops_per_token, memory_gib, peak_flops
from seektrain.train.optim import build_optimizer
from seektrain.train.precision import resolve_precision
from seektrain.train.schedule import global_batch_at, lr_factor, mtp_weight_at, token_fraction
from seektrain.train.step import AUTOCAST_DTYPES, Stepper

DEFAULT_DATA = Path("data/stdlib")
RUN_FILES = ("config.toml", METRICS_FILE, "tb")  # what a started run leaves besides checkpoints
MAX_ROLLBACKS_TO_ONE_CHECKPOINT = 3


@dataclasses.dataclass
class Counters:
    """Loop state saved in every checkpoint (the LR schedule's state is `step`)."""

    step: int = 0  # optimizer steps done (including skipped ones)
    tokens: int = 0  # target tokens trained on in this trajectory
    skipped_steps: int = 0  # fp16 overflows (the scaler skipped the update)
    bad_steps: int = 0  # non-finite loss or gradient norm (the guard skipped the update)
    rollbacks: int = 0


def _check_sharded_fp16(cfg: RunConfig, dist: DistEnv, whose: str = "") -> None:
    """fp16's loss scaler needs the whole gradient to find an overflow: refused with FSDP/HSDP shards."""
    if dist.distributed and cfg.parallel.dp_mode != "ddp" and cfg.train.precision == "fp16":
        raise UserError(
            f"{whose}train.precision=fp16 with parallel.dp_mode={cfg.parallel.dp_mode} is not supported "
            "(the loss scaler would see only this rank's gradient shards): use bf16"
        )


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: str | os.PathLike, resume: str = "auto"):
        cfg = cfg.validate()  # as `load_config` does: a RunConfig built in Python is checked too
        self.run_dir = Path(run_dir)
        self.dist = detect()
        self.device = pick_device(cfg.train.device, self.dist.local_rank)
        if self.device.type == "cpu":
            keep_freed_host_memory()
            fit_torch_threads()
        if cfg.train.cuda_graphs and self.dist.distributed:
            raise UserError("train.cuda_graphs is single-process for now (not under torchrun)")
        if cfg.train.cuda_graphs and self.device.type != "cuda":
            raise UserError(f"train.cuda_graphs needs a CUDA GPU; this run is on {self.device.type}")
        _check_sharded_fp16(cfg, self.dist)
        init_process_group(self.dist, self.device)
        # Rank 0 holds the run dir's lock from here to the end of `fit` (a new run dir's once `fit` makes
        # it): another process's trainer there is refused before this one changes anything.
        self.run_lock = DirLock(self.run_dir, "--run-dir")
        self._found_run_dir = False  # whether the run dir was there at the start (rank 0)
        try:
            self._set_up(cfg, resume)
        except BaseException:
            self.run_lock.release()
            raise

    # --- setup -------------------------------------------------------------------------------------
    def _set_up(self, cfg: RunConfig, resume: str) -> None:
        # Ranks may see different files (a data dir on one node only): each phase fails on all or none.
        agree(self.dist, lambda: self._lock_run_dir(create=False))
        self.resume_from = agree(
            self.dist, lambda: self._find_inputs(cfg, resume), what="the checkpoint to resume from"
        )
        agree(self.dist, lambda: self._open_inputs(cfg))
        self._settle_precision()
        _check_sharded_fp16(self.cfg, self.dist, "the checkpoint's ")  # `auto` may have become fp16
        self._build()

    def _lock_run_dir(self, create: bool) -> None:
        """Rank 0 takes the run dir's lock (making the dir first with `create`), then cleans up after a
        killed trainer there: a checkpoint it was replacing is put back, its temporary files go. A run
        dir that another trainer made and filled after this one found none is refused. Once per trainer:
        at its start where the dir was there, else in `fit`."""
        if not self.dist.is_main or self._found_run_dir:
            return
        if create:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UserError(f"--run-dir {self.run_dir}: cannot create it ({e.strerror or e})") from e
        elif not self.run_dir.is_dir():
            return
        self.run_lock.acquire()
        if create and any((self.run_dir / name).exists() for name in (*RUN_FILES, "checkpoints")):
            raise UserError(
                f"{self.run_dir} was not there when this run started, and another trainer has written "
                "a run there since: run the command again to continue that run, or use another --run-dir"
            )
        self._found_run_dir = True  # this trainer's from here (a second `fit` finds its own files)
        with contextlib.suppress(OSError):  # a folder it cannot change: the checks that follow say so
            CheckpointManager(self.run_dir / "checkpoints", keep=1).recover()
            remove_stale_temp_files(self.run_dir)

    def _find_inputs(self, cfg: RunConfig, resume_option: str) -> Path | None:
        """The checkpoint to resume from (None: a new run), after refusing to start a new run over one
        already in the run directory; rank 0 prepares the default corpus when it is missing (after every
        check that needs no data)."""
        model = cfg.model_config()  # the data sets the vocabulary, not these
        if cfg.data.seq_len > model.max_position_embeddings:
            raise UserError(
                f"data.seq_len={cfg.data.seq_len} is longer than the model's context, "
                f"model.max_position_embeddings={model.max_position_embeddings}"
            )
        if model.num_mtp_layers >= cfg.data.seq_len:  # depth k predicts token t+1+k of the sequence
            raise UserError(
                f"data.seq_len={cfg.data.seq_len} leaves multi-token prediction depth "
                f"{model.num_mtp_layers} no token to predict: raise data.seq_len above "
                f"model.num_mtp_layers={model.num_mtp_layers}, or lower that"
            )
        check_writable_dir(self.run_dir, "--run-dir")
        # a file there, or a folder that takes no files, found now: not at the first save, steps later
        check_writable_dir(self.run_dir / "checkpoints", "checkpoint directory")
        resume_from = resolve_resume(resume_option, self.run_dir)
        foreign = resume_from is not None and not _belongs_to(resume_from, self.run_dir)
        if resume_option == "never" or foreign:
            _refuse_to_overwrite(self.run_dir, resume_option)
        data_dir = Path(cfg.data.path)
        missing = not (data_dir / "manifest.json").exists()
        if self.dist.is_main and missing and data_dir.resolve() == DEFAULT_DATA.resolve():
            self._prepare_default(cfg, resume_from)
        return resume_from

    def _prepare_default(self, cfg: RunConfig, resume_from: Path | None) -> None:
        """Prepare the stdlib into the missing default data dir (~10-45 s), once what would refuse this
        run afterwards has been checked: that it continues its checkpoint's model and optimizer, and (one
        process on CPU: the check by ranks is collective) that it fits in host memory."""
        from seektrain.data.prepare import PrepareConfig, prepare

        corpus = PrepareConfig(inputs=["stdlib"], out_dir=cfg.data.path, progress=cfg.log.progress)
        if resume_from is not None:
            resume.check_before_data(resume_from, cfg)
        if self.device.type == "cpu" and not self.dist.distributed:
            self._check_host_memory(_with_data_vocab(cfg, corpus.vocab_size, 0, {}))
        print(f"{cfg.data.path} is missing: preparing Python's standard library as the default corpus")
        prepare(corpus)

    def _open_inputs(self, cfg: RunConfig) -> None:
        """The training loader, the config completed from the data, and the state to resume."""
        t = cfg.train
        unit = t.micro_batch_size * self.dist.world_size
        if t.global_batch_size % unit:
            raise UserError(
                f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                f"train.micro_batch_size × ranks = {t.micro_batch_size} × {self.dist.world_size}"
            )
        if t.batch_ramp_steps and t.batch_ramp_start % unit:
            raise UserError(
                f"train.batch_ramp_start={t.batch_ramp_start} is not a multiple of "
                f"train.micro_batch_size × ranks = {t.micro_batch_size} × {self.dist.world_size}"
            )
        from seektrain.data.loader import TokenLoader

        # The loader serves the global stream in units of one micro-batch per rank; a step takes as many
        # units as its global batch needs (which the batch-size ramp varies).
        self.loader = TokenLoader(
            cfg.data.path,
            split="train",
            seq_len=cfg.data.seq_len,
            micro_batch_size=t.micro_batch_size,
            global_batch_size=unit,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            seed=t.seed,
            shuffle=True,
        )
        loader = self.loader
        self.cfg = _with_data_vocab(cfg, loader.vocab_size, loader.eos_id, loader.special_ids)
        self.model_cfg = self.cfg.model_config()
        self.notes: list[str] = []  # said once the run starts (rank 0)
        self.val = self._open_val(cfg)
        self.resume_state = None
        if self.resume_from is not None:
            self.resume_state = load_checkpoint(self.resume_from)
            saved = self.resume_state["config"]
            resume.check_same_model(saved["model"], self.cfg, self.resume_from)
            resume.check_same_optimizer(saved["optim"], self.cfg, self.resume_from)
            stream = self.resume_state["loader"]
            resume.check_same_stream(stream, self.loader.state_dict(), self.cfg, self.resume_from)
            self.loader.load_state_dict(stream)  # validates the rest of its state
            self.notes += resume.validation_change(saved["train"], self.cfg, self.val)

    def _open_val(self, cfg: RunConfig):
        """The validation split, its shards checked once as the train split's are (a missing or damaged
        one is an error, not a run without val_loss); None, with a note, where it has no sequence."""
        from seektrain.data.loader import TokenLoader

        split = load_manifest(cfg.data.path)["splits"].get("val")
        tokens = sum(s["tokens"] for s in split["shards"]) if split else 0
        if tokens <= cfg.data.seq_len:
            has = "no validation split" if split is None else f"{tokens} validation tokens"
            self.notes.append(
                f"{cfg.data.path} has {has}, fewer than seq_len + 1 = {cfg.data.seq_len + 1}: no val_loss in "
                "this run (prepare the data with a larger --val-fraction to have one)"
            )
            return None
        # in one process's order, whatever the number of ranks (see `evaluate`)
        return TokenLoader(
            cfg.data.path,
            split="val",
            seq_len=cfg.data.seq_len,
            micro_batch_size=cfg.train.micro_batch_size,
            shuffle=False,
        )

    def _check_host_memory(self, cfg: RunConfig) -> None:
        """On CPU, refuse a model whose training state cannot fit in this host's memory, counting every
        rank on the host with what it holds (`check_training_state_fits`); the ranks agree, so they fail
        together."""
        dist, p, model = self.dist, cfg.parallel, cfg.model_config()
        layout = None
        if dist.distributed:
            shard = {"ddp": 1, "fsdp": dist.world_size, "hsdp": p.dp_shard or dist.local_world_size}
            ranks = ranks_on_this_host(dist)
            layout = RanksOnHost(p.dp_mode, ranks, shard[p.dp_mode], model.tie_word_embeddings)
        relief = layout.relief() if layout is not None else ""
        agree(
            dist,
            lambda: check_training_state_fits(
                model.num_params(include_mtp=True),
                state_bytes=cfg.optim.state_bytes_per_param(),
                what="the model",
                hint=f"use a smaller model (model.* settings){relief}, or a machine with more memory",
                layout=layout,
            ),
        )

    def _settle_precision(self) -> None:
        """Replace `auto` in the config by the precision that runs, which the run directory then records:
        a resumed run keeps the one its checkpoint trained in (so it continues exactly, on any host), a
        new run takes what `auto` stands for on this device. Every rank must come to the same."""
        t = self.cfg.train
        self.precision_note = ""
        if t.precision != "auto":
            return
        saved = self.resume_state["config"]["train"].get("precision") if self.resume_state else None
        kept = saved in AUTOCAST_DTYPES
        self.precision_note = " (auto: the checkpoint's)" if kept else " (auto)"
        precision = agree(
            self.dist,
            lambda: saved if kept else resolve_precision("auto", self.device),
            what="the precision train.precision=auto stands for on their devices (set it explicitly)",
        )
        self.cfg = dataclasses.replace(self.cfg, train=dataclasses.replace(t, precision=precision))

    def _build(self) -> None:
        t = self.cfg.train
        _seed_everything(t.seed)
        with torch.device("meta"):
            from seektrain.model.transformer import Transformer

            model = Transformer(self.model_cfg)
        self.model = model  # the model itself; `self.stepper.model` is what a step calls
        if t.activation_checkpointing != "none":
            parallelize.apply_activation_checkpointing(model, t.activation_checkpointing)
        if t.compile:
            parallelize.apply_compile(model, cuda_graphs=t.cuda_graphs)
        p = self.cfg.parallel
        fsdp = self.dist.distributed and p.dp_mode != "ddp"
        mesh = build_mesh(self.dist, self.device, p.dp_mode, p.dp_shard) if fsdp else None
        # FSDP2 shards the empty model first, so each rank allocates and initializes only its shards (a
        # tied head is re-tied by init_weights, which FSDP2 would not follow: that model is sharded after).
        shard_first = fsdp and not self.model_cfg.tie_word_embeddings
        if self.device.type == "cpu":
            self._check_host_memory(self.cfg)
        parallelize.materialize(model, self.device, mesh if shard_first else None, t.precision)
        wrapped = model
        if fsdp and not shard_first:
            parallelize.apply_fsdp(model, mesh, t.precision)
        elif self.dist.distributed and not fsdp:
            wrapped = parallelize.apply_ddp(model, self.device)
        self.optimizer = build_optimizer(model, self.cfg.optim)  # after FSDP2: over the sharded parameters
        self.stepper = Stepper(
            wrapped,
            self.optimizer,
            t.precision,
            self.device,
            t.grad_clip,
            self.dist.world_size,
            cuda_graphs=t.cuda_graphs,
        )
        self.guard = Guard(t.max_bad_steps, t.spike_zscore, t.spike_window)
        self.counters = Counters()
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", self.cfg.checkpoint.keep)
        self.async_group = None  # asynchronous checkpoints: their own gloo group (new_group is collective)
        if self.dist.distributed and self.cfg.checkpoint.async_save:
            self.async_group = torch.distributed.new_group(backend="gloo")
        self.rollback_targets: dict[int, int] = {}
        self._token_fraction = token_fraction(t, self.dist.world_size)  # for the multistep schedule
        if self.resume_state is not None:
            # the loader was restored above, before the model existed
            self._load_state(self.resume_from, self.resume_state, restore_loader=False)
            self.resume_state = None
        self.flops_per_token = flops_per_token(self.model_cfg, self.cfg.data.seq_len)
        self.peak = peak_flops(self.device)

    # --- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resume needs; under torchrun without model and optimizer, which every rank
        writes sharded (`save_checkpoint`)."""
        state = {}
        if not self.dist.distributed:
            state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        state.update(
            {
                "scaler": self.stepper.scaler.state_dict(),
                "loader": self.loader.state_dict(),
                "rng": _rng_state(),
                "counters": dataclasses.asdict(self.counters),
                "guard": self.guard.state_dict(),
                "rollbacks_to": {str(k): v for k, v in self.rollback_targets.items()},  # the limit's count
                "config": self.cfg.to_dict(),
            }
        )
        return state

    def _load_state(self, path: Path, state: dict, restore_loader: bool) -> None:
        """Restore the checkpoint at `path` (`state`: its state.pt). One process reading a one-process
        checkpoint loads it directly; any other pairing (sharded, or N -> M ranks) goes through DCP."""
        settings = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        if not self.dist.distributed and "model" in state:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        else:
            load_training_state(path, self.stepper.model, self.optimizer, state)
        _keep_group_settings(self.optimizer, settings)
        if state["scaler"] or not self.stepper.scaler.is_enabled():
            self.stepper.scaler.load_state_dict(state["scaler"])
        # else: fp16 now, bf16 or fp32 before (a disabled scaler saves {}): the scale starts afresh
        if restore_loader:
            self.loader.load_state_dict(state["loader"])
        _set_rng_state(state["rng"])
        self.counters = Counters(**state["counters"])
        self.guard.load_state_dict(state["guard"])
        self.rollback_targets = {int(k): v for k, v in state.get("rollbacks_to", {}).items()}

    def save_checkpoint(self) -> Path:
        c = self.counters
        meta = {"tokens": c.tokens, "time": time.time()}
        if not self.dist.distributed:
            return self.checkpoints.save(c.step, self.state_dict(), self.cfg.to_toml(), meta)
        meta["world_size"] = self.dist.world_size
        return self.checkpoints.save_sharded(
            c.step,
            lambda tmp: save_training_state(tmp, self.stepper.model, self.optimizer, self.async_group),
            self.state_dict(),
            self.cfg.to_toml(),
            meta,
            self.dist.is_main,
        )

    # --- the loop ----------------------------------------------------------------------------------
    def fit(self) -> int:
        try:
            return self._fit()
        finally:
            self.close()

    def close(self) -> None:
        """Let go of the run dir (its lock), for a trainer used without `fit`, which does it itself."""
        self.run_lock.release()

    def _fit(self) -> int:
        t, c = self.cfg.train, self.counters
        if c.step >= t.steps:
            if self.dist.is_main:
                print(
                    f"{self.run_dir} is complete at step {c.step} (train.steps={t.steps}); nothing to do. "
                    "Raise train.steps to continue, or use another --run-dir."
                )
            return 0
        agree(self.dist, lambda: self._lock_run_dir(create=True))  # held already where the dir was
        if self.dist.is_main:
            abandoned = []
            try:
                own = self.resume_from is not None and _belongs_to(self.resume_from, self.run_dir)
                if self.resume_from is None or own:
                    abandoned = self.checkpoints.set_aside_after(c.step)  # as metrics.jsonl is cut back
                atomic_write_bytes(self.run_dir / "config.toml", self.cfg.to_toml().encode())
                self.notes += _keep_tokenizer(Path(self.cfg.data.path), self.run_dir, fresh=not own)
                if self.run_lock.unsupported:
                    self.notes.append(self.run_lock.unsupported)
                self.metrics = MetricsLog(
                    self.run_dir, c.step if self.resume_from else -1, self.cfg.log.tensorboard
                )
            except OSError as e:
                where = e.filename or self.run_dir
                raise UserError(f"--run-dir {self.run_dir}: cannot write {where}: {e.strerror or e}") from e
            self.display = Display(t.steps, c.step, self.cfg.log.progress)
            for note in self.notes:
                self.display.print(f"note: {note}")
            for path, missing in abandoned:
                if missing:
                    why = f"lacks {', '.join(missing)}: not a complete checkpoint, so not resumed from"
                else:
                    why = "is newer than the checkpoint resumed from"
                self.display.print(f"note: {path.name} {why}: moved to {path}")
        else:
            self.metrics = self.display = _Silent()
        self._announce()
        stop = _SignalFlag(announce=self.dist.is_main)
        try:
            if c.step == 0:
                self._evaluate()
            exit_code = self._loop(stop)
            self.checkpoints.finish_pending()  # an asynchronous checkpoint still being written
        except BrokenPipeError:  # stdout's reader went away: the CLI ends quietly (141)
            raise
        except OSError as e:  # a full disk under metrics.jsonl or TensorBoard, a data shard gone: one line
            where = e.filename or self.run_dir
            raise UserError(f"{where}: {e.strerror or e} (checkpoints already written are intact)") from e
        finally:
            stop.restore()
            self.display.close()
            self.metrics.close()
        return exit_code

    def _loop(self, stop: _SignalFlag) -> int:
        t, ck = self.cfg.train, self.cfg.checkpoint
        window_tokens, window_time = 0, 0.0  # training tokens and seconds since the last log line
        checkpoint_due = False  # a scheduled checkpoint put off while the guard sees non-finite steps
        first_step = self.counters.step + 1  # compiles, allocates and warms caches: not timed when it
        # shares its log window with other steps (`small` on an H200: ~17 s, then 0.11 s a step)
        while self.counters.step < t.steps:
            c = self.counters
            started = time.perf_counter()
            step = c.step + 1
            step_batch = global_batch_at(step, t, self.dist.world_size)  # varies under a batch ramp
            n_units = step_batch // (t.micro_batch_size * self.dist.world_size)
            batches = [next(self.loader) for _ in range(n_units)]
            mtp_weight = mtp_weight_at(step, t.steps, t.mtp_weight_schedule, self.model_cfg.mtp_loss_weight)
            stats = self.stepper.forward_backward(batches, mtp_weight, self.model_cfg.num_mtp_layers)
            grad_norm = stats.grad_norm
            self.stepper.clip()
            lr = self.cfg.optim.lr * lr_factor(
                step, t.steps, self.cfg.optim, self._token_fraction
            )
            loss_ok = math.isfinite(stats.loss) and math.isfinite(stats.mtp_loss)
            if t.precision == "fp16" and loss_ok and not math.isfinite(grad_norm):
                decision = OK  # an overflow: the scaler skips the update and backs off
            else:
                decision = self.guard.check(stats.loss if loss_ok else math.nan, grad_norm)
            if decision == SKIP and step == t.steps:  # a run must not end on weights that give NaN
                decision = ROLLBACK
                self.guard.last_reason = f"the last step was non-finite ({self.guard.last_reason})"
            if decision == ROLLBACK:
                self.stepper.discard()  # every forward_backward ends in apply() or discard()
                self._rollback(step, self.guard.last_reason)
                checkpoint_due = False  # the rollback wrote one
                continue
            c.step = step
            if decision == SKIP:
                self.stepper.discard()
                c.bad_steps += 1
                self.metrics.write({"step": step, "event": "skip", "reason": self.guard.last_reason})
                self.display.print(f"step {step}: skipped ({self.guard.last_reason})")
            elif self.stepper.apply(lr):
                balance.update_expert_bias(self.model.moe_layers(), stats.expert_counts, t.bias_update_speed)
                balance.update_expert_bias(
                    self.model.mtp_moe_layers(), stats.mtp_expert_counts, t.bias_update_speed
                )
            else:
                c.skipped_steps += 1
            c.tokens += stats.tokens
            if step != first_step or step % t.log_every == 0 or step == t.steps:
                window_tokens += stats.tokens
                window_time += time.perf_counter() - started  # evaluation and checkpoints not included

            if step % t.log_every == 0 or step == t.steps:
                speed = window_tokens / window_time if window_time > 0 else 0.0
                self._log_step(stats, grad_norm, lr, mtp_weight, speed, step_batch)
                window_tokens, window_time = 0, 0.0
            self.display.update(step, stats.loss, None)
            # This step's own loss came before its update: weights the update diverged, saved, would be a
            # checkpoint no rollback gets past. So a non-finite loss after it rolls back at once.
            diverged = None
            if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
                val_loss = self._evaluate()
                if val_loss is not None and not math.isfinite(val_loss):
                    diverged = f"val_loss {val_loss} after the update"
            save = False
            if checkpoint_due or step % ck.every == 0 or step == t.steps:
                # Weights that just gave a non-finite loss are not saved on schedule: a rollback to them
                # would land in the same divergence (and never reach the rollback limit).
                checkpoint_due = self.guard.consecutive_bad > 0
                save = not checkpoint_due and diverged is None
                if save and (diverged := self._diverged_after_update(batches[0])):
                    save = False
            if diverged is not None:
                self._rollback(step, diverged)
                checkpoint_due = False
                continue
            if save:
                self.save_checkpoint()
            if step < t.steps and self._stopping(stop):  # at the last step the run is done anyway
                if not save:  # the resume point: these weights if they score finite outside a bad streak,
                    # else the last checkpoint's, which the rollback saves with the data position
                    if bad := self.guard.consecutive_bad:
                        why = f"stopped after {bad} non-finite steps"
                    else:
                        why = self._diverged_after_update(batches[0])
                    if why is None:
                        self.save_checkpoint()
                    else:
                        self._rollback(step, why)
                name, step = signal.Signals(stop.signum).name, self.counters.step
                self.metrics.write({"step": step, "event": "stopped", "signal": name})
                self.display.print(f"{name}: checkpoint written at step {step}; continue with --resume auto")
                return 128 + stop.signum
        self.display.print(
            f"done: {self.counters.step} step{'' if self.counters.step == 1 else 's'}, "
            f"{self.counters.tokens:,} tokens; run directory {self.run_dir}"
        )
        return 0

    def _log_step(self, stats, grad_norm: float, lr: float, mtp_weight: float, speed: float, gb: int) -> None:
        c = self.counters
        record = {
            "step": c.step,
            "tokens": c.tokens,
            "loss": stats.loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": speed,
            "mem_gib": memory_gib(self.device),
        }
        if self.model_cfg.num_mtp_layers:
            record.update(mtp_loss=stats.mtp_loss, mtp_weight=mtp_weight)
        if stats.expert_counts.numel():
            record["expert_max_violation"] = balance.max_violation(stats.expert_counts)
        if self.model_cfg.seq_aux_loss_alpha:
            record["balance_loss"] = stats.balance_loss
        if self.peak:
            record["mfu"] = speed * self.flops_per_token / self.peak
        if self.cfg.train.batch_ramp_steps:
            record["global_batch"] = gb
        if self.stepper.scaler.is_enabled():
            record["loss_scale"] = self.stepper.scaler.get_scale()
        record.update(skipped_steps=c.skipped_steps, bad_steps=c.bad_steps, rollbacks=c.rollbacks)
        self.metrics.write(record, tb_prefix="train")
        self.display.update(c.step, stats.loss, speed)
        line = (
            f"step {c.step:>6}  loss {stats.loss:.4f}  lr {lr:.2e}  grad_norm {grad_norm:.3f}  "
            f"{speed:,.0f} tok/s"
        )
        if "expert_max_violation" in record:
            line += f"  maxvio {record['expert_max_violation']:.2f}"
        self.display.print(line)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean main-model cross-entropy on (the first `eval_batches` micro-batches of) the val split."""
        from seektrain.model.cross_entropy import IGNORE_INDEX

        t, val = self.cfg.train, self.val
        if val is None:
            return None  # no validation split (said at the start)
        # Ranks take the micro-batches in turns, so together they score exactly those one process would,
        # a short last one included. Every rank runs as many forwards (FSDP2 gathers parameters
        # collectively): a rank left without a batch scores one whose targets are all ignored.
        ranks, rank = self.dist.world_size, self.dist.rank
        n_batches = -(-val.num_sequences // t.micro_batch_size)
        if t.eval_batches:
            n_batches = min(n_batches, t.eval_batches)
        mine = val.micro_batches(range(rank, n_batches, ranks))
        self.stepper.model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # (loss sum, target count)
        for _ in range(-(-n_batches // ranks)):
            x, y = next(mine, (None, None))
            if x is None:  # a training micro-batch's shape: no new shape for compiled blocks to take
                x = torch.zeros(t.micro_batch_size, self.cfg.data.seq_len, dtype=torch.int64)
                y = torch.full_like(x, IGNORE_INDEX)
            out = self._forward(x, y, mtp=False)
            sums += torch.stack([out.main_loss_sum.double(), out.main_count.double()])
        self.stepper.model.train()
        if ranks > 1:
            torch.distributed.all_reduce(sums)
        total, count = sums.tolist()
        return total / count if count else None

    @torch.no_grad()
    def _diverged_after_update(self, batch: tuple[torch.Tensor, torch.Tensor]) -> str | None:
        """Why the weights the step just left must not be saved, or None: the training loss (main model
        and MTP) of the step's first micro-batch, scored again on them and summed over the ranks, is not
        finite (the step's own loss came before its update). MTP included: its modules can diverge while
        the main model's loss stays finite."""
        self.stepper.model.eval()
        loss = self._forward(*batch, mtp=True).loss.detach().double().reshape(1)
        self.stepper.model.train()
        if self.dist.world_size > 1:
            torch.distributed.all_reduce(loss)
        return None if math.isfinite(loss.item()) else f"loss {loss.item()} after the update"

    def _forward(self, x: torch.Tensor, y: torch.Tensor, mtp: bool):
        """The model's forward with losses, as a step runs it (autocast), outside a step."""
        if self.stepper.cuda_graphs:
            # One graph generation per forward. Unmarked, every block call without a pending backward
            # would start a new one and invalidate the previous block's output.
            torch.compiler.cudagraph_mark_step_begin()
        with self.stepper.autocast():
            return self.stepper.model(x.to(self.device), y.to(self.device), mtp=mtp)

    def _evaluate(self) -> float | None:
        val_loss = self.evaluate()
        if val_loss is not None:
            self.metrics.write({"step": self.counters.step, "val_loss": val_loss}, tb_prefix="eval")
            self.display.print(f"step {self.counters.step:>6}  val_loss {val_loss:.4f}")
        return val_loss

    def _rollback(self, bad_step: int, reason: str) -> None:
        """Reload the newest checkpoint but keep the loader where it is: the data window since the
        checkpoint, which caused the spike, is skipped. The new position is saved at once."""
        self.checkpoints.finish_pending()
        latest = self.checkpoints.latest()
        if latest is None:
            raise UserError(
                f"training diverged at step {bad_step} ({reason}) before the first checkpoint; "
                "lower optim.lr or raise optim.warmup_steps"
            )
        state = load_checkpoint(latest)
        to_step = state["counters"]["step"]
        self.rollback_targets[to_step] = self.rollback_targets.get(to_step, 0) + 1
        if self.rollback_targets[to_step] > MAX_ROLLBACKS_TO_ONE_CHECKPOINT:
            older = self.checkpoints.list()[-2:-1]
            back = f" (or resume from before it: --resume {older[0]})" if older else ""
            raise UserError(
                f"rolled back to step {to_step} {MAX_ROLLBACKS_TO_ONE_CHECKPOINT} times and the "
                f"loss still diverges ({reason}); lower optim.lr{back}"
            )
        old, targets = self.counters, self.rollback_targets
        self._load_state(latest, state, restore_loader=False)
        self.rollback_targets = targets  # the count goes on (the checkpoint holds the one before)
        self.counters.skipped_steps, self.counters.bad_steps = old.skipped_steps, old.bad_steps
        self.counters.rollbacks = old.rollbacks + 1
        self.guard.reset_bad()
        self.metrics.rewind(to_step)
        event = {
            "step": to_step,
            "event": "rollback",
            "reason": reason,
            "at_step": bad_step,
            "checkpoint": latest.name,
            "skipped_data_steps": bad_step - to_step,
        }
        self.metrics.write(event)
        self.display.print(
            f"ROLLBACK at step {bad_step}: {reason}; reloaded {latest.name} and skipped the "
            f"data of steps {to_step + 1}..{bad_step}"
        )
        self.save_checkpoint()

    def _stopping(self, stop: _SignalFlag) -> bool:
        """Whether any rank got SIGINT/SIGTERM, or rank 0 lost its stdout's reader (as SIGPIPE). They
        may come at different steps on different ranks, so the ranks agree through an all-reduce before
        one of them checkpoints and leaves."""
        if self.display.closed and stop.signum is None:
            stop.signum = signal.SIGPIPE
        if not self.dist.distributed:
            return stop.signum is not None
        flag = torch.tensor([stop.signum or 0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if not int(flag):
            return False  # and a signal that came in during the all-reduce stays set, for the next step
        stop.signum = int(flag)
        return True

    def _announce(self) -> None:
        m, t = self.model_cfg, self.cfg.train
        what = f"resuming {self.resume_from} at step {self.counters.step}" if self.resume_from else "new run"
        threads = torch.get_num_threads()
        cpu_threads = f" ({threads} thread{'s' if threads > 1 else ''})" if self.device.type == "cpu" else ""
        self.display.print(
            f"seektrain train: {what} in {self.run_dir}\n"
            f"  model {self.cfg.model.preset}: {m.num_params(include_mtp=True) / 1e6:.2f}M parameters "
            f"({m.num_active_params() / 1e6:.2f}M active), vocab {m.vocab_size}\n"
            f"  data {self.cfg.data.path}: seq_len {self.cfg.data.seq_len}, "
            f"global batch {t.global_batch_size} (micro {t.micro_batch_size}), {t.steps} steps\n"
            f"  {self.device.type}{cpu_threads}, {t.precision}{self.precision_note}, "
            f"optimizer {self.cfg.optim.name}, "
            f"schedule {self.cfg.optim.schedule}, lr {self.cfg.optim.lr}"
            + (
                f"\n  {self.dist.world_size} rank{'s' if self.dist.world_size > 1 else ''}, "
                f"{self.cfg.parallel.dp_mode}"
                f" ({t.global_batch_size // self.dist.world_size} sequences per rank per step)"
                if self.dist.distributed
                else ""
            )
        )
        p = self.cfg.parallel
        if self.dist.distributed and p.dp_shard and p.dp_mode != "hsdp":
            self.display.print(
                f"  warning: parallel.dp_shard={p.dp_shard} applies to parallel.dp_mode=hsdp only; "
                f"ignored under {p.dp_mode}"
            )
        o = self.cfg.optim
        if o.warmup_steps > t.steps:
            self.display.print(
                f"  warning: optim.warmup_steps={o.warmup_steps} > train.steps={t.steps}: the learning rate "
                f"never reaches optim.lr={o.lr} (lower the warmup or raise the steps)"
            )


# --- helpers -----------------------------------------------------------------------------------------


_AGAIN = "Ctrl-C again: at once, without one"


class _SignalFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the end of the current step and exits. A second
    Ctrl-C to this process stops it at once, without that checkpoint; any other repeat (a scheduler's
    second SIGTERM, torchrun forwarding the terminal's Ctrl-C as SIGTERM) changes nothing, so the
    checkpoint is not lost to it. `signum` may also be set by the ranks' agreement (`Trainer._stopping`):
    a rank's own first Ctrl-C after that is no repeat."""

    def __init__(self, announce: bool):
        self.signum: int | None = None
        self._announce = announce  # rank 0 says what the first signal does
        self._received: set[int] = set()  # the signals this process got
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and signum in self._received:
            raise KeyboardInterrupt
        self._received.add(signum)
        if self.signum is None:
            self.signum = signum
            if self._announce:  # os.write: not inside a print the signal may have interrupted
                name = signal.Signals(signum).name
                line = f"{name}: stopping after this step, with a checkpoint ({_AGAIN})\n"
                with contextlib.suppress(OSError):  # stderr closed or its reader gone: the stop goes on
                    os.write(2, line.encode())

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class _Silent:
    """Stands in for the display and the metrics log on ranks other than 0."""

    closed = False

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def _belongs_to(checkpoint: Path, run_dir: Path) -> bool:
    return checkpoint.resolve().parent == (run_dir / "checkpoints").resolve()


def _refuse_to_overwrite(run_dir: Path, resume: str) -> None:
    """`--resume never`, or a checkpoint of another run, starts a new run: never over an existing one
    (its metrics.jsonl, TensorBoard events and checkpoint retention would be mixed up or lost)."""
    newest = CheckpointManager(run_dir / "checkpoints", keep=1).latest()
    files = [name for name in RUN_FILES if (run_dir / name).exists()]
    if newest is None and not files:
        return
    if newest is not None:
        holds, instead = f"checkpoints up to {newest.name}", "continue it with --resume auto"
    elif resume == "never":
        holds, instead = f"{', '.join(files)}; no checkpoint yet", "start it over with --resume auto"
    else:  # a run started from another run's checkpoint that stopped before its own first checkpoint
        holds = f"{', '.join(files)}; no checkpoint yet"
        instead = f"remove {', '.join(files)} there to start it over from {resume}"
    raise UserError(
        f"{run_dir} already holds a run ({holds}) and --resume {resume} would start a new one over it: "
        f"choose another --run-dir, or {instead}"
    )


def _keep_tokenizer(data_dir: Path, run_dir: Path, fresh: bool) -> list[str]:
    """Keep the data's tokenizer in the run dir, where generate, eval and export look first, so that the run
    stays usable after its data dir is prepared again (perhaps with another tokenizer of the same size,
    which nothing else would catch) or removed. A new run takes the data's; a resumed one keeps its own.
    A note where there is none to keep."""
    kept = run_dir / TOKENIZER_FILE
    if kept.is_file() and not fresh:
        return []
    kept.unlink(missing_ok=True)  # a stale one, left by an earlier run in this directory
    source = data_dir / TOKENIZER_FILE
    if not source.is_file():
        return [f"{data_dir} has no {TOKENIZER_FILE}: generate and export of this run will need --tokenizer"]
    tokenizer = source.read_bytes()
    recorded = load_manifest(data_dir).get("tokenizer", {}).get("sha256")
    if recorded is not None and hashlib.sha256(tokenizer).hexdigest() != recorded:
        return [
            f"{source} is not the tokenizer {data_dir}'s shards were made with (its sha256 is not the one in "
            "manifest.json): not kept with this run; generate and export of it will need --tokenizer FILE"
        ]
    atomic_write_bytes(kept, tokenizer)
    return []


def _with_data_vocab(
    cfg: RunConfig, vocab_size: int, eos_id: int, special_ids: dict[str, int]
) -> RunConfig:
    """The model's vocab comes from the data's tokenizer (unless set at least as large explicitly), and so
    do its EOS, BOS and PAD ids unless set explicitly (a preset's, e.g. v2-lite's BOS 100000, belong to
    another tokenizer; a role the tokenizer lacks is None)."""
    overrides = dict(cfg.model.overrides)
    wanted = overrides.get("vocab_size")
    if wanted is not None and wanted < vocab_size:
        raise UserError(
            f"model.vocab_size={wanted} is smaller than the tokenizer's {vocab_size} "
            f"(data.path={cfg.data.path}): train on data prepared with the model's own tokenizer (a run "
            f"imported without --data keeps a preset's data.path), or raise or drop model.vocab_size"
        )
    overrides.setdefault("vocab_size", vocab_size)
    overrides.setdefault("eos_token_id", eos_id)
    overrides.setdefault("bos_token_id", special_ids.get("bos"))
    overrides.setdefault("pad_token_id", special_ids.get("pad"))
    model = dataclasses.replace(cfg.model, overrides=overrides)
    return dataclasses.replace(cfg, model=model)


def _keep_group_settings(optimizer: torch.optim.Optimizer, settings: list[dict]) -> None:
    """After loading a checkpoint's optimizer state, which brings its param groups' settings along: the
    settings of this run's config again (weight decay, betas, eps may change on resume). A step count
    that a fused or capturable kernel reads goes to its parameter's device (the load placed it by the
    checkpoint's settings)."""
    for group, wanted in zip(optimizer.param_groups, settings, strict=True):
        params = group["params"]
        group.clear()
        group.update(wanted, params=params)
        if wanted.get("fused") or wanted.get("capturable"):
            for p in params:
                state = optimizer.state.get(p, {})
                if "step" in state:
                    state["step"] = state["step"].to(torch.float32).to(p.device)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
