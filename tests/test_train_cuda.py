"""The CUDA path of the training job: NCCL, bf16 autocast, checkpoint and resume on one GPU.

Skipped where no GPU is visible; on a GPU machine: `pytest -m cuda`.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TINY, load_ckpt, losses, run_train

pytestmark = [pytest.mark.cuda, pytest.mark.slow]


def test_one_gpu_nccl_run_checkpoints_and_resumes(tmp_path, tiny_corpus):
    """The path configs/wikitext103.yaml runs: NCCL, compiled LSTM steps, bf16 autocast, 2 layers."""
    base = [*TINY, f"data.path={tiny_corpus}", f"run.dir={tmp_path}", "train.device=cuda", "train.precision=bf16",
            "model.compile=true", "model.layers=2", "train.steps=12", "checkpoint.every=6"]
    # torchrun with one process: the process group (NCCL) and DDP are used as on a cluster
    proc = run_train(-1, *base, "run.name=straight", cwd=tmp_path)
    assert "(cuda, bf16" in proc.stdout
    assert "torch.compile of the LSTM step failed" not in proc.stdout + proc.stderr
    half = tmp_path / "straight" / "checkpoints" / "step_00000006.pt"
    proc = run_train(-1, *base, "run.name=resumed", f"checkpoint.resume={half}", cwd=tmp_path)
    assert f"resumed from {half} at step 6" in proc.stdout
    a = load_ckpt(tmp_path / "straight" / "checkpoints" / "step_00000012.pt")
    b = load_ckpt(tmp_path / "resumed" / "checkpoints" / "step_00000012.pt")
    for k in a["model"]:
        # cuBLAS and the embedding's backward may sum in another order on a GPU: close, not bitwise
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-3, atol=1e-4)
    la, lb = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    for s in range(7, 13):
        assert la[s] == pytest.approx(lb[s], rel=1e-3)
    assert all(torch.isfinite(v).all() for v in a["model"].values())


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["compiled", "compiled+graphs"])
def test_one_gpu_accumulates_a_global_batch_like_one_pass(tmp_path, tiny_corpus, cuda_graphs):
    """train.global_batch_size on the GPU path: 8 streams in 4 passes of 2 (compiled steps, bf16, NCCL,
    DDP's no_sync; with CUDA graphs, each pass replaying its layer's set) trains like one pass of 8."""
    base = [*TINY, f"data.path={tiny_corpus}", f"run.dir={tmp_path}", "train.device=cuda", "train.precision=bf16",
            "model.compile=true", "model.layers=2", "train.steps=8", f"model.cuda_graphs={str(cuda_graphs).lower()}"]
    run_train(-1, *base, "run.name=one", "train.batch_size=8", cwd=tmp_path)
    proc = run_train(-1, *base, "run.name=four", "train.global_batch_size=8", "train.batch_size=2", cwd=tmp_path)
    assert "× 8 streams in 4 micro-batches of 2 (8 in all: train.global_batch_size)" in proc.stdout
    one, four = losses(tmp_path / "one"), losses(tmp_path / "four")
    assert sorted(one) == sorted(four) == list(range(1, 9))
    for s in one:  # bf16 products of other shapes (2 rows against 8): close, not equal
        assert four[s] == pytest.approx(one[s], rel=2e-2), (s, one, four)
