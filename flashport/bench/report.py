"""`flashport bench report`: the report's table from stored results, as Markdown, JSON and PNG plots.

Rows follow shared/perf/anchors.md "Metric definitions". Columns: measured here (device named,
layers and shortened lengths stated), projected to H100 / H200 / MI300X / MI355X / B200 x8 (always
labelled projected), and the published anchors. Cost per 1M tokens comes from a price table the
user can override (`--prices FILE`, see cost.py).

Projection method (also written into every report):

- fraction f = floor / measured time, for the prefill steps and for the steady decode steps of
  each workload, with the floor on the H200 *datasheet* figures (4.8 TB/s, 989 TFLOP/s bf16);
- the full model (all layers) on 8 GPUs of device X: tensor-parallel dense layers + expert-parallel
  experts, bytes and FLOPs split 8 ways, two collectives per layer over X's link (roofline.floor);
  that floor on X's datasheet figures divided by f is the projected time (f is assumed to carry
  over to more layers, more GPUs and other devices: the engine keeps the same fraction of the
  roofline; the collectives are added at link speed, not scaled by f; their overlap with compute
  and load imbalance are not modelled);
- a workload of C requests (ISL in, target OSL out) runs in waves: the C prompts prefilled, then
  OSL decode steps at batch C and context ISL + OSL/2; output tok/s = C x OSL / wave time, total
  tok/s = C x (ISL + OSL) / wave time, per GPU = / 8 (no prefill/decode overlap: conservative);
- single request: TTFT = floor of the ISL-token prefill / f, TPOT = floor of a batch-1 step / f.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from flashport.bench.cost import cost_per_million, load_prices
from flashport.bench.devices import DEVICES, PROJECTED, datasheet_ceilings, device_key
from flashport.bench.roofline import SeqWork, decode_ops, ops_table, step_floor, step_ops
from flashport.config import ModelConfig

GPUS = 8
METHOD = [
    "Measured: one GPU, the model's first N layers (stated), dummy weights in the checkpoint formats, "
    "lengths as stated (OSL shortened: throughput over the shortened run).",
    "Fraction of floor f = roofline floor / measured time (floors on the H200 datasheet: 4.8 TB/s, 989 TFLOP/s "
    "bf16; the 'of floor' figures in the measured column use the ceilings measured on our H200: 4.2 TB/s, 740).",
    "Projected (never measured): the full model on 8 GPUs of each kind, tensor-parallel dense layers + "
    "expert-parallel experts (bytes and FLOPs / 8, two collectives per layer over the GPU link, 10 us each); "
    "time = that floor (without the collectives) on the device's datasheet figures / f, plus the collectives "
    "at link speed (f assumed to carry over).",
    "Throughput projection: waves of C requests, prefill of the C prompts then target-OSL decode steps at "
    "context ISL + OSL/2; output tok/s = C x OSL / wave, total = C x (ISL + OSL) / wave, per GPU = / 8.",
    "Cost per 1M tokens = price per GPU-hour x GPUs / (tokens per second x 3600) x 1e6.",
]

ANCHORS = {
    "c64": "SGLang 4xH200 (c64, 8K/1K): 2,758 total tok/s/GPU (3,098 FP8 repack), TTFT 859-897 ms, "
           "TPOT 38-41 ms; vLLM 0.26 on our H200 (20 layers): prefill 26.7K tok/s, decode ~140 tok/s; "
           "seed article 12,450 (8xH100) / 12,180 (8xMI300X), metric undefined",
    "c128": "seed article 8,920 (8xH100) / 9,140 (8xMI300X), metric undefined",
    "c1": "SGLang 8xH100: TTFT 200 ms, TPOT 3.2 ms (with MTP); vLLM 0.26 on our H200 (20 layers): TTFT 164 ms, "
          "TPOT 4.05 ms; seed article 45 / 48 ms",
    "memory": "vLLM 0.26 on our H200 (20 layers): weights 69.7 GiB, KV 49.9 GiB; seed article 72 / 168 GB",
    "cost": "seed article $0.85 (8xH100) / $0.52 (8xMI300X) per 1M tokens",
}


def _fmt(x, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, str):
        return x
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def _link(key: str) -> float:
    return DEVICES[key].link_gb_s


def _projected_s(f, frac: float) -> float:
    """The engine's part of a floor scaled by its measured fraction; the collectives at link speed."""
    return (f.floor_s - f.comm_s) / frac + f.comm_s


