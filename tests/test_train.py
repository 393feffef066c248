"""The training job through its real entry point: torchrun processes, checkpoints, resume, signals."""

from __future__ import annotations

import itertools
import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch

from conftest import TINY, child_env, load_ckpt, losses, make_text, read_metrics, run_ranks, run_train
from lstm_dist.training import checkpoint as ckpt
from lstm_dist.config import from_dict
from lstm_dist.training.lr_rule import peak_lr
from lstm_dist.data.corpus import Corpus
from lstm_dist.common.errors import UserError
from lstm_dist.training.metrics import format_rate
from lstm_dist.training.optim import lr_at
from lstm_dist.data.prepare import prepare
from lstm_dist.data.run_corpus import scorable
from lstm_dist.training.stopping import EXIT_NONFINITE, EXIT_PREEMPTED

pytestmark = pytest.mark.slow


def common(tmp: Path, corpus: Path, name: str, *extra: str) -> list[str]:
    return [*TINY, f"data.path={corpus}", f"run.dir={tmp}", f"run.name={name}", *extra]


def assert_same_state(a: dict, b: dict, exact: bool = True, atol: float = 0.0) -> None:
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        if exact:
            assert torch.equal(a["model"][k], b["model"][k]), f"weights differ in {k}"
        else:
            torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=atol, msg=f"weights differ in {k}")
    if exact:
        sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
        assert sa.keys() == sb.keys()
        for i in sa:
            for name in sa[i]:
                assert torch.equal(sa[i][name], sb[i][name]), f"optimizer state {i}.{name} differs"


