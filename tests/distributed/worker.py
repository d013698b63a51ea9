"""Run under torchrun by the tests: train like `seektrain train`, then write every rank's MoE correction
biases to RUN_DIR/biases.json (rank 0), so a test can check that they stayed identical.

`--die-in-save STEP`: rank 1 SIGKILLs itself inside the checkpoint save of STEP, after writing its
shards and before the directory is renamed (a node lost mid-save)."""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import re
import signal
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from seektrain.config import load_config
from seektrain.distributed.env import destroy_process_group
from seektrain.train.trainer import Trainer


def die_in_save(step: int) -> None:
    real_save = dcp.save

    def save(state, *, checkpoint_id, **kwargs):
        result = real_save(state, checkpoint_id=checkpoint_id, **kwargs)
        if dist.get_rank() == 1 and re.search(rf"step_{step:08d}", str(checkpoint_id)):
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    dcp.save = save


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--resume", default="auto")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--die-in-save", type=int, default=0)
    args = parser.parse_args()
    if args.die_in_save:
        die_in_save(args.die_in_save)
    trainer = Trainer(load_config(None, "tiny", args.overrides), args.run_dir, args.resume)
    code = trainer.fit()
    biases = [m.e_score_correction_bias.tolist() for m in trainer.model.moe_layers()]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, biases)
    if dist.get_rank() == 0:
        (Path(args.run_dir) / "biases.json").write_text(json.dumps(gathered))
    del trainer
    destroy_process_group()
    if left := live_gloo_groups():  # they would run into interpreter exit, which can abort
        raise SystemExit(f"{left} gloo process group(s) alive after destroy_process_group")
    raise SystemExit(code)


def live_gloo_groups() -> int:
    """The gloo process groups alive in this process, by their worker threads (two each, named
    pt_gloo_runloop; Linux only, else 0)."""
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):
        return 0
    names = []
    for tid in os.listdir(tasks):
        try:
            with open(f"{tasks}/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended meanwhile
            continue
    return names.count("pt_gloo_runloop") // 2


if __name__ == "__main__":
    faulthandler.dump_traceback_later(150, exit=True)  # a hang shows where, before the test's timeout
    torch.set_num_threads(1)
    main()