def project_workload(full: ModelConfig, w: dict, f_pre: float | None, f_dec: float | None, key: str) -> dict:
    """Projected figures of workload w (concurrency, isl, target_osl) on 8 x device `key`."""
    c, isl, osl = w["concurrency"], w["isl"], w.get("target_osl") or w["osl"]
    ds = datasheet_ceilings(key)
    kw = dict(num_gpus=GPUS, link_gb_s=_link(key))
    out: dict = {}
    if f_dec:
        step = _projected_s(step_floor(full, [SeqWork(1, isl + osl // 2)] * c, ds.tb_s, ds.bf16_tflops, **kw), f_dec)
        out["tpot_ms"] = step * 1e3
    if f_pre:
        pre = _projected_s(step_floor(full, [SeqWork(isl, isl)] * c, ds.tb_s, ds.bf16_tflops, **kw), f_pre)
        out["prefill_tok_s_per_gpu"] = c * isl / pre / GPUS
    if f_pre and f_dec:
        wave = pre + osl * step
        out["output_tok_s_per_gpu"] = c * osl / wave / GPUS
        out["total_tok_s_per_gpu"] = c * (isl + osl) / wave / GPUS
    return out


def project_latency(full: ModelConfig, isl: int, f_pre: float | None, f_dec: float | None, key: str) -> dict:
    ds = datasheet_ceilings(key)
    kw = dict(num_gpus=GPUS, link_gb_s=_link(key))
    out = {}
    if f_pre:
        out["ttft_ms"] = _projected_s(step_floor(full, [SeqWork(isl, isl)], ds.tb_s, ds.bf16_tflops, **kw), f_pre) * 1e3
    if f_dec:
        out["tpot_ms"] = _projected_s(step_floor(full, [SeqWork(1, isl)], ds.tb_s, ds.bf16_tflops, **kw), f_dec) * 1e3
    return out


def extrapolate_here(s: dict, w: dict) -> dict | None:
    """The measured run stretched to the target OSL on the same device and layers: the measured prefill
    time of the C prompts plus target OSL x the measured decode step (the wave model of the projections)."""
    c, isl, tgt = w.get("concurrency"), w.get("isl"), w.get("target_osl")
    dec = s.get("decode", {})
    if not (c and isl and tgt and dec.get("step_ms_median")):
        return None
    if w.get("shared_prefix"):
        rate = (s.get("prefix_prefill") or {}).get("prompt_tok_s")
    else:
        rate = s.get("prefill", {}).get("prompt_tok_s")
    if not rate:
        return None
    wave = c * isl / rate + tgt * dec["step_ms_median"] / 1e3
    return {"output_tok_s": c * tgt / wave, "total_tok_s": c * (isl + tgt) / wave, "wave_s": wave}


def model_weight_bytes(cfg: ModelConfig) -> float:
    """All weights in the native formats (every expert), embedding included."""
    ops = step_ops(cfg, [SeqWork(10**6, 10**6)])
    return sum(o.weight_bytes for o in ops if o.name != "embed") + 2 * cfg.vocab_size * cfg.hidden_size


def build_report(res: dict, prices: dict[str, float | None]) -> dict:
    meta = res.get("meta", {})
    full = ModelConfig.from_hf(meta["model_config"]) if "model_config" in meta else ModelConfig()
    n_layers = meta.get("num_layers", full.num_hidden_layers)
    dev = meta.get("device", "unknown")
    here_key = device_key(dev)
    here_price = prices.get(here_key) if here_key else None
    measured_col = f"measured here ({dev}, 1 device, {n_layers} of {full.num_hidden_layers} layers)"
    cols = [measured_col] + [f"{k} x{GPUS} (projected)" for k in PROJECTED] + ["published anchors"]
    rows: list[dict] = []

    def row(name: str, measured, projected: dict[str, object] | None = None, anchor: str = "", digits: int = 1):
        cells = {measured_col: measured}
        for k in PROJECTED:
            cells[f"{k} x{GPUS} (projected)"] = (projected or {}).get(k)
        cells["published anchors"] = anchor
        rows.append({"metric": name, "cells": cells, "digits": digits})

    for s in res.get("throughput", []):
        w = s.get("workload", {})
        c, isl, osl = w.get("concurrency", s["concurrency"]), w.get("isl"), w.get("osl")
        tgt = w.get("target_osl") or osl
        tag = f"c{c} ISL {isl} OSL {tgt}" + (" (shared prefix)" if w.get("shared_prefix") else "")
        f_dec = s.get("decode", {}).get("frac_of_datasheet_floor")
        # a shared-prefix workload prefilled one long prompt: its fraction stands for the prefill
        f_pre = (s.get("prefix_prefill") or {}).get("frac_of_datasheet_floor") if w.get("shared_prefix") else \
            s.get("prefill", {}).get("frac_of_datasheet_floor")
        proj = {k: project_workload(full, {**w, "concurrency": c}, f_pre, f_dec, k) for k in PROJECTED} \
            if isl else {}
        anchor = ANCHORS["c64"] if (c == 64 and isl == 8192) else ANCHORS["c128"] if (c == 128 and isl == 32768) else ""
        short = f" [measured: OSL {osl}" + (f", {s['num_requests']} requests" if s['num_requests'] != c else "") + "]"
        row(f"{tag}: output tok/s per GPU{short}", s["output_tok_s_per_gpu"],
            {k: v.get("output_tok_s_per_gpu") for k, v in proj.items()}, anchor, 0)
        row(f"{tag}: total tok/s per GPU{short}", s["total_tok_s_per_gpu"],
            {k: v.get("total_tok_s_per_gpu") for k, v in proj.items()}, "", 0)
        pre = s.get("prefill", {})
        row(f"{tag}: prefill prompt tok/s per GPU", pre.get("prompt_tok_s") if not w.get("shared_prefix")
            else (s.get("prefix_prefill") or {}).get("prompt_tok_s"),
            {k: v.get("prefill_tok_s_per_gpu") for k, v in proj.items()}, "", 0)
        dec = s.get("decode", {})
        row(f"{tag}: TPOT = decode step at batch {dec.get('batch', c)}, ms", dec.get("step_ms_median"),
            {k: v.get("tpot_ms") for k, v in proj.items()}, "", 1)
        pre_frac = (s.get("prefix_prefill") or {}).get("frac_of_floor") if w.get("shared_prefix") else \
            pre.get("frac_of_floor")
        row(f"{tag}: fraction of floor, prefill / decode step", f"{_pct(pre_frac)} / {_pct(dec.get('frac_of_floor'))}",
            None, "", 1)
        ext = extrapolate_here(s, w)
        if ext:
            row(f"{tag}: output / total tok/s at OSL {tgt} from the measured prefill and decode step "
                f"({n_layers} layers, 1 device; not projected)",
                f"{_fmt(ext['output_tok_s'], 0)} / {_fmt(ext['total_tok_s'], 0)}", None, "", 0)
        lat = s.get("latency", {})
        if lat:
            row(f"{tag}: TTFT p50 / p99 ms (measured run)",
                f"{_fmt(lat['ttft_ms']['p50'], 0)} / {_fmt(lat['ttft_ms']['p99'], 0)}", None, "", 0)
        cost_proj_out = {k: cost_per_million(v.get("output_tok_s_per_gpu", 0) * GPUS, prices.get(k), GPUS)
                         for k, v in proj.items()}
        cost_proj_tot = {k: cost_per_million(v.get("total_tok_s_per_gpu", 0) * GPUS, prices.get(k), GPUS)
                         for k, v in proj.items()}
        row(f"{tag}: $ per 1M output tokens", cost_per_million(s["output_tok_s"], here_price, 1),
            cost_proj_out, ANCHORS["cost"] if (c == 64 and isl == 8192) else "", 3)
        row(f"{tag}: $ per 1M total tokens", cost_per_million(s["total_tok_s"], here_price, 1), cost_proj_tot, "", 3)

    lat = res.get("latency")
    if lat:
        isl = lat["isl"]
        proj = {k: project_latency(full, isl, lat.get("prefill_frac_of_datasheet_floor"),
                                   lat.get("decode_frac_of_datasheet_floor"), k) for k in PROJECTED}
        row(f"c1 ISL {isl}: TTFT ms (p50 of {lat['repeats']})", lat["ttft_ms"]["p50"],
            {k: v.get("ttft_ms") for k, v in proj.items()}, ANCHORS["c1"], 1)
        row(f"c1 ISL {isl}: TPOT ms (p50)", lat["tpot_ms"]["p50"], {k: v.get("tpot_ms") for k, v in proj.items()}, "", 2)
        row(f"c1 ISL {isl}: E2EL ms (p50, OSL {lat['osl']})", lat["e2el_ms"]["p50"], None, "", 0)
        row(f"c1 ISL {isl}: prefill / decode fraction of floor",
            f"{_pct(lat.get('prefill_frac_of_floor'))} / {_pct(lat.get('decode_frac_of_floor'))}", None, "", 1)

    mem = res.get("memory")
    if mem:
        wb = model_weight_bytes(full) / 2**30
        row("memory per GPU: weights GiB", mem["weights_gib"], {k: wb / GPUS for k in PROJECTED}, ANCHORS["memory"], 1)
        row("memory per GPU: state pools GiB" + (f" (entries in {mem['entry_dtype']})" if mem.get("entry_dtype") else ""),
            mem["pools_gib"], None, "", 1)
        if mem.get("decode_graphs_gib"):
            row("memory per GPU: decode graphs GiB", mem["decode_graphs_gib"], None, "", 2)
        row("memory per GPU: activation peak GiB (profiled / in the run)",
            f"{_fmt(mem['activation_profiled_gib'])} / {_fmt(mem.get('activation_peak_gib'))}", None, "", 1)
        row("memory per GPU: total reserved GiB (of the device's total)",
            f"{_fmt(mem.get('reserved_gib'))} of {_fmt(mem.get('device_total_gib'))}" if mem.get("reserved_gib")
            else None, None, "", 1)

    peer = res.get("peer")
    ratios = peer_ratios(res)
    for name, val in ratios.items():
        row(name, val, None, "transformers (bf16) on the same GPU", 2)
    for s in res.get("serve", []):
        tag = f"serve {s.get('label', '')}".strip()
        row(f"{tag}: output tok/s, goodput req/s", f"{_fmt(s['output_tok_s'], 0)}, {_fmt(s['goodput_req_s'], 2)}",
            None, "", 0)
        row(f"{tag}: TTFT p50/p99, TPOT p50/p99 ms",
            f"{_fmt(s['ttft_ms']['p50'], 0)}/{_fmt(s['ttft_ms']['p99'], 0)}, "
            f"{_fmt(s['tpot_ms']['p50'], 1)}/{_fmt(s['tpot_ms']['p99'], 1)}", None, "", 0)

    # the roofline of the main decode step, per op
    main = next((s for s in res.get("throughput", []) if s.get("decode")), None)
    roof = None
    if main:
        w = main.get("workload", {})
        sub = full.with_num_layers(min(n_layers, full.num_hidden_layers))
        ops = decode_ops(sub, main["decode"]["batch"], int(main["decode"]["context_median"]))
        roof = {"batch": main["decode"]["batch"], "context": main["decode"]["context_median"], "layers": n_layers,
                "ops": ops_table(ops), "measured_step_ms": main["decode"]["step_ms_median"],
                "floor_ms": main["decode"].get("floor_ms"), "workload": w}
    return {"meta": meta, "columns": ["metric"] + cols, "rows": rows, "method": METHOD, "prices": prices,
            "skipped": res.get("skipped", []) + [f"(error) {e}" for e in res.get("errors", [])], "peer": peer,
            "roofline_decode": roof,
            "shortened": _shortened(res)}


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _shortened(res: dict) -> list[str]:
    out = []
    meta = res.get("meta", {})
    if meta.get("num_layers") and meta.get("full_layers") and meta["num_layers"] < meta["full_layers"]:
        out.append(f"layers: {meta['num_layers']} of {meta['full_layers']} (single GPU, dummy weights)")
    for s in res.get("throughput", []):
        w = s.get("workload", {})
        if w and w.get("osl") != w.get("target_osl"):
            out.append(f"c{w['concurrency']} ISL {w['isl']}: OSL {w['osl']} measured (target {w.get('target_osl')})")
        if w.get("shared_prefix"):
            out.append(f"c{w['concurrency']} ISL {w['isl']}: prompts share their first {w['shared_prefix']} tokens "
                       "(computed once, then reused): the decode runs at full context but reads the same "
                       "compressed blocks for every sequence (their L2 reuse can flatter it)")
        if s.get("truncated"):
            out.append(f"c{w.get('concurrency')} ISL {w.get('isl')}: stopped by the time budget after "
                       f"{s['duration_s']:.0f} s ({s['output_tokens']} output tokens)")
    return out


def peer_ratios(res: dict) -> dict[str, float | None]:
    """Ours / peer speed ratios (>1: we are faster), per layer (times scaled to our layer count)."""
    peer = res.get("peer") or {}
    meta = res.get("meta", {})
    if "num_layers" not in peer or "num_layers" not in meta:
        return {}
    scale = meta["num_layers"] / peer["num_layers"]
    out: dict[str, float | None] = {}
    lat = res.get("latency")
    single = peer.get("single")
    tag = f"(peer {peer['num_layers']} layers scaled x{scale:.2f})"
    if lat and single and lat.get("isl") == peer.get("isl"):
        out[f"speed vs transformers: c1 ISL {lat['isl']} TTFT {tag}"] = single["ttft_ms"] * scale / lat["ttft_ms"]["p50"]
        out[f"speed vs transformers: c1 ISL {lat['isl']} TPOT {tag}"] = single["tpot_ms"] * scale / lat["tpot_ms"]["p50"]
    b = peer.get("batch_run")
    if b:
        cands = [s for s in res.get("throughput", []) if s.get("concurrency") == peer["batch"] and s.get("decode")]
        same = [s for s in cands if s.get("workload", {}).get("isl") == peer["batch_isl"]]
        s = (same or cands or [None])[0]
        if s:
            note = "" if same else f" (ours at ISL {s['workload']['isl']}, peer at {peer['batch_isl']})"
            out[f"speed vs transformers: decode step at batch {peer['batch']} {tag}{note}"] = \
                b["step_ms"] * scale / s["decode"]["step_ms_median"]
            if same and s.get("prefill"):
                out[f"speed vs transformers: prefill tok/s at batch {peer['batch']} ISL {peer['batch_isl']} {tag}"] = \
                    s["prefill"]["prompt_tok_s"] / (b["prompt_tok_s"] / scale)
    return out


def render_markdown(rep: dict) -> str:
    meta = rep["meta"]
    lines = [f"# flashport benchmark report ({meta.get('date', '')})", ""]
    lines.append(f"- device: {meta.get('device', '?')}; torch {meta.get('torch', '?')}, triton {meta.get('triton', '?')}")
    lines.append(f"- model: {meta.get('model', '?')}, {meta.get('num_layers', '?')} of {meta.get('full_layers', '?')} "
                 f"layers; weights: {meta.get('weights', '?')}")
    if meta.get("command"):
        lines.append(f"- command: `{meta['command']}`")
    if meta.get("total_s") is not None:
        lines.append(f"- run time: {meta['total_s']:.0f} s (engine start-up {meta.get('startup_s', 0):.0f} s)")
    for s in rep["shortened"]:
        lines.append(f"- shortened: {s}")
    for s in rep["skipped"]:
        lines.append(f"- skipped: {s}")
    lines += ["", "| " + " | ".join(rep["columns"]) + " |", "|" + "---|" * len(rep["columns"])]
    for r in rep["rows"]:
        cells = [r["metric"]] + [_fmt(r["cells"].get(c), r["digits"]) if not isinstance(r["cells"].get(c), str)
                                 else r["cells"][c] for c in rep["columns"][1:]]
        lines.append("| " + " | ".join(c if c != "" else " " for c in cells) + " |")
    lines += ["", "## Method", ""] + [f"- {m}" for m in rep["method"]]
    lines += ["", "Prices ($/GPU-hour): " + ", ".join(f"{k} {_fmt(v, 2)}" for k, v in rep["prices"].items())]
    roof = rep.get("roofline_decode")
    if roof:
        lines += ["", f"## Roofline of the decode step (batch {roof['batch']}, context {roof['context']:.0f}, "
                      f"{roof['layers']} layers, native weights)", "",
                  "| op | layers | weights GB | state/act GB | GFLOP |", "|---|---|---|---|---|"]
        for o in roof["ops"]:
            lines.append(f"| {o['op']} | {o['layers']} | {o['weight_gb']:.3f} | {o['other_gb']:.3f} | {o['gflop']:.1f} |")
        lines.append(f"\nMeasured step {roof['measured_step_ms']:.1f} ms against a floor of "
                     f"{_fmt(roof.get('floor_ms'), 2)} ms (ceilings measured on the H200).")
    if rep.get("peer"):
        lines += ["", "## Peer (transformers)", "", "```", json.dumps(rep["peer"], indent=1, default=str), "```"]
    return "\n".join(lines) + "\n"


def plot(res: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    tp = res.get("throughput", [])
    serve = res.get("serve", [])
    if tp or serve:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [s["concurrency"] for s in tp]
        ax.plot(xs, [s["output_tok_s"] for s in tp], "o-", label="offline output tok/s")
        ax.plot(xs, [s["total_tok_s"] for s in tp], "s-", label="offline total tok/s")
        sv = [s for s in serve if s.get("concurrency")]
        if sv:
            ax.plot([s["concurrency"] for s in sv], [s["output_tok_s"] for s in sv], "^-", label="serve output tok/s")
        ax.set_xlabel("concurrency")
        ax.set_ylabel("tokens / s (1 GPU, measured)")
        ax.set_xscale("log", base=2)
        ax.set_title("Throughput against concurrency")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "throughput.png", dpi=100)
        plt.close(fig)
        files.append("throughput.png")
    lat_sets = []
    if res.get("latency"):
        lat_sets.append((f"c1 ISL {res['latency']['isl']}", res["latency"]))
    for s in serve:
        lat_sets.append((f"serve {s.get('label', '')}", s))
    if lat_sets:
        fig, axes = plt.subplots(1, len(lat_sets), figsize=(5 * len(lat_sets), 4), squeeze=False)
        for ax, (name, d) in zip(axes[0], lat_sets):
            metrics = [m for m in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms") if d.get(m, {}).get("n")]
            for j, q in enumerate(("p50", "p90", "p99")):
                ax.bar([i + 0.25 * j for i in range(len(metrics))], [d[m][q] for m in metrics], 0.25, label=q)
            ax.set_xticks([i + 0.25 for i in range(len(metrics))], [m[:-3].upper() for m in metrics])
            ax.set_yscale("log")
            ax.set_ylabel("ms")
            ax.set_title(f"Latency percentiles, {name}")
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "latency.png", dpi=100)
        plt.close(fig)
        files.append("latency.png")
    pts = [(st["floor_ms"], st["ms"], s["label"]) for s in tp for st in s.get("step_log", []) if st.get("floor_ms")]
    if pts:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label in sorted({p[2] for p in pts}):
            sel = [p for p in pts if p[2] == label]
            ax.scatter([p[0] for p in sel], [p[1] for p in sel], s=8, label=label)
        x0, x1 = min(p[0] for p in pts) / 2, max(p[0] for p in pts) * 2
        y0, y1 = min(min(p[1] for p in pts), x0) / 2, max(p[1] for p in pts) * 2
        for frac, style in ((1.0, "k-"), (0.1, "k--"), (0.01, "k:")):
            ax.plot([x0, x1], [x0 / frac, x1 / frac], style, lw=0.8, label=f"{frac:.0%} of floor")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_xlabel("roofline floor of the step, ms")
        ax.set_ylabel("measured step, ms")
        ax.set_title("Engine steps against their floor")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "steps.png", dpi=100)
        plt.close(fig)
        files.append("steps.png")
    return files


def write_report(res: dict, out: str | Path, prices: str | Path | None = None) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rep = build_report(res, load_prices(prices))
    try:
        rep["plots"] = plot(res, out)
    except ImportError as e:  # the tables do not need it; `flashport bench report` redraws them anywhere
        rep["plots"] = []
        rep["skipped"] = rep["skipped"] + [f"plots: {e} (pip install matplotlib, then `flashport bench report`)"]
    (out / "report.json").write_text(json.dumps(rep, indent=1, default=str))
    md = render_markdown(rep)
    (out / "report.md").write_text(md)
    print(render_compact(rep), flush=True)
    print(f"wrote {out / 'report.md'}, report.json" + "".join(f", {p}" for p in rep["plots"]), flush=True)
    return rep


def render_compact(rep: dict) -> str:
    """The table without the anchors column, short headers: for a terminal or a log."""
    cols = rep["columns"][1:-1]
    heads = ["measured"] + [c.split(" (")[0] for c in cols[1:]]
    lines = [f"{'metric':<84} " + " ".join(f"{h:>12}" for h in heads)]
    for r in rep["rows"]:
        vals = []
        for c in cols:
            v = r["cells"].get(c)
            vals.append(v if isinstance(v, str) else _fmt(v, r["digits"]))
        name = r["metric"] if len(r["metric"]) <= 84 else r["metric"][:81] + "..."
        lines.append(f"{name:<84} " + " ".join(f"{v:>12}" for v in vals))
    lines += [f"shortened: {x}" for x in rep["shortened"]] + [f"skipped: {x}" for x in rep["skipped"]]
    return "\n".join(lines)


def load_results(paths: list[str | Path]) -> dict:
    """Merge stored results: suite results.json files, and throughput / latency / serve JSON files."""
    from flashport.errors import FlashportError

    res: dict = {"meta": {}, "throughput": [], "serve": [], "skipped": []}
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.glob("*.json"))
        elif p.is_file():
            files.append(p)
        else:
            raise FlashportError(f"results {p}: no such file or directory")
    for f in files:
        if f.name in ("report.json",):
            continue
        try:
            d = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise FlashportError(f"results {f}: not valid JSON ({e})") from None
        kind = d.get("kind", "suite") if isinstance(d, dict) else None
        if kind == "suite":
            for k, v in d.items():
                if k in ("throughput", "serve", "skipped"):
                    res[k] += v
                elif k == "meta":
                    res["meta"].update(v)
                else:
                    res[k] = v
        elif kind == "throughput":
            res["throughput"].append(d["result"])
            res["meta"] = {**d.get("meta", {}), **res["meta"]}
            if "memory" in d and "memory" not in res:
                res["memory"] = d["memory"]
        elif kind == "latency":
            res["latency"] = d["result"]
            res["meta"] = {**d.get("meta", {}), **res["meta"]}
        elif kind == "serve":
            res["serve"].append(d["result"])
            res["meta"] = {**d.get("meta", {}), **res["meta"]}
    if not (res["throughput"] or res["serve"] or res.get("latency")):
        raise FlashportError(f"results {', '.join(map(str, paths))}: no benchmark results found")
    return res
