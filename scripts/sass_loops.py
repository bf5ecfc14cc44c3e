"""Static instruction counts of a kernel's inner loops, on any machine (no GPU needed).

    env -u TRITON_INTERPRET python scripts/sass_loops.py MODULE SPEC [KEY=VALUE ...] [--target sm_90] [--lines]

Compiles one AotSpec of MODULE (e.g. flashport.kernels.moe, "moe_gate_up[decode,fp4]") for an
NVIDIA target, with KEY=VALUE overriding its constexprs or launch options (BLOCK_K=64,
DECODE=x2, num_stages=3), disassembles the cubin with the nvdisasm Triton ships, and prints per
loop (a backward branch) its instruction count by opcode, the registers per thread, and with
--lines the instructions per kernel source line. Integer arguments named in --div16 get the
16-divisibility the JIT gives values divisible by 16 (else the loads compile narrower than the
code that runs). Divide a loop's count by the weight values one thread handles per iteration
(BLOCK_N * BLOCK_K / (32 * num_warps) for the MoE GEMMs) for instructions per value:
docs/perf/speed-notes.md uses this to compare decode variants before timing them.
"""

from __future__ import annotations

import argparse
import ast
import collections
import importlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_INS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word: a string constexpr such as DECODE=x2


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "").strip().lower() not in ("", "0", "false", "no", "off"):
        print("run without TRITON_INTERPRET (env -u TRITON_INTERPRET ...)", file=sys.stderr)
        return 2
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("module")
    ap.add_argument("spec")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    ap.add_argument("--target", default="sm_90", choices=("sm_90", "sm_100"))
    ap.add_argument("--lines", action="store_true", help="also count instructions per source line")
    ap.add_argument("--div16", default="num_experts,H,I,stride_we,stride_wn,stride_se,stride_sn",
                    help="comma-separated integer arguments the JIT would see divisible by 16")
    args = ap.parse_args()

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from flashport.kernels.spec import TARGETS

    specs = {s.name: s for s in importlib.import_module(args.module).AOT_SPECS}
    if args.spec not in specs:
        print(f"no spec {args.spec!r} in {args.module}; it has: {', '.join(specs)}", file=sys.stderr)
        return 2
    spec = specs[args.spec]
    consts = dict(spec.constexprs[args.target])
    opts = dict(spec.options.get(args.target, {}))
    for kv in args.overrides:
        if "=" not in kv:
            print(f"override {kv!r} is not KEY=VALUE", file=sys.stderr)
            return 2
        k, v = kv.split("=", 1)
        (opts if k.startswith("num_") or k not in consts else consts)[k] = _value(v)
    div = set(args.div16.split(","))
    attrs = {(i,): [["tt.divisibility", 16]] for i, (k, t) in enumerate(spec.signature.items())
             if t.startswith("*") or k in div}
    backend, arch, warp = TARGETS[args.target]
    compiled = triton.compile(ASTSource(spec.fn, dict(spec.signature), constexprs=consts, attrs=attrs),
                              target=GPUTarget(backend, arch, warp), options=opts)
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as d:
        cubin = Path(d, "k.cubin")
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([str(bin_dir / "nvdisasm"), "-c", "-gi", str(cubin)], capture_output=True,
                              text=True, check=True).stdout
        usage = subprocess.run([str(bin_dir / "cuobjdump"), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", usage)

    # (address, instruction, source line) in order; labels -> address of their first instruction.
    instrs, labels, pending, line = [], {}, [], None
    for raw in sass.splitlines():
        m = re.search(r"## File .*line (\d+)", raw)
        if m:
            line = int(m.group(1))
            continue
        m = re.match(r"\s*\.L_x_(\d+):", raw)
        if m:
            pending.append(m.group(1))
            continue
        m = _INS.search(raw)
        if m:
            addr = int(m.group(1), 16)
            for lab in pending:
                labels[lab] = addr
            pending = []
            instrs.append((addr, m.group(2).strip(), line))
    loops = []
    for addr, ins, _ in instrs:
        t = re.search(r"BRA.*\.L_x_(\d+)", ins)
        if t and labels.get(t.group(1), addr + 1) < addr:
            loops.append((labels[t.group(1)], addr))

    def opcode(ins: str) -> str:
        return re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0].split(".")[0]

    print(f"{args.spec} on {args.target}: {len(instrs)} instructions, {regs.group(1) if regs else '?'} registers, "
          f"{compiled.metadata.shared} B shared; constexprs {consts}; options {opts}")
    src = Path(spec.fn.fn.__code__.co_filename).read_text().splitlines()
    for lo, hi in loops:
        body = [(ins, ln) for a, ins, ln in instrs if lo <= a <= hi]
        ops = collections.Counter(opcode(ins) for ins, _ in body)
        print(f"loop {lo:#x}-{hi:#x}: {len(body)} instructions: {dict(ops.most_common(16))}")
        if args.lines:
            per_line = collections.Counter(ln for _, ln in body)
            for ln, n in per_line.most_common(12):
                text = src[ln - 1].strip()[:80] if ln and ln <= len(src) else "?"
                print(f"  {n:5d}  line {ln}: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