def test_one_global_batch_trains_alike_on_1_2_and_4_processes_and_resumes_across_them(tmp_path, tiny_corpus):
    """train.global_batch_size=8 in forward passes of train.batch_size=2: 1 process accumulates 4 passes, 2
    processes 2 each, 4 processes 1 each; every layout reads the same 8 streams and takes the same steps (the
    float summation order aside). A checkpoint written by 2 processes then goes on over 4 with the streams'
    hidden states re-sliced: the same curve as the uninterrupted runs."""
    same = ("train.global_batch_size=8", "train.batch_size=2", "train.steps=20", "checkpoint.every=10")
    for nproc in (1, 2, 4):  # one process as torchrun starts it: a process group of one and DDP
        proc = run_ranks(nproc, *common(tmp_path, tiny_corpus, f"p{nproc}", *same), cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        passes = f" in {8 // nproc // 2} micro-batches of 2" if nproc < 4 else ""
        assert f"× {8 // nproc} streams{passes} (8 in all: train.global_batch_size) × bptt 16" in proc.stdout
    curves = {n: losses(tmp_path / f"p{n}") for n in (1, 2, 4)}
    assert all(sorted(c) == list(range(1, 21)) for c in curves.values())
    for step in range(1, 21):
        for n in (2, 4):
            assert curves[n][step] == pytest.approx(curves[1][step], rel=1e-5), (n, step)
    final = {n: load_ckpt(tmp_path / f"p{n}" / "checkpoints" / "step_00000020.pt") for n in (1, 2, 4)}
    for n in (2, 4):
        assert_same_state(final[1], final[n], exact=False, atol=1e-5)
    assert curves[1][20] < curves[1][1] - 0.1  # and it trained: the steps compared are not all alike by chance

    # the 2-process checkpoint of step 10 on 4 processes: the same 8 streams, with their (h, c)
    half = tmp_path / "p2" / "checkpoints" / "step_00000010.pt"
    proc = run_ranks(4, *common(tmp_path, tiny_corpus, "p2to4", *same, f"checkpoint.resume={half}"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"resumed from {half} at step 10: it was written by 2 processes × 4 streams × bptt 16; the same 8 "
            "streams go on over 4 process(es) × 2, each with its hidden state") in proc.stdout
    resumed = losses(tmp_path / "p2to4")
    assert sorted(resumed) == list(range(11, 21))
    for step in range(11, 21):
        assert resumed[step] == pytest.approx(curves[2][step], rel=1e-5), step
    assert_same_state(final[2], load_ckpt(tmp_path / "p2to4" / "checkpoints" / "step_00000020.pt"), exact=False,
                      atol=1e-5)
    # without the hidden states (a re-cut from zeros) the first steps after the resume would differ: the
    # states carried matter here, so the comparison above would catch them lost
    half_state = load_ckpt(half)["ranks"][0]["hidden"]
    assert half_state is not None and float(half_state[0].abs().max()) > 0.1


def test_resume_from_half_way_is_bit_identical(tmp_path, tiny_corpus, straight_run):
    tmp = straight_run.parent  # conftest.straight_run: 20 steps, 2 ranks, a checkpoint every 5
    half = tmp / "straight" / "checkpoints" / "step_00000010.pt"
    proc = run_train(2, *common(tmp_path, tiny_corpus, "resumed", "train.steps=20", "checkpoint.every=5",
                                f"checkpoint.resume={half}"), cwd=tmp_path)
    assert f"resumed from {half} at step 10" in proc.stdout
    final_a = load_ckpt(tmp / "straight" / "checkpoints" / "step_00000020.pt")
    final_b = load_ckpt(tmp_path / "resumed" / "checkpoints" / "step_00000020.pt")
    assert_same_state(final_a, final_b, exact=True)
    # the CPU matrix products the run chose, with the machine they were measured on (reused by the resume)
    from lstm_dist.model import products
    assert final_a["cpu_matmul"]["machine"] == products.machine() and final_a["cpu_matmul"] == final_b["cpu_matmul"]
    assert set(products.SITES) <= set(final_a["cpu_matmul"])
    la, lb = losses(tmp / "straight"), losses(tmp_path / "resumed")
    assert sorted(lb) == list(range(11, 21))
    assert all(la[s] == lb[s] for s in range(11, 21)), (la, lb)
    # every rank's stream position and hidden state were carried in the checkpoint
    assert [r["stream"]["epoch"] for r in final_a["ranks"]] == [r["stream"]["epoch"] for r in final_b["ranks"]]
    assert final_a["ranks"][0]["stream"]["epoch"] >= 2


def test_exact_resume_with_dropout_and_samples_leave_the_training_rng_alone(tmp_path, tiny_corpus):
    """With dropout the random generators are part of the state: a resumed run must get them back.

    The straight run evaluates and draws a text sample every 4 steps; the resumed one never does. If
    either touched the training generators (dropout masks), the two would part after step 8.
    """
    drop = ["model.dropout=0.3", "train.steps=12", "checkpoint.every=6"]
    run_train(2, *common(tmp_path, tiny_corpus, "straight", *drop, "train.eval_every=4", "train.sample_chars=20"),
              cwd=tmp_path)
    half = tmp_path / "straight" / "checkpoints" / "step_00000006.pt"
    proc = run_train(2, *common(tmp_path, tiny_corpus, "resumed", *drop, "train.eval_every=0", "train.sample_chars=0",
                                f"checkpoint.resume={half}"), cwd=tmp_path)
    assert f"resumed from {half} at step 6" in proc.stdout and "re-cut" not in proc.stdout
    a = load_ckpt(tmp_path / "straight" / "checkpoints" / "step_00000012.pt")
    b = load_ckpt(tmp_path / "resumed" / "checkpoints" / "step_00000012.pt")
    assert_same_state(a, b, exact=True)
    for ra, rb in zip(a["ranks"], b["ranks"]):
        assert torch.equal(ra["rng"]["torch"], rb["rng"]["torch"])
    la, lb = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert all(la[s] == lb[s] for s in range(7, 13)), (la, lb)


def test_auto_resume_continues_a_finished_run_and_falls_back_past_a_bad_checkpoint(tmp_path, tiny_corpus, straight_run):
    tmp = straight_run.parent  # conftest.straight_run: 20 steps, 2 ranks, a checkpoint every 5
    run_dir = tmp_path / "straight"
    import shutil

    shutil.copytree(tmp / "straight" / "checkpoints", run_dir / "checkpoints")
    newest = run_dir / "checkpoints" / "step_00000020.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a crash mid-copy
    proc = run_train(1, *common(tmp_path, tiny_corpus, "straight", "train.steps=20", "train.batch_size=8"),
                     cwd=tmp_path)
    assert f"checkpoint {newest} cannot be loaded" in proc.stdout
    assert "falling back to the previous checkpoint" in proc.stdout
    assert "resumed from" in proc.stdout and "at step 15" in proc.stdout
    # 2 processes × 4 streams wrote it; 1 process × 8 streams reads it: the same streams, with their states
    assert "the same 8 streams go on over 1 process(es) × 8, each with its hidden state" in proc.stdout
    assert sorted(losses(run_dir)) == list(range(16, 21))


def test_one_process_resumes_a_two_process_checkpoint_with_a_recut(tmp_path, tiny_corpus, straight_run):
    tmp = straight_run.parent  # conftest.straight_run: 20 steps, 2 ranks, a checkpoint every 5
    half = tmp / "straight" / "checkpoints" / "step_00000010.pt"
    proc = run_train(1, *common(tmp_path, tiny_corpus, "single", "train.steps=14", "train.batch_size=3",
                                f"checkpoint.resume={half}"), cwd=tmp_path)
    assert "written by 2 processes × 4 streams × bptt 16" in proc.stdout
    assert "re-cut streams for 1 × 3 × 16" in proc.stdout
    assert ("hidden states start at zero; the global batch goes from 8 to 3 streams (train.global_batch_size=8, "
            "with a train.batch_size that divides 8, would go on with the same streams and their hidden states)") in proc.stdout
    assert sorted(losses(tmp_path / "single")) == [11, 12, 13, 14]
    saved = load_ckpt(tmp_path / "single" / "checkpoints" / "step_00000014.pt")
    assert len(saved["ranks"]) == 1


def test_a_stop_signal_checkpoints_at_a_step_boundary_and_resume_is_exact(tmp_path, tiny_corpus, straight_run):
    """A stop signal on one rank (LSTM_DIST_FAULT=preempt: SIGUSR1 to itself after step 7, as a scheduler
    sends it) stops every rank at the next step boundary with a checkpoint and exit 75; resumed, the run
    ends bit for bit as the one never stopped (conftest.straight_run, the same settings). A signal from
    outside, through the launch scripts and Slurm: tests/test_launch.py, tests/test_slurm.py."""
    args = common(tmp_path, tiny_corpus, "preempted", "train.steps=20", "checkpoint.every=5")
    proc = run_ranks(2, *args, cwd=tmp_path, env={**child_env(), "LSTM_DIST_FAULT": "preempt:step=7:rank=1"})
    assert proc.returncode == EXIT_PREEMPTED, proc.stdout + proc.stderr
    assert f"checkpointing at step 8 and exiting with {EXIT_PREEMPTED}" in proc.stdout, proc.stdout
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "preempted")] == ["step_00000005.pt", "step_00000008.pt"]
    assert sorted(losses(tmp_path / "preempted")) == list(range(1, 9))

    # A plain process (world of one, as under srun without torchrun) exits with the code itself.
    single = run_train(1, *common(tmp_path, tiny_corpus, "single", "train.steps=20", "checkpoint.every=0"),
                       cwd=tmp_path, check=False, env={"LSTM_DIST_FAULT": "preempt:step=2"})
    assert single.returncode == EXIT_PREEMPTED and "checkpointing at step 3" in single.stdout, single.stdout

    # Resume the preempted run (same settings) to the end: the run never stopped, bit for bit.
    proc = run_train(2, *args, cwd=tmp_path)
    assert f"resumed from {tmp_path / 'preempted' / 'checkpoints' / 'step_00000008.pt'} at step 8" in proc.stdout
    a = load_ckpt(tmp_path / "preempted" / "checkpoints" / "step_00000020.pt")
    b = load_ckpt(straight_run / "checkpoints" / "step_00000020.pt")
    assert_same_state(a, b, exact=True)
    assert losses(tmp_path / "preempted") == losses(straight_run)


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_runs_code_when_unpickled_is_refused(tmp_path, tiny_corpus):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": 1, "model": {}, "payload": _RunsCode(str(marker))}, evil)
    with pytest.raises(ckpt.CheckpointError, match="refused"):
        ckpt.load(evil)
    proc = run_train(1, *common(tmp_path, tiny_corpus, "victim", "train.steps=2", f"checkpoint.resume={evil}"),
                     cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: checkpoint {evil} cannot be loaded: it holds objects other than tensors and plain values and was "
        "refused (it could run code when loaded); use another checkpoint"]
    assert not marker.exists()
    # the same bytes through plain pickle would have run it: the test's payload is real
    pickle.loads(pickle.dumps(_RunsCode(str(marker))))
    assert marker.exists()


