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
    raise SystemExit(code)


if __name__ == "__main__":
    faulthandler.dump_traceback_later(150, exit=True)  # a hang shows where, before the test's timeout
    torch.set_num_threads(1)
    main()
