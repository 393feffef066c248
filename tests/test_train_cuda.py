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