def test_a_checkpoint_of_another_model_is_one_line(tmp_path, tiny_corpus, straight_run):
    tmp = straight_run.parent  # conftest.straight_run: 20 steps, 2 ranks, a checkpoint every 5
    half = tmp / "straight" / "checkpoints" / "step_00000010.pt"
    proc = run_train(1, *common(tmp_path, tiny_corpus, "other", "train.steps=2", "model.hidden=48",
                                f"checkpoint.resume={half}"), cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: checkpoint {half} is of another model (model.hidden=32, this run has 48); set model.hidden=32 "
        "or start a new run.name"]


def test_non_finite_steps_are_skipped_then_stop_leaving_the_last_checkpoint(tmp_path, tiny_corpus):
    proc = run_train(2, *common(tmp_path, tiny_corpus, "diverge", "train.steps=20", "train.lr=1e37",
                                "train.warmup_steps=0", "train.clip_norm=0", "checkpoint.every=1",
                                "train.max_nonfinite=3"), cwd=tmp_path, check=False)
    out = proc.stdout + proc.stderr
    assert "optimizer step skipped on every rank" in out
    assert "failed steps in a row from step" in out and "train.max_nonfinite=3" in out
    assert f"exitcode  : {EXIT_NONFINITE}" in out or proc.returncode == EXIT_NONFINITE, out
    # no checkpoint was written at or after the first skipped step; the one written just before it holds
    # the weights that failed (their update made the next loss non-finite): set aside, never resumed from
    skipped = [m for m in read_metrics(tmp_path / "diverge") if m.get("train/nonfinite_steps")]
    assert skipped and skipped[0]["step"] == 2, out
    assert ckpt.list_checkpoints(tmp_path / "diverge") == []
    aside = sorted((tmp_path / "diverge" / "checkpoints").glob("*.diverged"))
    assert [p.name for p in aside] == ["step_00000001.pt.diverged"] and "the run starts afresh" in out
    assert all(torch.isfinite(v).all() for v in load_ckpt(aside[0])["model"].values())


