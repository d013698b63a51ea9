"""`train.precision = "auto"`: bf16 exactly where the device has bf16 units, checked against the kernel's own
view of this CPU (/proc/cpuinfo) and against feature sets of CPUs this machine is not."""

from pathlib import Path

import pytest
import torch

from seektrain.train.precision import native_bf16, resolve_precision

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


def test_this_cpu_agrees_with_the_kernels_flags():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo (not Linux)")
    flags = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    if not flags:
        pytest.skip("no x86 flags line in /proc/cpuinfo")
    assert native_bf16(CPU) == bool({"avx512_bf16", "amx_bf16"} & flags)


def test_explicit_precisions_pass_through_and_auto_resolves():
    for name in ("fp32", "bf16", "fp16"):
        assert resolve_precision(name, CPU) == name
    assert resolve_precision("auto", CPU) == ("bf16" if native_bf16(CPU) else "fp32")
    assert resolve_precision("auto", torch.device("meta")) == "fp32"
