"""After a checkpoint is restored (`checkpoint.restore`): how the run picks up, said in one line
each, and the learning-rate schedule it goes on with.

- An exact resume continues as if never stopped. The same global streams on another number of
  processes (`train.global_batch_size`) continue with their hidden states, re-sliced over the ranks,
  and new generators (`seeds.recut_seed`). A re-cut (another global batch or bptt, or a split of
  another length) starts from zero states, with generators seeded anew for the
  step (`seeds.recut_seed`): the continued run does not replay the dropout masks of its first steps.
- Every setting that differs from the checkpoint's config is one line.
- The schedule: the checkpoint's anchor is back in the run's `Schedule` (a checkpoint piece); where
  this run's settings give other rates, `train.resume_schedule` decides, and one line says what the
  rates become.
"""

from __future__ import annotations

from typing import Callable

from lstm_dist import config as config_mod
from lstm_dist.common.distributed import DistEnv
from lstm_dist.config import Config
from lstm_dist.training import lr_rule
from lstm_dist.training.batching import batch_layout
from lstm_dist.training.checkpoint import Resumed
from lstm_dist.training.optim import Schedule
from lstm_dist.training.seeds import recut_seed, seed_everything


def pick_up(resumed: Resumed, cfg: Config, env: DistEnv, schedule: Schedule, say: Callable[[str], None]) -> None:
    """Say how the run continues from `resumed`, seed a re-cut's generators, list the changed
    settings and settle the schedule (`continue_schedule`). `say` prints on rank 0."""
    step = resumed.step
    if resumed.exact:
        say(f"resumed from {resumed.path} at step {step}")
    elif resumed.resliced:
        seed_everything(recut_seed(cfg.run.seed, env.rank, step))
        layout = batch_layout(cfg.train, env.world)
        say(f"resumed from {resumed.path} at step {step}: it was written by {resumed.written_by}; the same "
            f"{layout.global_batch} streams go on over {env.world} process(es) × {layout.per_rank}, each with its "
            "hidden state (the random generators are seeded anew for this layout)")
    else:
        seed_everything(recut_seed(cfg.run.seed, env.rank, step))
        t = cfg.train
        layout = batch_layout(t, env.world)
        keep = ""
        if resumed.streams != layout.global_batch and resumed.streams % env.world == 0:
            keep = (f"; the global batch goes from {resumed.streams} to {layout.global_batch} streams "
                    f"(train.global_batch_size={resumed.streams}, with a train.batch_size that divides "
                    f"{resumed.streams // env.world}, would go on with the same streams and their hidden states)")
        say(f"resumed from {resumed.path} at step {step}: it was written by {resumed.written_by}; re-cut streams "
            f"for {env.world} × {layout.per_rank} × {t.bptt}: position carried over by characters "
            f"consumed, hidden states start at zero{keep}")
    for key, old, new in config_mod.changes(resumed.config, cfg):
        say(f"resumed with a changed setting: {key}: {old!r} → {new!r}")
    continue_schedule(resumed, cfg, schedule, say)


def continue_schedule(resumed: Resumed, cfg: Config, schedule: Schedule, say: Callable[[str], None]) -> None:
    """`schedule` holds the checkpoint's anchor already; where this run's settings give another
    schedule than the checkpoint's run was on, follow `train.resume_schedule` and say in one line
    what the rates become."""
    step, t = resumed.step, cfg.train
    saved = config_mod.from_dict(resumed.config, source=f"the config inside checkpoint {resumed.path}")
    old = Schedule(saved.train, lr_rule.peak_lr(saved, resumed.world), anchor=schedule.anchor)
    if schedule.shape() == old.shape() or step >= t.steps:
        return
    was = old.lr(step)
    recomputed = Schedule(t, schedule.peak).lr(step + 1)
    if t.resume_schedule == "continue":
        schedule.continued(step, old)
        say(f"learning-rate schedule continued from the checkpoint's (train.resume_schedule=continue): "
            f"{was:.4g} at step {step}, {schedule.lr(step + 1):.4g} at step {step + 1}, "
            f"{schedule.lr(t.steps):.4g} at step {t.steps} (recompute would give {recomputed:.4g} "
            f"at step {step + 1})")
    else:
        schedule.anchor = None
        say(f"learning-rate schedule recomputed for the new settings (train.resume_schedule=recompute): "
            f"{was:.4g} at step {step}, {recomputed:.4g} at step {step + 1}")