def test_a_resumed_run_lists_every_changed_setting_and_an_extended_run_keeps_its_rate(tmp_path, tiny_corpus, straight_run):
    """Kind: a resumed run never changes course without saying so. Extending a finished run (train.steps
    20 -> 30) and changing the clipping are each one line; the rate goes on from the one in force
    (no jump: recomputing the cosine over 30 steps would restart it high); the anchor is part of the
    run's state, so a later resume follows it bit for bit; `recompute` is there and says so."""
    tmp = straight_run.parent  # conftest.straight_run: 20 steps, 2 ranks, a checkpoint every 5
    end = tmp / "straight" / "checkpoints" / "step_00000020.pt"
    was = {m["step"]: m["train/lr"] for m in read_metrics(tmp / "straight") if "train/lr" in m}[20]
    # one process × 8 streams (the same 8 streams as 2 × 4, states re-sliced): plain python, seconds cheaper than torchrun
    longer = ["train.steps=30", "checkpoint.every=5", "train.clip_norm=0.5", "train.batch_size=8"]
    proc = run_train(1, *common(tmp_path, tiny_corpus, "longer", *longer, f"checkpoint.resume={end}"), cwd=tmp_path)
    changed = [line for line in proc.stdout.splitlines() if line.startswith("resumed with a changed setting")]
    assert changed == ["resumed with a changed setting: run.name: 'straight' → 'longer'",
                       "resumed with a changed setting: run.dir: " + repr(str(tmp)) + " → " + repr(str(tmp_path)),
                       "resumed with a changed setting: train.batch_size: 4 → 8",
                       "resumed with a changed setting: train.steps: 20 → 30",
                       "resumed with a changed setting: train.clip_norm: 1.0 → 0.5"], proc.stdout
    assert (f"learning-rate schedule continued from the checkpoint's (train.resume_schedule=continue): {was:.4g} at "
            f"step 20, {was:.4g} at step 21, {was:.4g} at step 30 (recompute would give ") in proc.stdout
    rates = {m["step"]: m["train/lr"] for m in read_metrics(tmp_path / "longer") if "train/lr" in m}
    assert sorted(rates) == list(range(21, 31)) and all(rates[s] == pytest.approx(was) for s in rates), rates

    mid = tmp_path / "longer" / "checkpoints" / "step_00000025.pt"
    proc = run_train(1, *common(tmp_path, tiny_corpus, "again", *longer, f"checkpoint.resume={mid}"), cwd=tmp_path)
    assert "learning-rate schedule" not in proc.stdout  # nothing changed in it: the saved anchor holds
    assert_same_state(load_ckpt(tmp_path / "longer" / "checkpoints" / "step_00000030.pt"),
                      load_ckpt(tmp_path / "again" / "checkpoints" / "step_00000030.pt"), exact=True)

    proc = run_train(1, *common(tmp_path, tiny_corpus, "recomputed", "train.steps=30", "train.resume_schedule=recompute",
                                "train.batch_size=8", f"checkpoint.resume={end}"), cwd=tmp_path)
    cfg = from_dict(load_ckpt(end)["config"])
    cfg.train.steps = 30
    jump = lr_at(21, cfg.train, peak_lr(cfg, world=1))  # the cosine over 30 steps, as if the run always had them
    assert jump > 2 * was
    assert (f"learning-rate schedule recomputed for the new settings (train.resume_schedule=recompute): {was:.4g} at "
            f"step 20, {jump:.4g} at step 21") in proc.stdout
    assert {m["step"]: m["train/lr"] for m in read_metrics(tmp_path / "recomputed") if "train/lr" in m}[21] == pytest.approx(jump)


