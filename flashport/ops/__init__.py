"""The op boundary: each op has a torch reference (the slow twin, runs anywhere) and a Triton
kernel path, and one dispatch rule: `impl="auto"` takes the kernel on a CUDA/ROCm tensor and the
torch twin on the CPU; tests force `impl="triton"` on the CPU under TRITON_INTERPRET=1."""

import torch

IMPLS = ("auto", "torch", "triton")


def use_triton(t: torch.Tensor, impl: str) -> bool:
    """The dispatch rule of every op: Triton for "triton", or for "auto" on a GPU tensor (ROCm
    tensors are "cuda" too); the torch twin otherwise."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl == "triton" or (impl == "auto" and t.device.type != "cpu")
