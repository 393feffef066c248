"""Model FLOPs utilisation (MFU): the model's FLOPs per second over the device's peak.

    MFU = training FLOPs per token (`lstm_dist.model.flops`) × tokens per second per GPU / peak FLOP/s

The peak is the datasheet's dense figure (without 2:4 structured sparsity, which the datasheets' starred
numbers assume and no training here uses) for the arithmetic the matrix products run in: `bf16` (the
run's bf16 autocast, `Kernels.bf16`), `tf32` (fp32 with TF32 products, `Kernels.tf32`, the default
on CUDA) or `fp32` (the CUDA cores without tensor cores). The GPUs are known by
`torch.cuda.get_device_name()`, exactly: a name not in `PEAK_TFLOPS` (another GPU, a MIG slice, a new
product name) has no peak, and then no MFU is reported rather than one against a wrong peak.

Sources (TFLOP/s, dense; the datasheets print sparse figures for the tensor cores, twice these):
- A100 (SXM4 and PCIe, 40 and 80 GB): NVIDIA A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4):
  FP32 19.5, TF32 156, BF16 312.
- H100 SXM5 (`NVIDIA H100 80GB HBM3`): NVIDIA H100 datasheet and the Hopper whitepaper (132 SMs at the
  1.83 GHz boost): FP32 66.9, TF32 494.7, BF16 989.4 (datasheet: 67, 989 and 1,979 with sparsity);
  tabulated with the whitepaper's dense and sparse columns at glennklockwood.com/garden/processors/h100.
- H200 SXM (`NVIDIA H200`): the same GH100 compute as the H100 SXM5 (H200 datasheet: FP32 67, TF32 989
  and BF16 1,979 with sparsity), so the same dense peaks.
- H100 PCIe: NVIDIA H100 datasheet: FP32 51, TF32 756 and BF16 1,513 with sparsity: 51, 378, 756.5.
"""

from __future__ import annotations

import math
from typing import Optional

PRECISIONS = ("bf16", "tf32", "fp32")

_A100 = {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}
_GH100_SXM = {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}

# torch.cuda.get_device_name() -> dense peak TFLOP/s of the matrix products, by precision (sources above)
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "NVIDIA A100-SXM4-40GB": _A100,
    "NVIDIA A100-SXM4-80GB": _A100,
    "NVIDIA A100-PCIE-40GB": _A100,
    "NVIDIA A100 80GB PCIe": _A100,
    "NVIDIA H100 80GB HBM3": _GH100_SXM,  # the SXM5 board's name
    "NVIDIA H200": _GH100_SXM,  # the SXM board (the NVL card is "NVIDIA H200 NVL", not in the table)
    "NVIDIA H100 PCIe": {"bf16": 756.5, "tf32": 378.0, "fp32": 51.0},
}


def matmul_precision(bf16: bool, tf32: bool) -> str:
    """The arithmetic a run's matrix products use on CUDA, as `PEAK_TFLOPS` names it: `bf16` under bf16
    autocast (`Kernels.bf16`), else `tf32` where TF32 products are on (`Kernels.tf32`), else `fp32`."""
    return "bf16" if bf16 else ("tf32" if tf32 else "fp32")


def peak_flops(device_name: str, precision: str) -> Optional[float]:
    """The dense peak of the GPU named `device_name` (as `torch.cuda.get_device_name()` names it) for
    matrix products in `precision` (one of `PRECISIONS`), in FLOP/s; None for a GPU not in
    `PEAK_TFLOPS` (and for "cpu"). Raises ValueError for a precision not in `PRECISIONS`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    peaks = PEAK_TFLOPS.get(device_name)
    return None if peaks is None else peaks[precision] * 1e12


def model_flops_utilization(tokens_per_s: float, flops_per_token: float, devices: int,
                            peak: Optional[float]) -> Optional[float]:
    """MFU as a fraction (0.41 for 41%): `tokens_per_s` over all `devices` × `flops_per_token` (training
    FLOPs, `model.flops.training_flops_per_token`) / (`devices` × `peak` FLOP/s of one). None where
    there is no peak (`peak_flops` None) or no rate to speak of (not finite). Raises ValueError for
    `devices` < 1."""
    if devices < 1:
        raise ValueError(f"devices must be at least 1, got {devices}")
    if peak is None or peak <= 0 or not math.isfinite(tokens_per_s):
        return None
    return tokens_per_s * flops_per_token / (devices * peak)