def test_a_diverged_run_leaves_no_checkpoint_to_resume_and_its_score_never_ends_in_done(tmp_path, tiny_corpus):
    """Kind: a wrong number must never end a run with exit 0. At lr 1e4 the first update blows the
    weights up: every later loss is finite but thousands of times a uniform guess's. Those steps fail
    like non-finite ones, the checkpoint written from the failed weights is set aside (so the advice,
    and an automatic resume, never pick it), and a model that scores like that never says `done`."""
    proc = run_train(1, *common(tmp_path, tiny_corpus, "div", "train.steps=40", "train.lr=1e4", "train.lr_scaling=none",
                                "checkpoint.every=1"), cwd=tmp_path, check=False)
    assert proc.returncode == EXIT_NONFINITE, proc.stdout + proc.stderr
    assert "warning: step 2: diverged loss" in proc.stdout and "step 3" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: 5 failed steps in a row from step 2 (non-finite or diverged loss; train.max_nonfinite=5); lower "
        "train.lr or train.clip_norm and run again: no checkpoint from before the failures is left, so the run starts "
        "afresh (step_00000001.pt.diverged, written from the weights that failed, set aside)"]
    checkpoints = tmp_path / "div" / "checkpoints"
    assert ckpt.candidates(tmp_path / "div") == [] and not (checkpoints / "latest").exists()
    aside = checkpoints / "step_00000001.pt.diverged"
    assert aside.is_file() and load_ckpt(aside)["step"] == 1
    # Those weights as a finished run (another instance): the final score is absurd, so exit 3, not `done`.
    proc = run_train(1, *common(tmp_path, tiny_corpus, "final", "train.steps=1", "train.warmup_steps=0",
                                f"checkpoint.resume={aside}"),
                     cwd=tmp_path, check=False)
    assert proc.returncode == EXIT_NONFINITE and "done:" not in proc.stdout, proc.stdout + proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: the final model scores valid ") and "it has diverged" in line, line


