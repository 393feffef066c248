#!/usr/bin/env bash
# Everything a lent GPU should check, in one call of under six minutes (docs/gpu.md says why each part):
#
#   tests/gpu_check.sh                # results in ./gpu-check/, or in $OUT when it is set
#   tests/gpu_check.sh --dry-run      # every Python entry it calls, at tiny shapes on the CPU (CI runs it)
#
# 0. the environment: GPU, driver, torch, CUDA, cuDNN, NCCL, the TF32 flags;
# 1. every `cuda` test (pytest -m cuda): compiled steps + bf16 autocast + 2 layers against fp32, a window
#    with no host synchronisation, one visible GPU per process, TF32 flags, the one-GPU NCCL run with
#    checkpoint and resume;
# 2. `bench --train` over the grid of shapes, bf16 on every path (eager, compiled, compiled + CUDA graphs,
#    Triton, Triton + CUDA graphs: `--paths`) and fp32 on the compiled one (TF32 products, as cuDNN), each
#    against cuDNN's torch.nn.LSTM timed in the same process, interleaved;
# 3. the cluster config's shape (2 x 2048, embedding 256, batch 128, bptt 256): a training step on every
#    path, bf16, with MFU;
# 4. the recurrent products alone at that shape (the device's own floor for the time loop), and one
#    training step on every path under torch.profiler: kernels per window, the share of it the GPU is
#    busy, the host's time to queue it, the top kernels (`python -m lstm_dist.bench.profile`);
# 5. a real training run over NCCL at that shape (torchrun, the built-in corpus): 16 steps with a
#    checkpoint at 8, then a resume from it to 16, the two runs' losses side by side;
# 6. a table of all of it in gpu_check.md, also printed.
#
# The machine it is made for: its own python3 (or $PYTHON), torch 2.11 or later, no wandb, no network,
# nothing installed; the package is imported from this checkout. At most 8 files come back from such a
# machine, so it leaves three: gpu_check.md, gpu_check.jsonl (every bench result as one JSON line, written
# the moment it is measured) and gpu_check_logs.tgz (every part's raw output). Each part has
# its own time limit and the next runs anyway; it stops with one line where torch sees no GPU.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; elif [ -n "${1:-}" ]; then
  echo "error: unknown argument ${1}; use tests/gpu_check.sh [--dry-run]" >&2; exit 2
fi
out=${OUT:-gpu-check}
raw="$out/raw"
mkdir -p "$raw" || exit 1
rm -f "$out/gpu_check.jsonl"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! command -v "$PY" >/dev/null; then
  echo "error: $PY not found; set PYTHON to the interpreter that has torch" >&2; exit 1
fi
# The environment, and whether this interpreter imports torch and this checkout and (unless --dry-run) sees
# a GPU: one interpreter for all three (each new one spends seconds importing torch). Exit 4: no import; 3: no GPU.
"$PY" - "$dry" >"$raw/environment.txt" 2>&1 <<'EOF'
import sys
try:
    import lstm_dist  # noqa: F401 - from this checkout (PYTHONPATH)
    import torch
except Exception:  # noqa: BLE001 - any import failure is this part's answer
    import traceback
    traceback.print_exc()
    sys.exit(4)
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
if sys.argv[1] == "0" and not torch.cuda.is_available():
    sys.exit(3)
try:
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None
except Exception as exc:  # noqa: BLE001 - a build without NCCL
    nccl = f"unavailable ({type(exc).__name__})"
print("NCCL", nccl)
print("TF32 at start: matmul", torch.backends.cuda.matmul.allow_tf32, "| cudnn", torch.backends.cudnn.allow_tf32,
      "| float32_matmul_precision", torch.get_float32_matmul_precision())
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"GPU {i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs")
else:
    print("GPU: none (a CPU dry run)")
EOF
case $? in
  0) ;;
  4) echo "error: $PY cannot import torch and lstm_dist from this checkout (see $raw/environment.txt)" >&2; exit 1 ;;
  3) echo "error: torch sees no CUDA GPU here ($(head -n 1 "$raw/environment.txt" | cut -d' ' -f2)); run this on a GPU machine, or --dry-run" >&2
     exit 1 ;;
  *) echo "error: $PY failed while describing the environment (see $raw/environment.txt)" >&2; exit 1 ;;
