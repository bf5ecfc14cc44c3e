"""Which bf16 path is closer to fp32? Prompt log-probs of the tiny checkpoint through the engine:
fp32 reference vs bf16 reference vs bf16 kernels (ops_impl="auto"), same weights.

Usage (repo root, GPU): python3 scripts/gpu/bf16_drift.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernels_check import run  # noqa: E402

from flashport.model.tiny import write_tiny_checkpoint  # noqa: E402


def prompt_lps(outs) -> list[float]:
    return [next(iter(d.values())) for o in outs for d in o.prompt_logprobs[1:]]


def main() -> None:
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 1000, (n,), generator=g).tolist() for n in (37, 5, 64, 130)]
    with tempfile.TemporaryDirectory() as d:
        write_tiny_checkpoint(Path(d) / "t", seed=0)
        kw = dict(max_model_len=512, cache_bytes=1 << 28)
        ref32 = prompt_lps(run(str(Path(d) / "t"), "reference", "float32", prompts, 1, **kw)["outs"])
        for impl in ("reference", "auto"):
            lp = prompt_lps(run(str(Path(d) / "t"), impl, "bfloat16", prompts, 1, **kw)["outs"])
            diff = torch.tensor(lp) - torch.tensor(ref32)
            print(f"bf16 {impl:>9} vs fp32 reference: max |dlogprob| {diff.abs().max():.3f}, "
                  f"mean {diff.abs().mean():.4f} over {len(lp)} prompt tokens")


if __name__ == "__main__":
    main()
