"""`python -m lstm_dist.bench`: the real entry point at a tiny shape, its JSON, its errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lstm_dist.bench.__main__ import main
from lstm_dist.common.errors import run_cli
from lstm_dist.bench.layers import format_table, window_flops

ROOT = Path(__file__).resolve().parents[1]


def run_bench(*args: str) -> subprocess.CompletedProcess:
    """The real `python -m lstm_dist.bench ARGS`, a process of its own."""
    return subprocess.run([sys.executable, "-m", "lstm_dist.bench", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def bench_here(capsys, *args: str) -> subprocess.CompletedProcess:
    """`python -m lstm_dist.bench ARGS` through its main() in this process (`run_cli`, as the command
    runs it): the real command line is proven by the test above; a process here would only import torch again."""
    capsys.readouterr()
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as done:
            run_cli(main, list(args))
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, done.value.code, out, err)


def test_bench_json_through_the_entry_point():
    proc = run_bench("--batch-size", "2", "--bptt", "3", "--embedding", "4", "--hidden", "8", "--layers", "2",
                     "--repeats", "3", "--warmup", "1", "--no-compile", "--threads", "1", "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    for key in ("fast_ms", "reference_ms", "torch_lstm_ms"):
        assert isinstance(r[key], float) and r[key] > 0, key
    assert (r["batch"], r["bptt"], r["embedding"], r["hidden"], r["layers"]) == (2, 3, 4, 8, 2)
    assert r["device"] == "cpu" and r["threads"] == 1 and r["compile"] is False
    # `fast` ran the kernels training chooses on this CPU: the C++ loops, or the eager ones where they cannot be built
    assert r["kernels"] in ("cpp_loops", "eager")
    assert r["flops_per_window"] == window_flops(2, 3, 4, 8, 2)
    assert "fast_mfu" not in r  # MFU only on CUDA


def test_bench_table_has_a_row_per_implementation(capsys):
    assert main(["--batch-size", "2", "--bptt", "2", "--embedding", "3", "--hidden", "4", "--repeats", "1",
                 "--warmup", "0", "--no-compile", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert "batch=2 bptt=2 embedding=3 hidden=4" in lines[0] and "fast ran: fp32, " in lines[0]
    assert [ln.split()[0] for ln in lines[2:]] == ["fast", "reference", "torch_lstm"]
    assert lines[-1].split()[4] == "1.000"  # torch's ratio to itself


def test_window_flops_formula():
    # one layer: 3 * 2*4H*(E+H) per character
    assert window_flops(64, 128, 128, 512, 1) == 3 * 2 * 4 * 512 * (128 + 512) * 64 * 128
    # a second layer's input is the hidden width
    assert window_flops(1, 1, 10, 4, 2) == 3 * (2 * 16 * 14 + 2 * 16 * 8)


def test_flops_per_token_are_two_per_weight_of_every_product_of_the_real_model():
    """`model.flops` (bench's count, and training's for perf/mfu) against a real CharLSTM: a token's forward
    is 2 FLOPs (a multiply and an add) per element of each matrix its products use, the layers' W_ih and
    W_hh and the head's weight (not the embedding: a lookup; not the biases: additions), and training 3×
    that. A model that gained or lost a product would fail here."""
    from lstm_dist.config import ModelConfig
    from lstm_dist.model.char_lstm import CharLSTM
    from lstm_dist.model.flops import forward_flops_per_token, training_flops_per_token
    from lstm_dist.model.kernels import Kernels

    model = CharLSTM.from_config(ModelConfig(embedding=10, hidden=4, layers=3), 7, kernels=Kernels())
    weights = sum(q.numel() for name, q in model.named_parameters() if name.endswith(("weight_ih", "weight_hh"))
                  or name == "head.weight")
    assert forward_flops_per_token(10, 4, 3, vocab=7) == 2 * weights == 2 * (16 * 14 + 2 * 16 * 8 + 4 * 7)
    assert training_flops_per_token(10, 4, 3, vocab=7) == 3 * 2 * weights
    assert training_flops_per_token(10, 4, 3) * 5 * 2 == window_flops(5, 2, 10, 4, 3)  # bench: the layers alone
    with pytest.raises(ValueError, match="no such model"):
        forward_flops_per_token(10, 0, 3)


def test_table_shows_mfu_on_cuda_only():
    r = {"device": "cuda:0", "device_name": "H200", "dtype": "bfloat16", "threads": 1, "batch": 1, "bptt": 1,
         "embedding": 1, "hidden": 1, "layers": 1, "compile": True, "repeats": 1,
         "baseline_computes_in": "float16 (cuDNN under autocast)", "path": "bf16, compiled CUDA steps"}
    for name, ms in (("fast", 1.0), ("reference", 4.0), ("torch_lstm", 2.0)):
        r.update({f"{name}_ms": ms, f"{name}_min_ms": ms, f"{name}_chars_per_s": 1e3 / ms,
                  f"{name}_first_window_s": 0.1, f"{name}_mfu": 0.25})
    text = format_table(r)
    assert "MFU" in text and "25.00%" in text
    assert "(torch.nn.LSTM computes in float16 (cuDNN under autocast))  fast ran: bf16, compiled CUDA steps" in \
        text.splitlines()[0]
    assert "0.500" in text.splitlines()[2]


@pytest.mark.parametrize("args,needle", [
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--batch", "0"], "--batch-size must be >= 1"),  # the old name still read, the line names the new one
    (["--threads", "0"], "--threads must be >= 1"),
])
def test_bad_options_end_in_one_line(args, needle, capsys):
    proc = bench_here(capsys, *args)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {needle}, got 0"]


def test_train_bench_times_both_models_at_every_shape_asked(capsys):
    proc = bench_here(capsys, "--train", "--shape", "1,8,4,2", "--shape", "2,8,4,3", "--bptt", "5", "--vocab-size", "7",
                     "--repeats", "2", "--warmup", "1", "--threads", "1", "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["mode"] == "train" and r["vocab"] == 7 and r["baseline_computes_in"] == "float32"
    assert [(row["layers"], row["hidden"], row["embedding"], row["batch"], row["bptt"]) for row in r["rows"]] == [
        (1, 8, 4, 2, 5), (2, 8, 4, 3, 5)]
    for row in r["rows"]:
        assert row["lstm_dist_ms"] > 0 and row["torch_lstm_ms"] > 0
        assert row["ratio"] == pytest.approx(row["lstm_dist_ms"] / row["torch_lstm_ms"])
    assert r["worst_ratio"] == max(row["ratio"] for row in r["rows"])


def test_train_bench_rejects_a_malformed_shape_in_one_line(capsys):
    proc = bench_here(capsys, "--train", "--shape", "2,512,128")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --shape expects layers,hidden,embedding,batch, got '2,512,128'; try --shape 2,512,128,64"]


def test_bench_takes_a_config_and_overrides_with_flags_winning(capsys):
    """Issue 21: `bench --config configs/smoke.yaml` times the config's shape and precision (train.batch_size,
    train.bptt, model.*, train.precision, train.device); overrides win over the file and flags over both.
    Kept cheap: tiny overrides of the smoke config's width, one window each."""
    proc = bench_here(capsys, "--config", str(ROOT / "configs" / "smoke.yaml"), "model.hidden=8", "model.embedding=4",
                      "train.batch_size=3", "--bptt", "2", "--repeats", "1", "--warmup", "0", "--skip-reference",
                      "--threads", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    # smoke.yaml: 1 layer, bptt 128, device cpu, precision auto (fp32 on the CPU); the overrides and --bptt win
    assert (r["layers"], r["hidden"], r["embedding"], r["batch"], r["bptt"]) == (1, 8, 4, 3, 2)
    assert r["device"] == "cpu" and r["dtype"] == "float32" and r["fast_ms"] > 0


def test_bench_names_are_the_settings_and_the_old_ones_still_work():
    from lstm_dist.bench.__main__ import parse_args

    smoke = str(ROOT / "configs" / "smoke.yaml")
    # without a config: bench's own defaults; every old name gives what its new name gives
    new = parse_args(["--batch-size", "8", "--precision", "bf16", "--cuda-graphs", "--no-compile", "--no-tf32",
                      "--train", "--vocab-size", "9"])
    old = parse_args(["--batch", "8", "--dtype", "bfloat16", "--graphs", "--no-compile", "--no-tf32",
                      "--train", "--vocab", "9"])
    for args in (new, old):
        assert (args.batch, args.dtype, args.graphs, args.no_compile, args.no_tf32, args.vocab) == (
            8, "bfloat16", True, True, True, 9)
        assert args.shape == [(1, 512, 128, 8)]  # --train with a shape flag: that one shape, not the grid
    plain = parse_args([])
    assert (plain.batch, plain.bptt, plain.hidden, plain.dtype, plain.no_compile) == (64, 128, 512, "float32", False)
    # --train with a config times its one shape, not the grid; --shape and a shape flag together are refused
    assert parse_args(["--train", "--config", smoke]).shape == [(1, 256, 64, 64)]
    assert parse_args(["--train", "--hidden", "32"]).shape == [(1, 32, 128, 64)]
    assert parse_args(["--train"]).shape is None  # the built-in grid
    assert parse_args(["--config", smoke, "train.precision=bf16", "--device", "cpu"]).dtype == "bfloat16"
    assert parse_args(["--config", smoke, "--precision", "fp32", "train.precision=bf16"]).dtype == "float32"


@pytest.mark.parametrize("args,line", [
    (["--train.batch_size", "4"], "error: --train.batch_size 4 is written train.batch_size=4 here: settings are "
                                  "written section.key=value, without dashes"),
    (["model.hiden=8"], "error: unknown key 'model.hiden'; did you mean 'model.hidden'?"),
    (["--train", "--shape", "1,8,4,2", "--hidden", "8"],
     "error: --shape names whole shapes (layers,hidden,embedding,batch); leave out --hidden with it"),
])
def test_bench_settings_errors_are_one_line(args, line, capsys):
    proc = bench_here(capsys, *args)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [line], proc.stderr


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_part_on_the_cpu_and_leaves_two_files(tmp_path):
    """tests/gpu_check.sh --dry-run: every Python entry the GPU check calls, at tiny shapes on the CPU, so
    that a typo or a missing import never costs a lent GPU's one call. It must leave at most 8 files (all
    that comes back from that machine): the summary, every bench result as a JSON line, and one archive of
    the raw output."""
    import tarfile

    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out)}
    proc = subprocess.run(["bash", str(ROOT / "tests" / "gpu_check.sh"), "--dry-run"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.jsonl", "gpu_check.md", "gpu_check_logs.tgz"]
    lines = [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]
    # a row per shape and path of the three --train parts (one tiny shape each; bf16 grid and cluster shape
    # on the paths, two in the dry run, fp32 on one), the products alone and a profiled window per path
    paths = ["eager", "triton+graphs"]
    assert [r.get("mode", r.get("part")) for r in lines] == ["train"] * 5 + ["product"] + ["window"] * 2, lines
    assert all("kernels" in r and "lstm_dist_ms" in r and r["path"] for r in lines[:5]), lines
    assert [r["asked"] for r in lines[:5]] == paths + ["as asked"] + paths
    assert [r["asked"] for r in lines[6:]] == paths
    assert all(r["kernels_per_window"] > 0 and 0 < r["busy_share"] <= 1 for r in lines[6:]), lines[6:]
    md = (out / "gpu_check.md").read_text()
    assert md.startswith("# GPU check (CPU DRY RUN")
    for section in ("## Environment", "## `pytest -m cuda` (collected only)", "## train_bf16: cpu", "## train_fp32: cpu",
                    "## cluster_step: cpu", "| triton+graphs | fp32, C++ CPU loops |", "## product (the recurrent products alone",
                    "## window (one profiled training step", "CPU ops (a CPU run", "## training run (torchrun, one process, gloo"):
        assert section in md, section
    # the training run: the straight and the resumed run logged steps 12 and 16 (every 4 from the resume at 8)
    assert re.search(r"^\| 12 \| [0-9.]+ \| [0-9.]+ \|", md, re.M) and re.search(r"^\| 16 \| ", md, re.M), md
    assert "no result" not in md, md
    assert "tests collected" in md  # the cuda tests' modules import here (no wandb needed at collection)
    with tarfile.open(out / "gpu_check_logs.tgz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"environment.txt", "cuda_tests.txt", "train_bf16.json", "cluster_step.json", "window.json",
            "train_straight.txt", "train_resumed.txt"} <= names, names