esac
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$raw/environment.txt" 2>&1

status=0
if [ $dry = 1 ]; then
  # float32 for the layers alone: oneDNN has no bf16 LSTM on every CPU, and the dtype is the GPU run's concern
  device=cpu; grid=(--shape "1,8,4,2" --bptt 8); cluster=(--shape "2,16,8,2" --bptt 8)
  tests=(--collect-only); reps=2; t_tests=120; t_cluster=120; t_bf16=120; t_fp32=120
  t_product=120; t_window=120; t_train=120; t_prepare=120
  product=(--hidden 16 --batch-size 2 --bptt 8 --precision fp32); window=(--shape "2,16,8,2" --bptt 8 --precision fp32)
  model=(model.hidden=16 model.embedding=8 model.layers=2 train.batch_size=8 train.bptt=8 train.threads=1)
  # a corpus of this checkout's own text, small enough that the run's final evaluation (the whole valid
  # and test splits) takes a second, not the built-in corpus's ten
  corpus=(--source files --train README.md --valid docs/gpu.md --test docs/lr_sweep.md)
else
  device=cuda; grid=(); cluster=(--shape "2,2048,256,128" --bptt 256)
  # the parts' limits add up to 6 minutes; a part its limit stops keeps the rows it wrote
  tests=(); reps=10; t_tests=90; t_bf16=65; t_fp32=25; t_cluster=60; t_product=10; t_window=40; t_train=30; t_prepare=10
  product=(--hidden 2048 --batch-size 128 --bptt 256 --precision bf16); window=(--shape "2,2048,256,128" --bptt 256 --precision bf16)
  model=(model.hidden=2048 model.embedding=256 model.layers=2 train.batch_size=128 train.bptt=256
         train.precision=bf16 model.compile=true)
  corpus=(--source stdlib-docs)
