"""Ahead-of-time compile of every kernel for every target, on any machine (no GPU needed).

    python -m flashport.kernels.aot [--json FILE] [--targets T ...] [--modules MOD ...] [--jobs N]

Imports each module of `flashport.kernels.KERNEL_MODULES`, compiles each of its `AOT_SPECS` for
each target of spec.TARGETS with `triton.compile(ASTSource(...), target=GPUTarget(...))`, checks
shared memory against the target's limit and, for `uses_dot` specs, that the matrix units are used:
MFMA in the AMD assembly, wgmma / tcgen05.mma / mma.sync in the NVIDIA PTX. Prints one row per
(kernel, target) and exits 1 if anything failed (a module that does not import or exports no specs
counts as a failure). Needs real `@triton.jit` functions, so it refuses to run under
TRITON_INTERPRET. Compiled kernels land in Triton's cache: a rerun without kernel edits is quick.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import os
import re
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

_FALSE = ("", "0", "false", "no", "off")
# Matrix instructions: AMD MFMA mnemonics; NVIDIA Hopper wgmma, Blackwell tcgen05.mma, Ampere-style mma.sync.
_AMD_MATRIX = re.compile(r"\bv_mfma_\w+")
_NV_MATRIX = re.compile(r"\b(wgmma\.mma_async|tcgen05\.mma|mma\.sync)\b")
# Shared memory (LDS) a workgroup may use: triton.compile does not check it, the launch would fail.
SMEM_LIMIT = {"sm_90": 232448, "sm_100": 232448, "gfx942": 65536, "gfx950": 163840}


@dataclass
class Result:
    module: str
    kernel: str
    target: str
    ok: bool
    seconds: float = 0.0
    shared_bytes: int = 0
    uses_dot: bool = False
    matrix: list[str] = field(default_factory=list)  # distinct matrix instructions in the assembly
    error: str = ""


def matrix_instructions(asm: dict[str, Any], backend: str) -> list[str]:
    if backend == "hip":
        return sorted(set(_AMD_MATRIX.findall(str(asm.get("amdgcn", "")).lower())))
    return sorted(set(_NV_MATRIX.findall(str(asm.get("ptx", "")))))


def compile_spec(module: str, spec: Any, target: str) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from flashport.kernels.spec import TARGETS

    res = Result(module, spec.name, target, ok=False, uses_dot=spec.uses_dot)
    backend, arch, warp = TARGETS[target]
    t0 = time.perf_counter()
    try:
        if target not in spec.constexprs:
            raise ValueError(f"no constexprs for target {target}")
        params = list(getattr(spec.fn, "arg_names", []))
        if list(spec.signature) != params:
            raise ValueError(f"signature names {list(spec.signature)} != kernel parameters {params}")
        # Pointers 16-byte aligned, as the JIT sees them at run time (without the hint the loads
        # compile scalarised and the code differs from what launches).
        attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(spec.signature.values()) if t.startswith("*")}
        src = ASTSource(spec.fn, dict(spec.signature), constexprs=dict(spec.constexprs[target]), attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget(backend, arch, warp),
                                  options=dict(spec.options.get(target, {})))
        res.matrix = matrix_instructions(compiled.asm, backend)
        res.shared_bytes = int(compiled.metadata.shared)
        if res.shared_bytes > SMEM_LIMIT.get(target, res.shared_bytes):
            raise RuntimeError(f"uses {res.shared_bytes} B of shared memory, {target} allows {SMEM_LIMIT[target]}")
        if spec.uses_dot and not res.matrix:
            raise RuntimeError("uses_dot, but no " + ("MFMA" if backend == "hip" else "wgmma / mma")
                               + " instruction in the assembly")
        res.ok = True
    except Exception as e:  # one failing (kernel, target) must not hide the others
        res.error = f"{type(e).__name__}: {e}".strip()[:4000]
        if os.environ.get("FLASHPORT_AOT_TRACE"):
            traceback.print_exc()
    res.seconds = time.perf_counter() - t0
    return res


def _specs_of(module: str) -> tuple[Any, ...]:
    specs = tuple(getattr(importlib.import_module(module), "AOT_SPECS", ()))
    if not specs:
        raise ValueError("exports no AOT_SPECS")
    return specs


def _compile_task(module: str, index: int, target: str) -> Result:
    return compile_spec(module, _specs_of(module)[index], target)


def run(modules: tuple[str, ...], targets: tuple[str, ...], jobs: int = 1) -> list[Result]:
    """One Result per (spec, target) in module / spec / target order; compiles in `jobs` processes."""
    slots: list[Result | tuple[str, int, str]] = []
    for module in modules:
        try:
            specs = _specs_of(module)
        except Exception as e:
            slots.append(Result(module, f"<{module}>", "*", ok=False, error=f"{type(e).__name__}: {e}"[:300]))
            continue
        slots += [(module, i, target) for i in range(len(specs)) for target in targets]
    tasks = [s for s in slots if isinstance(s, tuple)]
    if jobs <= 1 or len(tasks) <= 1:
        done = [_compile_task(*t) for t in tasks]
    else:
        # spawn: a fresh interpreter per worker (forking a process that loaded torch is fragile)
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = [pool.submit(_compile_task, *t) for t in tasks]
            done = []
            for (module, index, target), fut in zip(tasks, futures):
                try:
                    done.append(fut.result())
                except Exception as e:  # the worker died (e.g. the compiler crashed)
                    done.append(Result(module, f"<spec {index}>", target, ok=False,
                                       error=f"{type(e).__name__}: {e}"[:4000]))
    it = iter(done)
    return [s if isinstance(s, Result) else next(it) for s in slots]


def table(results: list[Result]) -> str:
    rows = [("kernel", "target", "status", "s", "smem", "matrix")]
    for r in results:
        status = "ok" if r.ok else "ERROR"
        matrix = ",".join(r.matrix) or ("-" if not r.uses_dot or not r.ok else "none")
        last_line = next((ln for ln in reversed(r.error.splitlines()) if ln.strip()), "")[:200]
        rows.append((r.kernel, r.target, status, f"{r.seconds:.2f}", str(r.shared_bytes),
                     matrix + ("" if r.ok else f"  {last_line}")))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row[:5], widths)) + "  " + row[5] for row in rows)


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("TRITON_INTERPRET", "").strip().lower() not in _FALSE:
        print("flashport.kernels.aot: TRITON_INTERPRET is set; the interpreter replaces @triton.jit "
              "functions, so nothing can be compiled. Run it without TRITON_INTERPRET "
              "(e.g. `env -u TRITON_INTERPRET python -m flashport.kernels.aot`).", file=sys.stderr)
        return 2
    from flashport.kernels import KERNEL_MODULES
    from flashport.kernels.spec import TARGETS

    ap = argparse.ArgumentParser(prog="python -m flashport.kernels.aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    ap.add_argument("--modules", nargs="+", default=list(KERNEL_MODULES),
                    help="kernel modules (default: flashport.kernels.KERNEL_MODULES)")
    # Worker processes pay a torch import each: a win for cold compiles on many cores, a loss
    # when Triton's cache is warm or cores are few.
    ap.add_argument("--jobs", type=int, default=max(1, min(8, (os.cpu_count() or 1) // 2)),
                    help="compile in this many processes (default: half the CPUs, at most 8)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    results = run(tuple(args.modules), tuple(args.targets), args.jobs)
    failed = [r for r in results if not r.ok]
    print(table(results))
    print(f"{len(results) - len(failed)}/{len(results)} compiled for {', '.join(args.targets)} "
          f"from {len(args.modules)} modules in {time.perf_counter() - t0:.1f}s"
          + ("" if not failed else f"; {len(failed)} FAILED"))
    if not args.modules:
        print("no kernel modules listed", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(ok=not failed and bool(args.modules), targets=list(args.targets),
                           modules=list(args.modules), results=[asdict(r) for r in results]), f, indent=1)
    return 1 if failed or not args.modules else 0


if __name__ == "__main__":
    sys.exit(main())
