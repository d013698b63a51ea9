"""`train.precision = "auto"`: bf16 exactly where the device has bf16 units, checked against the kernel's own
view of this CPU (/proc/cpuinfo) and against feature sets of CPUs this machine is not."""

from pathlib import Path

import pytest
import torch

from seektrain.train.precision import cpu_capabilities, native_bf16, resolve_precision

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("features", "native"),
    [
        ({"avx512_bf16": True, "avx512_f": True}, True),  # Zen 4, Cooper Lake
        ({"amx_bf16": True, "amx_tile": True}, True),  # Sapphire Rapids and later
        ({"avx512_f": True, "avx512_bw": True, "avx512_bf16": False}, False),  # Skylake-X: bf16 emulated
        ({"avx2": True, "fma3": True}, False),
        ({"neon": True, "bf16": True}, False),  # ARM's bf16: not measured yet, so fp32
        ({}, False),  # a torch that cannot tell
    ],
)
def test_native_bf16_on_cpu_needs_bf16_dot_products(features, native):
    assert native_bf16(CPU, features) is native


def kernel_cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo (not Linux)")
    flags = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    if not flags:
        pytest.skip("no x86 flags line in /proc/cpuinfo")
    return flags


def test_this_cpu_agrees_with_the_kernels_flags():
    assert native_bf16(CPU) == bool({"avx512_bf16", "amx_bf16"} & kernel_cpu_flags())


def test_older_torch_without_get_capabilities(monkeypatch):
    """Before torch.cpu.get_capabilities, the one flag torch.cpu exposed decides; with neither, fp32."""
    flags = kernel_cpu_flags()
    detect = getattr(torch.cpu, "get_capabilities", None)
    if detect is not None:  # a recent torch: stand in for an older one, whose flag function stood alone
        monkeypatch.delattr(torch.cpu, "get_capabilities")
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: detect()["avx512_bf16"])
    if not hasattr(torch.cpu, "_is_avx512_bf16_supported"):
        pytest.skip("this torch lacks the older flag too")
    assert cpu_capabilities() == {"avx512_bf16": "avx512_bf16" in flags}
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert cpu_capabilities() == {} and resolve_precision("auto", CPU) == "fp32"


def test_explicit_precisions_pass_through_and_auto_resolves():
    for name in ("fp32", "bf16", "fp16"):
        assert resolve_precision(name, CPU) == name
    assert resolve_precision("auto", CPU) == ("bf16" if native_bf16(CPU) else "fp32")
    assert resolve_precision("auto", torch.device("meta")) == "fp32"
