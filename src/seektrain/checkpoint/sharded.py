"""Model and optimizer state through torch.distributed.checkpoint (DCP): sharded, resharding on load.

A multi-rank checkpoint keeps model + optimizer in `step_XXXXXXXX/dcp/` (each rank writes its own
shards in parallel; rank 0 writes `.metadata`, the global layout). Keys are the model's own parameter
names (FQNs), whatever wraps it (DDP, FSDP2, compile), so the files can be read back by ANY number of
ranks: DCP reads the slices each rank now owns. The small rest of the state (loader, RNG, counters,
config) stays in `state.pt` beside it, written by rank 0.

`load_training_state` also loads a single-process `state.pt` (full tensors, optimizer state keyed by
position) into a DDP/FSDP2 model, which is how a 1-rank checkpoint resumes on N ranks.
"""

from __future__ import annotations

import contextlib
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from seektrain.errors import UserError, first_line

DCP_DIR = "dcp"
METADATA_FILE = ".metadata"  # written last by DCP's coordinator


# what to do with a checkpoint whose files are whole but do not read (bit rot): the one before is complete
SHELVE = "move it out of checkpoints/ to go on from the one before"


def is_sharded(path: Path) -> bool:
    return (Path(path) / DCP_DIR).is_dir()


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """{"model", "optimizer"} keyed by parameter name: DTensor shards under FSDP2, full tensors else."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}


def save_training_state(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, async_group=None
) -> Future | None:
    """Every rank writes its shards of model + optimizer under `path/dcp` (a collective call).
    With `async_group` (a gloo group used for nothing else, so its collectives never interleave with
    training's), the state is first copied to CPU memory, then written by a background thread; the
    returned Future completes when this rank's part is on disk."""
    import torch.distributed.checkpoint as dcp

    state, where = training_state(model, optimizer), Path(path) / DCP_DIR
    if async_group is None:
        dcp.save(state, checkpoint_id=where)
        return None
    return dcp.async_save(state, checkpoint_id=where, process_group=async_group)


def load_training_state(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load model + optimizer of the checkpoint at `path` (whose `state.pt` is `state`) into this
    model, however many ranks wrote it and however many read it (a collective call under torchrun)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if is_sharded(path):
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        _read_layout(path)  # damaged, DCP would log two tracebacks on every rank before it fails
        target = training_state(model, optimizer)  # tensors of the right shapes and shards to read into
        with _quiet_single_process(), _reading(path):
            dcp.load(
                target,
                checkpoint_id=Path(path) / DCP_DIR,
                planner=_load_planner(),
                no_dist=not dist.is_initialized(),
            )
        set_model_state_dict(model, target["model"])
        set_optimizer_state_dict(model, optimizer, target["optimizer"])
        return
    full = StateDictOptions(full_state_dict=True)  # every rank holds the whole tensors; each keeps its part
    set_model_state_dict(model, state["model"], options=full)
    osd = _by_name(state["optimizer"], model, optimizer)
    set_optimizer_state_dict(model, optimizer, osd, options=full)


def _load_planner():
    """DCP's default load planner, except that optimizer param-group settings the checkpoint lacks are not
    asked for (AdamW with bf16 moments keeps lr, betas, eps and weight decay; torch's AdamW adds amsgrad,
    fused, …): they keep this optimizer's values, as when a one-process checkpoint loads, where DCP would
    refuse the key. It sees the checkpoint's layout inside DCP's collective load, so a layout that cannot
    be read fails on every rank alike."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class GroupSettingsMayDiffer(DefaultLoadPlanner):
        def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
            super().set_up_planner(state_dict, metadata, is_coordinator)
            stored = metadata.state_dict_metadata if metadata is not None else {}
            self.state_dict = {
                key: value
                for key, value in self.state_dict.items()
                if key in stored or not _is_group_setting(key)
            }

    return GroupSettingsMayDiffer()


def _is_group_setting(key: str) -> bool:
    """A flattened optimizer param-group entry other than its parameter list."""
    return key.startswith("optimizer.param_groups.") and not key.endswith(".params")


def _by_name(osd: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` (parameters numbered in param-group order) keyed by parameter name,
    the form the distributed state-dict API expects. Wrappers keep parameter order and identity."""
    from seektrain.distributed.parallelize import unwrap

    names = {id(p): name for name, p in unwrap(model).named_parameters(remove_duplicate=False)}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {
        "state": {order[int(i)]: v for i, v in osd["state"].items()},
        "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]} for g in osd["param_groups"]],
    }


def read_model_state(path: Path) -> dict[str, torch.Tensor]:
    """The full model state dict of a sharded checkpoint, read in this one process (no process group),
    for generate/eval/export; the optimizer's shards are not read."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader, layout = _read_layout(path)
    model = {
        key.removeprefix("model."): torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in layout.items()
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
    }
    with _quiet_single_process(), _reading(path):
        dcp.load({"model": model}, storage_reader=reader, no_dist=True)
    return model


def _read_layout(path: Path):
    """The checkpoint's DCP reader and the layout of its tensors (from `dcp/.metadata`); a damaged file is
    one error line saying what to do."""
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(str(Path(path) / DCP_DIR))
    try:
        return reader, reader.read_metadata().state_dict_metadata
    except OSError as e:  # unreadable (permissions, an I/O error), not damaged: no advice to shelve it
        raise UserError(f"cannot read checkpoint {path}: {first_line(e)}") from e
    except Exception as e:  # a file that does not unpickle
        raise UserError(
            f"cannot read checkpoint {path}: {first_line(e)}; its {DCP_DIR}/.metadata is damaged: {SHELVE}"
        ) from e


@contextlib.contextmanager
def _reading(path: Path):
    """A damaged `dcp/` folder (a shard file missing or cut short) as one error line naming the
    checkpoint; under torchrun DCP raises its CheckpointException (a BaseException) on every rank."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except (Exception, CheckpointException) as e:
        failures = getattr(e, "failures", None)  # rank -> (exception, traceback)
        cause = next(iter(failures.values()))[0] if failures else e
        raise UserError(f"cannot read checkpoint {path}: {first_line(cause)}") from e


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every load without a process group; reading in one process is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield
