"""Triton kernels: `@triton.jit` bodies, one launcher each, one launch-config table per kernel.

KERNEL_MODULES lists every module that exports `AOT_SPECS` (see spec.py); the ahead-of-time
portability test compiles each spec for gfx942, gfx950, sm_90 and sm_100.
"""

KERNEL_MODULES: tuple[str, ...] = (
    "flashport.kernels.rmsnorm",
    "flashport.kernels.mhc",
    "flashport.kernels.fp8_linear",
    "flashport.kernels.compressor",
    "flashport.kernels.qkv_rope",
    "flashport.kernels.moe",
    "flashport.kernels.attention_decode",
    "flashport.kernels.indexer",
    "flashport.kernels.topk",
)