fi
# Each part is `python -m MODULE ARGS` with its stdout and stderr in files. On the GPU every part is a process
# of its own under its time limit. In the dry run the parts are queued and then run in turn by one interpreter
# (runpy: the same entry points and arguments), since each new interpreter spends ~5 s importing torch and
# CI's whole suite has 6 minutes.
queue="$raw/.parts"
: >"$queue"
part() {  # seconds, stdout file, stderr file (the same file: both in one), module, args...
  local limit=$1 so=$2 se=$3; shift 3
  if [ $dry = 1 ]; then
    printf '%q ' "$so" "$se" "$@" >>"$queue"
    printf '\n' >>"$queue"
  elif [ "$so" = "$se" ]; then
    timeout "$limit" "$PY" -m "$@" >"$so" 2>&1 || status=1
  else
    timeout "$limit" "$PY" -m "$@" >"$so" 2>"$se" || status=1
  fi
}
run_queued() {  # the dry run's queued parts, in one interpreter; status 1 where a part failed
  [ $dry = 1 ] || return 0
  "$PY" - "$queue" <<'EOF' || status=1
import os, runpy, shlex, sys, traceback
failed = False
for line in open(sys.argv[1]).read().splitlines():
    so, se, module, *args = shlex.split(line)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd_out = os.open(so, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    fd_err = fd_out if se == so else os.open(se, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd_out, 1)
    os.dup2(fd_err, 2)
    sys.argv = [module, *args]
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - a part's crash goes to its own file; the next part runs
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in {fd_out, fd_err, *saved}:
            os.close(fd)
    failed = failed or code != 0
sys.exit(1 if failed else 0)
EOF
}
# In one process, without pyproject's `-n auto` and without pytest-xdist at all (a GPU machine may lack it;
# the dry run then proves that conftest loads without it)
part "$t_tests" "$raw/cuda_tests.txt" "$raw/cuda_tests.txt" pytest -m cuda -q -p no:cacheprovider -p no:xdist \
  -o addopts= "${tests[@]}"
bench() {  # name, seconds, args...
  local name=$1 limit=$2; shift 2
  # every result also goes to gpu_check.jsonl the moment it is measured: a part its time limit stops keeps
  # the rows it finished
  part "$limit" "$raw/$name.json" "$raw/$name.err" lstm_dist.bench --device "$device" "$@" --json \
    --jsonl "$out/gpu_check.jsonl"
}
paths=eager,compiled,compiled+graphs,triton,triton+graphs  # model.compile / model.triton / model.cuda_graphs
# on the CPU every path runs the C++ loops: two of them prove the --paths plumbing, in less of CI's time
[ $dry = 1 ] && paths=eager,triton+graphs
bench train_bf16 "$t_bf16" --train --precision bf16 --repeats "$reps" "${grid[@]}" --paths "$paths"
bench train_fp32 "$t_fp32" --train --precision fp32 --repeats "$reps" "${grid[@]}"
bench cluster_step "$t_cluster" --train --precision bf16 "${cluster[@]}" --repeats "$reps" --paths "$paths"
profile_part() {  # part, seconds, args...
  local name=$1 limit=$2; shift 2
  part "$limit" "$raw/$name.json" "$raw/$name.err" lstm_dist.bench.profile "$name" --device "$device" "$@" --json \
    --jsonl "$out/gpu_check.jsonl"
}
profile_part product "$t_product" "${product[@]}" --repeats "$reps"
profile_part window "$t_window" "${window[@]}" --paths "$paths"
run_queued
rm -f "$queue"
# a real run over NCCL (gloo in the dry run): 16 steps, a checkpoint at 8, then a resume from it to 16
work="$out/train_run"
train=("$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m lstm_dist.train --config configs/smoke.yaml
       "run.dir=$work" "data.path=$work/data" log.wandb.mode=disabled "train.device=$device" train.steps=16
       checkpoint.every=8 log.every=4 train.eval_every=0 train.sample_chars=0 "${model[@]}")
timeout "$t_prepare" "$PY" -m lstm_dist.data prepare "${corpus[@]}" --out "$work/data" >"$raw/train_data.txt" 2>&1 \
  || status=1
timeout "$t_train" "${train[@]}" run.name=straight >"$raw/train_straight.txt" 2>&1 || status=1
timeout "$t_train" "${train[@]}" run.name=resumed "checkpoint.resume=$work/straight/checkpoints/step_00000008.pt" \
  >"$raw/train_resumed.txt" 2>&1 || status=1
for name in straight resumed; do cp "$work/$name/metrics.jsonl" "$raw/train_$name.jsonl" 2>/dev/null; done
rm -rf "$work"

"$PY" - "$raw" "$dry" <<'EOF' | tee "$out/gpu_check.md"
import json, pathlib, sys
raw, dry = pathlib.Path(sys.argv[1]), sys.argv[2] == "1"
print("# GPU check" + (" (CPU DRY RUN: tiny shapes on the CPU; no figure below is a GPU's)" if dry else ""))
print("\n## Environment\n")
print("\n".join(f"- {line}" for line in (raw / "environment.txt").read_text().strip().splitlines()))
tests = (raw / "cuda_tests.txt").read_text().strip().splitlines()
print("\n## `pytest -m cuda`" + (" (collected only)" if dry else "") + "\n")
print(tests[-1] if tests else "(no output)")
from lstm_dist.model.flops import training_flops_per_token  # the count training's perf/mfu uses
from lstm_dist.training.mfu import peak_flops
for name in ("cluster_step", "train_bf16", "train_fp32"):
    try:
        r = json.loads((raw / f"{name}.json").read_text())
    except (OSError, ValueError):
        print(f"\n## {name}\n\nno result (see {name}.err in gpu_check_logs.tgz; rows measured before a time "
              "limit are in gpu_check.jsonl)")
        continue
    print(f"\n## {name}: {r['device_name']}, {r['dtype']} (torch.nn.LSTM in {r['baseline_computes_in']}), "
          f"median of {r['repeats']}, interleaved\n")
    def precision(w):  # the matrix products' arithmetic: bf16 autocast, else TF32 where the row's kernels had it
        return "bf16" if r["dtype"] == "bfloat16" else ("tf32" if w.get("tf32") else "fp32")
    print("| layers | hidden | emb | batch | bptt | asked | path that ran | lstm_dist ms | nn.LSTM ms | ratio | "
          "x cuDNN chars/s | lstm_dist chars/s | MFU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for w in r["rows"]:
        flops = training_flops_per_token(w["embedding"], w["hidden"], w["layers"], r["vocab"])
        peak = peak_flops(r["device_name"], precision(w))
        mfu = "n/a" if peak is None else f"{100 * flops * w['lstm_dist_chars_per_s'] / peak:.1f}%"
        print(f"| {w['layers']} | {w['hidden']} | {w['embedding']} | {w['batch']} | {w['bptt']} | {w.get('asked', '')} | "
              f"{w.get('path', w['kernels'])} | {w['lstm_dist_ms']:.2f} | {w['torch_lstm_ms']:.2f} | {w['ratio']:.3f} | "
              f"{1 / w['ratio']:.2f} | {w['lstm_dist_chars_per_s']:,.0f} | {mfu} |")
    print("\nMFU: the model's matrix-product FLOPs of forward + backward per character (layers and head: "
          "lstm_dist.model.flops, as training's perf/mfu) times chars/s, over the device's dense peak in the "
          "row's arithmetic (lstm_dist.training.mfu); n/a where the device is not in its table")
try:
    r = json.loads((raw / "product.json").read_text())
    print(f"\n## product (the recurrent products alone, {r['dtype']}, hidden {r['hidden']}, batch {r['batch']}, "
          f"bptt {r['bptt']})\n\n{r['product_ms_per_window_layer']:.2f} ms per window and layer (forward + backward), "
          f"{r['product_tflops']:.1f} TFLOP/s; one kernel per product: {r['one_kernel_product']}")
except (OSError, ValueError, KeyError):
    print("\n## product\n\nno result (see product.err in gpu_check_logs.tgz)")
try:
    profiled = [json.loads(line) for line in (raw / "window.json").read_text().splitlines() if line.strip()]
except (OSError, ValueError):
    profiled = []
if not profiled:
    print("\n## window\n\nno result (see window.err in gpu_check_logs.tgz)")
else:
    r = profiled[0]
    print(f"\n## window (one profiled training step per path, {r['dtype']}, {r['layers']} x {r['hidden']}, "
          f"batch {r['batch']}, bptt {r['bptt']})\n")
    print(f"| asked | path that ran | {r['counted']} per window | per layer and step | busy ms | span ms | busy share "
          "| host ms to queue |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in profiled:
        print(f"| {r['asked']} | {r['path']} | {r['kernels_per_window']} | {r['kernels_per_layer_step']:.2f} | "
              f"{r['busy_ms']:.1f} | {r['span_ms']:.1f} | {100 * r['busy_share']:.1f}% | {r['host_ms']:.1f} |")
    for r in profiled:
        print(f"\n{r['asked']}, top:\n\n| kernel | count | ms |\n| --- | --- | --- |")
        for k in r["top"]:
            print(f"| `{k['name']}` | {k['count']} | {k['ms']:.2f} |")
def rows(name):
    try:
        return {m["step"]: m for m in map(json.loads, (raw / f"train_{name}.jsonl").read_text().splitlines())
                if "train/loss" in m}
    except (OSError, ValueError, KeyError):
        return {}
a, b = rows("straight"), rows("resumed")
print("\n## training run (torchrun, one process, " + ("gloo" if dry else "NCCL") + "; checkpoint at 8, resumed to 16)\n")
if not a or not b:
    print("no result (see train_straight.txt and train_resumed.txt in gpu_check_logs.tgz)")
else:
    print("| step | straight loss | resumed loss | straight chars/s | straight MFU |\n| --- | --- | --- | --- | --- |")
    for step in sorted(set(a) & set(b)):
        mfu = a[step].get("perf/mfu")  # where the GPU's peak is known (lstm_dist.training.mfu)
        print(f"| {step} | {a[step]['train/loss']:.4f} | {b[step]['train/loss']:.4f} | "
              f"{a[step]['perf/chars_per_s']:,.0f} | {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} |")
EOF
tar czf "$out/gpu_check_logs.tgz" -C "$raw" . && rm -rf "$raw"
exit $status
