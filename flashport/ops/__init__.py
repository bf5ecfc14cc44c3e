"""The op boundary: each op has a torch reference (the slow twin, runs anywhere) and a Triton
kernel path, and one dispatch rule: `impl="auto"` takes the kernel on a CUDA/ROCm tensor and the
torch twin on the CPU; tests force `impl="triton"` on the CPU under TRITON_INTERPRET=1."""