def test_an_evaluation_split_with_nothing_to_score_is_refused_before_training(tmp_path):
    """Kind: a wrong number must never end a run with exit 0. A split of one character scores nothing
    (its first character is only context); a run on it used to end `valid 0.0000 bpc over 0
    characters` with exit 0. It is refused at start-up, in one line, before anything is written."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "train.txt").write_text(make_text(3000, seed=0), encoding="utf-8")
    (src / "one.txt").write_text("a", encoding="utf-8")
    (src / "more.txt").write_text(make_text(400, seed=1), encoding="utf-8")
    corpus = prepare("files", tmp_path / "one-valid", vocab="chars", quiet=True, train=src / "train.txt",
                     valid=src / "one.txt", test=src / "more.txt")
    proc = run_train(1, *common(tmp_path, corpus, "t", "train.steps=10", "train.eval_every=5"), cwd=tmp_path,
                     check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: the valid split of {corpus} has 1 token(s), so there is nothing to score in it (the first is only "
        "context); re-prepare the corpus with a longer valid text (python -m lstm_dist.data prepare ... --force)"]
    assert not (tmp_path / "t").exists()
    # the test split (another instance), scored only at the end of a run: refused all the same, at start-up
    corpus = prepare("files", tmp_path / "one-test", vocab="bytes", quiet=True, train=src / "train.txt",
                     valid=src / "more.txt", test=src / "one.txt")
    with pytest.raises(UserError, match=r"^the test split of .*one-test has 1 token\(s\), so there is nothing to score"):
        scorable(Corpus(corpus))


def test_missing_corpus_and_bad_config_are_one_line(tmp_path):
    status = tmp_path / "status"
    proc = run_ranks(2, *TINY, f"data.path={tmp_path / 'nowhere'}", f"run.dir={tmp_path}", cwd=tmp_path,
                     env={**child_env(), "LSTM_DIST_EXIT_FILE": str(status)})
    # every rank met it alike: all end in order (0, so that torchrun stays quiet: tests/test_launch.py) and the
    # run's own status, 2, is in the file
    assert proc.returncode == 0 and status.read_text() == "2\n"
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: data.path {tmp_path / 'nowhere'} does not exist; prepare a corpus there first "
                      f"(python -m lstm_dist.data prepare --source ... --out {tmp_path / 'nowhere'}) or point data.path at one"]
    proc = run_train(1, "train.bptt_len=3", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown key 'train.bptt_len'; did you mean 'train.bptt'?"


def test_run_directory_holds_config_metrics_samples_and_an_offline_wandb_run(tmp_path, tiny_corpus):
    proc = run_train(2, *common(tmp_path, tiny_corpus, "full", "train.steps=6", "train.eval_every=3",
                                "train.eval_max_windows=1", "log.wandb.mode=offline", "log.every=2",
                                "log.eval_progress_every=0",
                                "log.wandb.tags=tiny, test", "log.wandb.group=g1", "log.wandb.notes=a test run"),
                     cwd=tmp_path)
    run_dir = tmp_path / "full"
    from lstm_dist.config import load

    assert load(run_dir / "config.yaml").train.steps == 6
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4, 6]
    evals = [r for r in rows if "val/bpb" in r]  # bits per byte: the tiny corpus has the bytes vocabulary
    assert [r["step"] for r in evals] == [3, 6]
    # eval_max_windows=1 during training: one scored window of bptt 16 (after a window of context) in each
    # of 2 ranks × 4 streams
    assert evals[0]["val/bytes"] == 2 * 4 * 16
    (final,) = [r for r in rows if "test/bpb" in r]
    assert final["val/bytes"] == 399 and final["test/bytes"] == 399  # the final evaluation: all of it
    assert not any(k.endswith(("bpc", "chars")) for r in rows for k in r)  # one name per vocabulary
    # rank 0's progress lines (log.eval_progress_every=0: one per window), in its own share's numbers: each
    # evaluation ends with all of rank 0's 4 streams' bytes, 1 window of 16 each at step 3, half of 399 after
    ends = [line.split(": ", 1)[1].split("),")[0] + ")" for line in proc.stdout.splitlines()
            if line.startswith("evaluating ") and ": 100% (" in line]
    assert ends == ["100% (64 of 64 bytes on rank 0 of 2)", "100% (199 of 199 bytes on rank 0 of 2)",
                    "100% (199 of 199 bytes on rank 0 of 2)"], proc.stdout
    assert "on rank 1 of 2" not in proc.stdout
    # the logged numbers are the model's: the same bits computed here from the final checkpoint
    from lstm_dist.data.corpus import Corpus
    from lstm_dist.inference.load import load_model
    from lstm_dist.inference.scoring import split_bits

    model = load_model(run_dir).model
    for split in ("valid", "test"):
        bits, count = split_bits(model, Corpus(tiny_corpus).split(split), rank=0, world=1, batch=8, bptt=16,
                                 device=torch.device("cpu"))
        assert final[f"{'val' if split == 'valid' else split}/bpb"] == pytest.approx(bits / count, rel=1e-5), split
    assert any("sample" in r and r["sample"].startswith("The ") for r in rows)
    # every row of metrics.jsonl in W&B's groups (docs/metrics.md): train/, perf/, val/, test/ (and the sample)
    assert set(rows[0]) == {"step", "time", "train/epoch", "train/loss", "train/bpb", "train/lr", "train/grad_norm",
                            "perf/chars_per_s", "perf/chars_per_s_per_process", "perf/data_ms", "perf/fwd_bwd_ms",
                            "perf/opt_ms", "perf/outside_fwd_bwd_pct", "perf/elapsed_s"}, rows[0]  # no ETA, no MFU on a CPU
    assert set(evals[0]) == {"step", "time", "val/bpb", "val/bytes", "perf/eval_s"}
    assert set(final) == {"step", "time", "val/bpb", "val/bytes", "test/bpb", "test/bytes", "perf/eval_s"}
    (summary,) = [r["summary"] for r in rows if "summary" in r]
    assert summary == {k: v for k, v in final.items() if k not in ("step", "time")}
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb")), proc.stdout
    assert (run_dir / "wandb_run_id").read_text().strip()
    # the W&B run as wandb's own reader sees it: tags, group, notes, and the derived values in its config
    from test_metrics import console_of, inspect_run, run_record

    (folder,) = (run_dir / "wandb").glob("offline-run-*")
    records = inspect_run(folder)
    run = run_record(records)
    assert run.get("tags") == ["tiny", "test"] and run.get("run_group") == "g1" and run.get("notes") == "a test run", run
    derived = run["config"]["update"]["derived"]
    assert derived["world_size"] == 2 and derived["global_batch_size"] == 8 and derived["vocab_size"] == 256
    assert derived["parameters"] == sum(v.numel() for v in load_ckpt(run_dir / "checkpoints" / "step_00000006.pt")["model"].values())
    assert derived["peak_lr"] > 0 and derived["version"]
    # rank 0's console from the run's start to its end is the W&B run's (the Logs tab), as the job's log has it
    console = console_of(records)
    for line in [ln for ln in proc.stdout.splitlines() if ln.startswith(("step ", "evaluating ", "sample @ ", "done: "))]:
        assert line + "\n" in console, (line, console)
    assert "done: step 6, valid " in console
    assert re.search(r"^step 3 \| valid [0-9.]+ bpb over [0-9,]+ bytes \| eval [0-9.]+s$", console, re.M), console


def test_a_time_budget_stops_at_a_log_step_exits_0_and_the_same_command_continues_exactly(tmp_path, tiny_corpus):
    """train.max_time (Lightning's max_time): where training on to the next log step would pass the budget,
    the run checkpoints there and exits 0 with one line and no final evaluation; run again (here without
    the budget) it continues to the end bit for bit like a run never stopped."""
    common = [*TINY, f"data.path={tiny_corpus}", f"run.dir={tmp_path}", "train.steps=12", "log.every=4"]
    # a budget below one step's time: the first log step (4) already sees the next one pass it
    proc = run_train(1, *common, "run.name=budget", "train.max_time=0.001", cwd=tmp_path)
    lines = proc.stdout.splitlines()
    said = [line for line in lines if line.startswith("time budget:")]
    assert len(said) == 1 and "checkpointing at step 4 of 12 and exiting with 0" in said[0], proc.stdout
    assert not any(line.startswith("done:") for line in lines)
    ckpts = tmp_path / "budget" / "checkpoints"
    assert sorted(f.name for f in ckpts.glob("step_*.pt")) == ["step_00000004.pt"]
    run_train(1, *common, "run.name=budget", cwd=tmp_path)  # the same run, the budget lifted
    run_train(1, *common, "run.name=straight", cwd=tmp_path)
    a = load_ckpt(ckpts / "step_00000012.pt")
    b = load_ckpt(tmp_path / "straight" / "checkpoints" / "step_00000012.pt")
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_profile_steps_traces_those_steps_on_rank_0_into_the_run_directory(tmp_path, tiny_corpus):
    """log.profile_steps=2-3: a Chrome trace of exactly those steps (Perfetto and TensorBoard's plugin open
    it) in the run directory's profile/, the top operations and the trace's path on the console."""
    proc = run_train(1, *TINY, f"data.path={tiny_corpus}", f"run.dir={tmp_path}", "run.name=prof", "train.steps=5",
                     "log.profile_steps=2-3", cwd=tmp_path)
    trace = tmp_path / "prof" / "profile" / "rank0_steps_2-3.pt.trace.json"
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert "LSTMWindow" in names and "LSTMWindowBackward" in names, sorted(n for n in names if n)[:40]
    # two steps' worth: one optimizer step each
    assert sum(1 for e in events if str(e.get("name", "")).startswith("Optimizer.step")) == 2
    out = proc.stdout
    assert "profile of steps 2-3 on rank 0" in out and f"profile trace: {trace}" in out and "LSTMWindow" in out


def test_init_from_starts_a_new_run_from_another_runs_weights_only(tmp_path, tiny_corpus):
    """checkpoint.init_from (nanoGPT's init_from): the weights of another run's latest checkpoint, but step 0,
    a fresh optimizer and schedule; another model is refused in one line naming the setting to change."""
    common = [*TINY, f"data.path={tiny_corpus}", f"run.dir={tmp_path}", "log.every=5"]
    run_train(1, *common, "run.name=base", "train.steps=10", cwd=tmp_path)
    base = load_ckpt(tmp_path / "base" / "checkpoints" / "step_00000010.pt")
    # one step at a negligible rate: the new run's weights are the base run's, to the step's size
    proc = run_train(1, *common, "run.name=tuned", "train.steps=1", "train.lr=1e-9", "train.lr_scaling=none", "train.warmup_steps=0",
                     f"checkpoint.init_from={tmp_path / 'base'}", cwd=tmp_path)
    assert (f"starting from the weights of {tmp_path / 'base' / 'checkpoints' / 'step_00000010.pt'} (step 10; "
            "checkpoint.init_from): step 0") in proc.stdout
    tuned = load_ckpt(tmp_path / "tuned" / "checkpoints" / "step_00000001.pt")
    assert tuned["step"] == 1
    for k, v in base["model"].items():
        torch.testing.assert_close(tuned["model"][k], v, rtol=0, atol=1e-7)
    # a fresh optimizer: one step of state, where the base run's has ten
    steps = {float(s["step"]) for s in tuned["optimizer"]["state"].values()}
    assert steps == {1.0}, steps
    fresh = run_train(1, *common, "run.name=fresh", "train.steps=1", "train.lr=1e-9", "train.lr_scaling=none", "train.warmup_steps=0",
                      cwd=tmp_path)
    assert "starting from the weights" not in fresh.stdout
    other = load_ckpt(tmp_path / "fresh" / "checkpoints" / "step_00000001.pt")
    assert not torch.allclose(other["model"]["cells.0.weight_hh"], base["model"]["cells.0.weight_hh"], atol=1e-3)
    bad = run_train(1, *common, "run.name=bad", "train.steps=1", "train.warmup_steps=0", "model.hidden=24",
                    f"checkpoint.init_from={tmp_path / 'base'}", cwd=tmp_path, check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].endswith("is of another model (model.hidden=32, this config has 24); "
                                                        "set model.hidden=32 to start from it"), bad.stderr


def test_final_scores_print_once_samples_are_labelled_and_a_finished_run_says_no_step_is_left(tmp_path, tiny_corpus):
    """The console: each sample one labelled line continuing train.sample_prompt; the final scores only in the
    done line (metrics.jsonl still has their row); a rerun of the finished run says no step is left."""
    args = [*TINY, f"data.path={tiny_corpus}", f"run.dir={tmp_path}", "run.name=r", "train.steps=8", "log.every=4",
            "train.eval_every=4", "train.sample_chars=10", "train.sample_prompt=It "]
    lines = run_train(1, *args, "log.eval_progress_every=0", cwd=tmp_path).stdout.splitlines()
    samples = [line for line in lines if line.startswith("sample @ step ")]
    assert [s[:len('sample @ step 4: "It ')] for s in samples] == ['sample @ step 4: "It ', 'sample @ step 8: "It ']
    assert not any(line.startswith(("summary |", "step 8 | valid")) for line in lines), lines
    # log.eval_progress_every=0: a progress line after every window of every evaluation (valid at step 4;
    # valid and test at the end), its count rising to all of the split's scored bytes
    from lstm_dist.data.streams import eval_batches

    progress = [re.fullmatch(r"evaluating (valid|test): (\d+)% \(([\d,]+) of ([\d,]+) bytes\), \S+ elapsed(, ETA \S+)?",
                             line) for line in lines if line.startswith("evaluating ")]
    assert all(progress), [line for line in lines if line.startswith("evaluating ")]
    said = [(m[1], int(m[2]), int(m[3].replace(",", "")), int(m[4].replace(",", ""))) for m in progress]
    corpus = Corpus(tiny_corpus)
    runs = []  # one per evaluation: (split, [(percent, done, total), ...])
    for split, percent, done, total in said:
        if not runs or runs[-1][0] != split or done <= runs[-1][1][-1][1]:
            runs.append((split, []))
        runs[-1][1].append((percent, done, total))
    assert [split for split, _ in runs] == ["valid", "valid", "test"], said
    for split, seen in runs:
        windows = list(eval_batches(corpus.split(split), 0, 1, 4, 16, context=16))  # TINY: 4 streams, bptt 16
        assert len(seen) == len(windows) and all(p == 100 * d // t for p, d, t in seen), (split, seen)
        assert [d for _, d, _ in seen] == list(itertools.accumulate(int(w.mask.sum()) for w in windows))
        assert seen[-1][:2] == (100, len(corpus.split(split)) - 1) and {t for _, _, t in seen} == {seen[-1][1]}
    assert sum(line.startswith("done: step 8, valid ") for line in lines) == 1
    rows = read_metrics(tmp_path / "r")
    assert any("test/bpb" in row and row["step"] == 8 for row in rows)  # the final scores' row is still written
    # the log line: step of steps, loss, score, rate, throughput in all and per process, elapsed and ETA, short
    logged = [line for line in lines if line.startswith("step 4/8 | ")]
    assert len(logged) == 1 and len(logged[0]) < 120, logged
    assert re.fullmatch(r"step 4/8 \| loss \d\.\d{4} \| bpb \d\.\d{4} \| lr \S+ \| \S+ chars/s \(\S+/process\) \| "
                        r"\S+ elapsed, ETA \S+", logged[0]), logged[0]
    row = next(r for r in rows if r["step"] == 4 and "train/loss" in r)
    # the line's numbers are the row's (the ETA, a guess, is the console's alone)
    assert f"loss {row['train/loss']:.4f} | bpb {row['train/bpb']:.4f} | " in logged[0] and "eta_s" not in row
    assert f" chars/s ({format_rate(row['perf/chars_per_s_per_process'])}/process) | " in logged[0]
    timed = run_train(1, *args, "run.name=t", "log.timings=true", "train.steps=4", cwd=tmp_path).stdout
    assert re.search(r"^step 4/4 \| .* ETA \S+ \| data \S+ ms \| fwd_bwd \S+ ms \| opt \S+ ms \| outside_fwd_bwd \S+%$",
                     timed, re.M), timed
    again = run_train(1, *args, cwd=tmp_path).stdout
    assert "; no step left (at step 8 of 8); run directory" in again
