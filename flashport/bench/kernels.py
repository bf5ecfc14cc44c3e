"""`flashport bench kernels`: every kernel benchmark of the project in one go.

Runs each `scripts/gpu/bench_*.py` as a subprocess (`--out DIR/<name>`, plus `--tiny` where the
script has it), then reads the JSON it wrote and prints, for every case it finds, the kernel time,
its floor and the fraction of the floor. The scripts write their own row layouts; a case is any
JSON object with a time in microseconds (`*_us`) and a floor (`floor_us` or `frac_of_floor`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from flashport.errors import FlashportError

REPO = Path(__file__).resolve().parents[2]
_NAME_KEYS = ("name", "case", "kernel", "op", "weight", "form", "mix", "phase", "n", "N", "M", "batch", "ctx",
              "context", "shape")
_TIME_KEYS = ("fused_us", "kernel_us", "triton_us", "time_us", "median_us", "us", "eager_us", "op_us")


def find_scripts(root: Path = REPO) -> list[Path]:
    return sorted((root / "scripts" / "gpu").glob("bench_*.py"))


def extract_cases(data, path: str = "") -> list[dict]:
    """Every JSON object with a time and a floor, as {case, time_us, floor_us, frac}."""
    out: list[dict] = []
    if isinstance(data, dict):
        t = next((data[k] for k in _TIME_KEYS if isinstance(data.get(k), (int, float))), None)
        if t is None:
            t = next((v for k, v in data.items() if k.endswith("_us") and isinstance(v, (int, float))
                      and not any(w in k for w in ("floor", "twin", "ref", "torch"))), None)
        floor = data.get("floor_us")
        frac = data.get("frac_of_floor")
        if t is not None and (floor is not None or frac is not None):
            name = " ".join(f"{k}={data[k]}" for k in _NAME_KEYS if k in data and not isinstance(data[k], (dict, list)))
            if frac is None and floor:
                frac = floor / t if t else None
            out.append({"case": name or path, "time_us": t, "floor_us": floor, "frac": frac})
            return out
        for k, v in data.items():
            out += extract_cases(v, f"{path}.{k}" if path else k)
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out += extract_cases(v, f"{path}[{i}]")
    return out


def run_kernel_benches(out: Path, *, tiny: bool = False, only: list[str] | None = None, timeout: float = 600.0,
                       python: str = sys.executable) -> dict:
    scripts = find_scripts()
    if only:
        scripts = [s for s in scripts if any(o in s.stem for o in only)]
        if not scripts:
            raise FlashportError(f"--only {only}: no scripts/gpu/bench_*.py matches")
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"scripts": {}}
    for s in scripts:
        d = out / s.stem
        d.mkdir(exist_ok=True)
        cmd = [python, str(s), "--out", str(d)]
        if tiny and "--tiny" in s.read_text():
            cmd.append("--tiny")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if tiny:
            env["TRITON_INTERPRET"] = "1"
        t = time.perf_counter()
        try:
            p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
            rc, log = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            rc, log = "timeout", (e.stdout or "") if isinstance(e.stdout, str) else ""
        (d / "log.txt").write_text(log)
        cases = []
        for f in sorted(d.glob("*.json")):
            try:
                cases += extract_cases(json.loads(f.read_text()))
            except json.JSONDecodeError:
                pass
        results["scripts"][s.stem] = {"rc": rc, "seconds": time.perf_counter() - t, "cases": cases,
                                      "tail": log[-800:] if rc != 0 else ""}
        print(f"{s.stem}: rc {rc}, {time.perf_counter() - t:.0f} s, {len(cases)} cases", flush=True)
    (out / "kernels.json").write_text(json.dumps(results, indent=1))
    print(render_table(results))
    return results


def render_table(results: dict) -> str:
    lines = [f"{'script':<20} {'case':<48} {'time us':>10} {'floor us':>10} {'of floor':>9}"]
    for name, r in results["scripts"].items():
        if not r["cases"]:
            lines.append(f"{name:<20} {'(no cases; rc ' + str(r['rc']) + ')':<48}")
        for c in r["cases"]:
            fl = "n/a" if c["floor_us"] is None else f"{c['floor_us']:.1f}"
            fr = "n/a" if c["frac"] is None else f"{100 * c['frac']:.1f}%"
            lines.append(f"{name:<20} {c['case'][:48]:<48} {c['time_us']:>10.1f} {fl:>10} {fr:>9}")
    return "\n".join(lines)
