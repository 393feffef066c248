"""Checkpoint files: retention, the `latest` pointer, and the generator states a checkpoint carries."""

from __future__ import annotations

import random

import numpy as np
import torch

from lstm_dist.training import checkpoint as ckpt
from lstm_dist.training.state import RandomGenerators


def test_retention_keeps_the_newest_keep_and_latest_names_the_newest(tmp_path):
    for step in (5, 10, 15, 20, 25):
        path = ckpt.save(tmp_path, step, {"model": {"w": torch.full((2,), float(step))}}, keep=2)
        assert path.name == ckpt.file_name(step)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000020.pt", "step_00000025.pt"]
    assert (ckpt.checkpoint_dir(tmp_path) / ckpt.LATEST).read_text().strip() == "step_00000025.pt"
    newest = ckpt.load(ckpt.resolve(tmp_path))
    assert newest["step"] == 25 and torch.equal(newest["model"]["w"], torch.full((2,), 25.0))
    # keep=1 after more were kept: only the newest stays
    ckpt.save(tmp_path, 30, {"model": {}}, keep=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000030.pt"]


def test_generators_come_back_from_a_saved_state(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    generators = RandomGenerators(torch.device("cpu"))
    state = generators.state_dict()
    first = (torch.rand(3), np.random.rand(3), random.random())
    path = ckpt.save(tmp_path, 1, {"model": {}, "rng": state}, keep=1)  # through a weights_only file
    generators.load_state_dict(ckpt.load(path)["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_a_training_checkpoint_has_the_format_1_layout_and_puts_every_piece_back(tmp_path):
    """The file's keys, in order, are FORMAT 1's (old checkpoints load, and the smoke run's files stay
    byte for byte); every piece comes back from it into fresh objects; a file written before
    `nonfinite_total` and `schedule` were kept leaves those two at their start."""
    from lstm_dist.common.distributed import DistEnv
    from lstm_dist.config import load
    from lstm_dist.data.corpus import Vocab
    from lstm_dist.data.streams import TokenStream
    from lstm_dist.model.char_lstm import CharLSTM
    from lstm_dist.model.kernels import Kernels
    from lstm_dist.training.optim import Schedule, build_optimizer
    from lstm_dist.training.state import ModelWeights, Progress

    cpu = torch.device("cpu")
    cfg = load(None, [f"run.dir={tmp_path}", "model.embedding=4", "model.hidden=8", "model.layers=1",
                      "train.batch_size=2", "train.bptt=4"])
    env, vocab, data = DistEnv(0, 1, 0, 1, cpu), Vocab("bytes"), (np.arange(300) % 251).astype(np.uint8)

    def pieces(seed: int):
        torch.manual_seed(seed)
        model = CharLSTM.from_config(cfg.model, vocab.size, kernels=Kernels())
        optimizer = build_optimizer(model, cfg.train)
        progress, schedule = Progress(5, cpu), Schedule(cfg.train, 0.1)
        stream = TokenStream(data, 0, 1, 2, 4, seed=cfg.run.seed)
        return model, optimizer, progress, schedule, stream, ckpt.Pieces(
            shared={"model": ModelWeights(model), "optimizer": optimizer, "nonfinite_total": progress.nonfinite,
                    "schedule": schedule},
            per_rank={"stream": stream, "hidden": progress.state_piece, "rng": RandomGenerators(cpu)})

    model, optimizer, progress, schedule, stream, mine = pieces(0)
    batch = stream.next()
    model(batch.x)[0].sum().backward()
    optimizer.step()
    stream.next()
    progress.state, progress.nonfinite.total, schedule.anchor = (torch.randn(1, 2, 8), torch.randn(1, 2, 8)), 3, (7, 0.5)
    path = ckpt.save_training(cfg, env, vocab, 9, mine)
    saved = ckpt.load(path)
    assert list(saved) == ["format", "step", "config", "vocab", "model", "optimizer", "nonfinite_total", "schedule",
                           "ranks"]
    assert len(saved["ranks"]) == 1 and list(saved["ranks"][0]) == ["stream", "hidden", "rng"]
    assert saved["format"] == 1 and saved["step"] == 9 and saved["nonfinite_total"] == 3
    assert saved["schedule"] == {"anchor": [7, 0.5]} and isinstance(saved["ranks"][0]["hidden"], tuple)
    after = torch.rand(3)  # what the generators draw next, from the state the checkpoint holds

    cfg.checkpoint.resume = str(path)
    model2, optimizer2, progress2, schedule2, stream2, theirs = pieces(1)
    chosen = ckpt.choose_resume(cfg, env, vocab, print)
    assert chosen.path == path
    resumed = ckpt.restore(chosen, cfg, env, theirs)
    assert resumed.exact and resumed.step == 9 and resumed.world == 1 and resumed.written_by == "1 processes × 2 streams × bptt 4"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(optimizer.state[next(model.parameters())].values(),
                                                  optimizer2.state[next(model2.parameters())].values()))
    assert torch.equal(progress2.state[0], progress.state[0]) and torch.equal(progress2.state[1], progress.state[1])
    assert progress2.nonfinite.total == 3 and schedule2.anchor == (7, 0.5)
    assert stream2.state_dict() == stream.state_dict() and torch.equal(torch.rand(3), after)

    del saved["nonfinite_total"], saved["schedule"]
    _, _, progress3, schedule3, _, older = pieces(2)
    ckpt.restore(ckpt.Chosen(path, saved), cfg, env, older)
    assert progress3.nonfinite.total == 0 and schedule3.anchor is None and progress3.state is not None
