"""What `train.precision = "auto"` means on this device: bf16 where the hardware computes it natively,
fp32 elsewhere.

bf16 autocast over fp32 master weights trains as well as fp32 at this project's sizes and is much
faster where the hardware has bf16 units: on a 2-core AVX-512 BF16 CPU the `tiny` main job ran at 1.53×
the tokens/s of fp32 to the same val_loss (bench/RESULTS.md, "The main job in bf16"). Where bf16 is
emulated (x86 CPUs without AVX-512 BF16 or AMX, GPUs before Ampere) it is slower than fp32, so `auto`
keeps fp32 there. fp16 is never chosen: it needs loss scaling, which a user should ask for.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

# x86 instruction sets with bf16 dot products, as torch.cpu.get_capabilities() names them. ARM's bf16
# extensions are left out until measured.
NATIVE_BF16_CPU_FEATURES = ("avx512_bf16", "amx_bf16")


def cpu_capabilities() -> Mapping[str, object]:
    """This CPU's features as torch detects them (cpuinfo); empty where this torch cannot say (then
    `auto` means fp32, the safe side)."""
    get = getattr(torch.cpu, "get_capabilities", None)  # recent torch: every feature by name
    if get is not None:
        return get()
    older = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # older torch: this one flag
    return {"avx512_bf16": bool(older())} if older is not None else {}


def native_bf16(device: torch.device, capabilities: Mapping[str, object] | None = None) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware (`capabilities`: a CPU's, for tests)."""
    if device.type == "cuda":
        if torch.version.hip:  # ROCm: torch answers for the GPUs it supports
            return torch.cuda.is_bf16_supported()
        return torch.cuda.get_device_capability(device) >= (8, 0)  # Ampere on: bf16 tensor cores
    if device.type != "cpu":
        return False
    caps = cpu_capabilities() if capabilities is None else capabilities
    return any(bool(caps.get(name)) for name in NATIVE_BF16_CPU_FEATURES)


def resolve_precision(name: str, device: torch.device) -> str:
    """`name` itself, or for "auto" the precision it stands for on `device`."""
    if name != "auto":
        return name
    return "bf16" if native_bf16(device) else "fp32"
