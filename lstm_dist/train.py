"""Train the character LSTM: `python -m lstm_dist.train --config FILE [section.key=value ...]`.

One machine, all its GPUs (or 2 CPU processes for the smoke run):

    torchrun --standalone --nproc_per_node=2 -m lstm_dist.train --config configs/smoke.yaml
    torchrun --standalone --nproc_per_node=gpu -m lstm_dist.train --config configs/wikitext103.yaml

Several machines started by hand: `launch/multinode.sh`, the same command on each node with its
NODE_RANK 0..N-1 (it runs torchrun with --nnodes, --node_rank, --master_addr and --master_port):

    NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/multinode.sh configs/wikitext103.yaml

A plain `python -m lstm_dist.train ...` is a world of one.

Each rank reads its own streams of the training split, carries every stream's (h, c) from window to
window (detached: truncated BPTT), and DistributedDataParallel averages the gradients. The global
gradient norm is clipped after that all-reduce, so every rank clips alike. A non-finite loss or
gradient skips the optimizer step on every rank. SIGTERM or SIGUSR1 only set a flag; at the next
log step (the ranks read nothing back from the device between log lines) they agree on it, write a checkpoint and exit with EXIT_PREEMPTED so that a batch
script can requeue the job. The loop is `lstm_dist.training.loop.Trainer`; this module is the command
line around it: the config, the process group, and how the run's ending becomes an exit status.

Exit status: 0 done; 2 a user error (one line on stderr); 3 stopped after too many consecutive
non-finite steps; 75 preempted after writing a checkpoint (resume with the same command).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

from lstm_dist import config as config_mod
from lstm_dist.common.atomic import atomic_write_text
from lstm_dist.common.distributed import setup
from lstm_dist.common.errors import EXIT_USER_ERROR, EveryRankError, UserError, print_error, run_cli
from lstm_dist.training import batching, lr_rule
from lstm_dist.training.loop import Trainer
from lstm_dist.training.stopping import EXIT_NONFINITE, NonFiniteStop, Preemption


def _report_exit(code: int, together: bool = True) -> bool:
    """Tell a wrapping script how the run ended; True when this process may then exit 0.

    torchrun reports a worker's failure as its own exit status 1, prints a traceback of it, and may
    restart the workers; so the launch scripts and slurm/train.sh pass a file in LSTM_DIST_EXIT_FILE
    and exit with the status written there (local rank 0 of every node writes it, each node's script
    reading its own, or the rank that met an ending alone). An ending every rank reached together (done, a non-finite stop or a preemption
    the ranks agreed on, a mistake in the config that every rank read alike) then exits 0, so that
    torchrun ends quietly and restarts nothing a restart cannot fix. An ending this rank may have
    met alone keeps its status: torchrun must see it to stop the other ranks, which would otherwise
    wait for this one in a collective."""
    path = os.environ.get("LSTM_DIST_EXIT_FILE")
    if not path:
        return False
    if not together or os.environ.get("LOCAL_RANK", "0") == "0":  # an ending of its own: this rank tells it
        try:
            atomic_write_text(Path(path), f"{code}\n")
        except OSError as exc:
            print(f"warning: cannot write the exit status to LSTM_DIST_EXIT_FILE={path}: {exc}", file=sys.stderr)
            return False
    return together


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lstm_dist.train", description=__doc__.split("\n\n")[0],
                                     epilog="Exit status: 0 done, 2 user error, 3 non-finite stop, 75 preempted.")
    config_mod.add_arguments(parser)
    started = False  # whether this process joined the process group (after that, errors may be its own)
    try:
        args = config_mod.parse_args(parser, argv)  # a `--train.steps 50` is a user error every rank meets
        cfg = config_mod.load(args.config, args.overrides)
        if args.print_config:
            sys.stdout.write(cfg.to_yaml())
            world = int(os.environ.get("WORLD_SIZE", "1"))
            sys.stdout.write(batching.print_config_note(cfg.train, world))
            sys.stdout.write(lr_rule.print_config_note(cfg, world))
            return 0
        preemption = Preemption()
        preemption.install()
        with setup(cfg.train.device, timeout_minutes=cfg.train.collective_timeout / 60) as env:
            started = True
            trainer = None
            try:
                trainer = Trainer(cfg, env)
                code = trainer.run(preemption)
            except NonFiniteStop as exc:
                if env.is_main:
                    print(f"error: {exc}", file=sys.stderr, flush=True)
                code = EXIT_NONFINITE
            finally:
                if trainer is not None:
                    trainer.close()
                # Free DDP (and any gloo/NCCL work it still holds) while the process group is alive;
                # freed later, at interpreter exit, gloo's threads can abort the process.
                trainer = None
                gc.collect()
                preemption.restore()
    except UserError as exc:
        # Before the process group every rank read the same config; after it, an EveryRankError is every
        # rank's, and any other user error may be this rank's alone: it says so, and keeps its status.
        together = not started or isinstance(exc, EveryRankError)
        print_error(str(exc), every_rank=together)
        return 0 if _report_exit(EXIT_USER_ERROR, together) else EXIT_USER_ERROR
    return 0 if _report_exit(code) else code


if __name__ == "__main__":
    run_cli(main)
