"""Every kernel of every module in KERNEL_MODULES compiles for gfx942, gfx950, sm_90 and sm_100.

Runs `python -m flashport.kernels.aot` in a subprocess without TRITON_INTERPRET (conftest sets it
for this process). A new kernel module joins by being listed in KERNEL_MODULES; this file does not
change. The first run after a kernel edit compiles everything (tens of seconds); later runs hit
Triton's cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from flashport.kernels import KERNEL_MODULES
from flashport.kernels.spec import TARGETS

REPO = Path(__file__).resolve().parents[1]


def test_every_kernel_compiles_for_every_target(tmp_path):
    out = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "flashport.kernels.aot", "--json", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert out.exists(), f"no JSON written (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    report = json.loads(out.read_text())
    failed = [r for r in report["results"] if not r["ok"]]
    assert not failed, "\n".join(f"{r['kernel']} @ {r['target']}: {r['error']}" for r in failed)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    compiled = {(r["module"], r["kernel"]) for r in report["results"]}
    assert compiled, "no kernel was compiled"
    assert {m for m, _ in compiled} == set(KERNEL_MODULES)
    for module, kernel in compiled:  # each (spec, target) exactly once, matrix units where promised
        rows = [r for r in report["results"] if (r["module"], r["kernel"]) == (module, kernel)]
        assert sorted(r["target"] for r in rows) == sorted(TARGETS), kernel
        for r in rows:
            if r["uses_dot"]:
                want = "v_mfma" if TARGETS[r["target"]][0] == "hip" else "mma"
                assert any(want in m for m in r["matrix"]), f"{kernel} @ {r['target']}: {r['matrix']}"


def test_refuses_to_run_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "flashport.kernels.aot"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "TRITON_INTERPRET" in proc.stderr
