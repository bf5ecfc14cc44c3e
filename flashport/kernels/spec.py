"""How a Triton kernel declares itself for ahead-of-time compilation and per-target launch configs.

Every kernel module in `flashport/kernels/` keeps ONE table of launch configs keyed by target
(`TARGETS` below, plus "interpret" for TRITON_INTERPRET=1 on the CPU) and exports `AOT_SPECS`: a
tuple of `AotSpec`, one per (kernel, variant) the project launches, built from that same table,
so the portability test compiles exactly what runs. A module joins the test by being listed in
`flashport.kernels.KERNEL_MODULES`.

No autotuning keyed on live lengths: the config is a function of the target (and, where a kernel
has a decode and a prefill form, of that form), never of the sequence length of a step.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch

# The four targets every kernel must compile for: name -> (backend, arch, warp size).
TARGETS: dict[str, tuple[str, int | str, int]] = {
    "sm_90": ("cuda", 90, 32),  # H100, H200
    "sm_100": ("cuda", 100, 32),  # B200
    "gfx942": ("hip", "gfx942", 64),  # MI300X (FP8 e4m3fnuz)
    "gfx950": ("hip", "gfx950", 64),  # MI355X
}
INTERPRET = "interpret"  # the Triton interpreter on the CPU (tests)


@dataclass(frozen=True)
class AotSpec:
    name: str  # "<kernel>[<variant>]"
    fn: Any  # the @triton.jit function
    signature: dict[str, str]  # every parameter in order: "*bf16", "*fp32", "*fp8e4nv", "i32", ..., "constexpr"
    constexprs: dict[str, dict[str, Any]]  # target -> constexpr values (from the kernel's config table)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # target -> num_warps, num_stages, ...
    uses_dot: bool = False  # the AMD code must show MFMA, the NVIDIA code wgmma / mma


@functools.lru_cache(maxsize=None)
def _cuda_target(index: int) -> str:
    if torch.version.hip is not None:
        arch = torch.cuda.get_device_properties(index).gcnArchName.split(":")[0]
        return arch if arch in TARGETS else "gfx942" if arch.startswith("gfx94") else "gfx950"
    major, _ = torch.cuda.get_device_capability(index)
    return "sm_100" if major >= 10 else "sm_90"


def target_of(t: torch.Tensor) -> str:
    """The config-table key for a tensor's device: a TARGETS name, or INTERPRET on the CPU."""
    if t.device.type == "cpu":
        return INTERPRET
    return _cuda_target(t.device.index or 0)


# Pointer types of float tensors in an AotSpec signature.
TRITON_PTR: dict[torch.dtype, str] = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}


def fp8_triton_type(dtype: torch.dtype) -> str:
    return {torch.float8_e4m3fn: "*fp8e4nv", torch.float8_e4m3fnuz: "*fp8e4b8"}[dtype]
