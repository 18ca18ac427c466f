"""Peak dense throughput of known accelerators, to turn achieved TFLOP/s into MFU.

Spec-sheet figures without structured sparsity (NVIDIA data sheets). MFU is quoted against the
spec sheet, which no real kernel reaches: on H100 SXM large bf16 GEMMs measure about 800 of the
989 TFLOP/s (docs/design.md 3), so an MFU of 0.5 is already good. A device that is not in the
table gets no MFU (None, with a note) rather than a guessed peak; CPUs report TFLOP/s only.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from archbench.device import gpu_name

# (pattern on torch.cuda.get_device_name, label, {precision: dense TFLOP/s}). The first match
# wins, so the specific names (PCIe, NVL) come before the generic ones. "fp32" is the CUDA-core
# rate (what fp32 matmuls get with torch's default "highest" precision); "tf32" applies when
# torch.set_float32_matmul_precision allows TF32 tensor cores.
PEAKS: list[tuple[str, str, dict[str, float]]] = [
    (r"GH200", "GH200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"H200.*NVL", "H200 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.8, "fp32": 60.0}),
    (r"H200", "H200 SXM", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"H100.*PCIe", "H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    (r"H100.*NVL", "H100 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.8, "fp32": 60.0}),
    (r"H100", "H100 SXM", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"A100", "A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"L40S", "L40S", {"bf16": 362.1, "fp16": 362.1, "tf32": 183.0, "fp32": 91.6}),
    (r"\bL4\b", "L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"\bA10\b", "A10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
]


def matmul_precision(dtype: str) -> str:
    """The precision the tensor cores run at for a benchmark dtype ('fp32' may really be TF32)."""
    if dtype == "fp32" and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return dtype


def peak_tflops(device_name: str | None, dtype: str) -> tuple[float | None, str]:
    """(peak dense TFLOP/s or None, where it came from / why there is none)."""
    if not device_name:
        return None, "no device name"
    precision = matmul_precision(dtype)
    for pattern, label, peaks in PEAKS:
        if re.search(pattern, device_name):
            if precision not in peaks:
                return None, f"no {precision} peak listed for {label}"
            return peaks[precision], f"{label} {precision} dense spec sheet"
    return None, f"device {device_name!r} is not in the peak table (evaluate/bench/devices.py)"


def utilisation(tflops: float | None, device: torch.device, dtype: str) -> dict[str, Any]:
    """MFU fields of a record: {'mfu', 'peak_tflops', 'peak_source'}; CPU gives None."""
    if device.type != "cuda":
        return {"mfu": None, "peak_tflops": None, "peak_source": "CPU: TFLOP/s only, no MFU"}
    peak, source = peak_tflops(gpu_name(device), dtype)
    mfu = tflops / peak if (peak and tflops is not None) else None
    return {"mfu": mfu, "peak_tflops": peak, "peak_source": source}
