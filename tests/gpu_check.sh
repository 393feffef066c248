#!/usr/bin/env bash
# Everything a lent GPU should check, in one call of under five minutes (docs/gpu.md says why each part):
#
#   tests/gpu_check.sh                # results in ./gpu-check/, or in $OUT when it is set
#
# 1. every `cuda` test (pytest -m cuda): compiled steps + bf16 autocast + 2 layers against fp32, a window
#    with no host synchronisation, the one-GPU NCCL run with checkpoint and resume;
# 2. `bench --train` over the grid of shapes, bf16 and fp32, ours against cuDNN's torch.nn.LSTM;
# 3. the cluster config's shape (2 x 2048, embedding 256, batch 128, bptt 256): a training step and the
#    layers alone, bf16, with MFU;
# 4. a table of all of it in gpu_check.md, also printed.
# It installs nothing when the package already imports (pip install -e . --no-deps otherwise), and
# stops with one line where torch sees no GPU. Each part has its own time limit and the next runs anyway.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out=${OUT:-gpu-check}
mkdir -p "$out"

if ! python -c "import lstm_dist" 2>/dev/null; then
  pip install -q --no-deps -e . >"$out/install.txt" 2>&1 || { echo "error: pip install -e . failed (see $out/install.txt)"; exit 1; }
fi
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "error: torch sees no CUDA GPU here ($(python -c 'import torch; print(torch.__version__)')); run this on a GPU machine"
  exit 1
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } >"$out/gpu.txt" 2>&1

status=0
# -o addopts=: in one process, without pyproject's `-n auto` (a GPU machine may lack pytest-xdist)
timeout 150 python -m pytest -m cuda -q -p no:cacheprovider -o addopts= >"$out/cuda_tests.txt" 2>&1 || status=1
bench() {  # name, seconds, args...
  local name=$1 limit=$2; shift 2
  timeout "$limit" python -m lstm_dist.bench --device cuda "$@" --json >"$out/$name.json" 2>"$out/$name.err" || status=1
}
bench train_bf16 60 --train --dtype bfloat16 --repeats 10
bench train_fp32 45 --train --dtype float32 --repeats 10
bench cluster_step 30 --train --dtype bfloat16 --shape 2,2048,256,128 --bptt 256 --repeats 10
bench cluster_layers 30 --dtype bfloat16 --layers 2 --hidden 2048 --embedding 256 --batch 128 --bptt 256 --repeats 10 --skip-reference

python - "$out" <<'EOF' | tee "$out/gpu_check.md"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print("# GPU check:", (out / "gpu.txt").read_text().strip().replace("\n", "; "))
tests = (out / "cuda_tests.txt").read_text().strip().splitlines()
print("\n`pytest -m cuda`:", tests[-1] if tests else "(no output)")
for name in ("train_bf16", "train_fp32", "cluster_step"):
    path = out / f"{name}.json"
    try:
        r = json.loads(path.read_text())
    except (OSError, ValueError):
        print(f"\n{name}: no result (see {name}.err)")
        continue
    print(f"\n## {name}: {r['device_name']}, {r['dtype']} (torch.nn.LSTM in {r['baseline_computes_in']}), compile={r['compile']}\n")
    print("| layers | hidden | emb | batch | bptt | lstm_dist ms | nn.LSTM ms | ratio | lstm_dist chars/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for w in r["rows"]:
        print(f"| {w['layers']} | {w['hidden']} | {w['embedding']} | {w['batch']} | {w['bptt']} | {w['lstm_dist_ms']:.2f} | "
              f"{w['torch_lstm_ms']:.2f} | {w['ratio']:.3f} | {w['lstm_dist_chars_per_s']:,.0f} |")
try:
    r = json.loads((out / "cluster_layers.json").read_text())
    print(f"\n## cluster_layers (layers only, {r['dtype']}, kernels {r.get('kernels')}): fast {r['fast_ms']:.2f} ms (MFU {100 * r['fast_mfu']:.1f}%), "
          f"torch.nn.LSTM {r['torch_lstm_ms']:.2f} ms (MFU {100 * r['torch_lstm_mfu']:.1f}%), ratio {r['ratio_fast_vs_torch_lstm']:.3f}")
except (OSError, ValueError, KeyError):
    print("\ncluster_layers: no result (see cluster_layers.err)")
EOF
exit $status
