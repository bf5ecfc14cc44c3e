"""Accelerators the report projects to: datasheet figures, and the ceilings measured on our H200.

Datasheet numbers (dense, no sparsity) and typical 2026 prices are from shared/perf/anchors.md.
`MEASURED` holds ceilings measured on the device a run used (copy bandwidth, GEMM rates); the
floor of a measured step is computed from those where known, since they are what a kernel can
reach. Projections use datasheet figures on both sides (see report.py), so the ratio between two
devices does not depend on how well one of them was measured.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    name: str
    hbm_gb: float
    tb_s: float  # HBM bandwidth, TB/s
    bf16_tflops: float
    fp8_tflops: float
    fp8_format: str
    price_per_hour: float | None  # $/GPU-hour, typical; None = no public price
    link_gb_s: float  # GPU-to-GPU bandwidth per direction, GB/s (NVLink / Infinity Fabric)

    def __post_init__(self) -> None:
        if self.tb_s <= 0 or self.bf16_tflops <= 0 or self.fp8_tflops <= 0 or self.link_gb_s <= 0:
            raise ValueError(f"device {self.name}: bandwidths and rates must be positive")


DEVICES: dict[str, Device] = {
    "H100": Device("H100 SXM", 80, 3.35, 989, 1979, "e4m3fn", 2.95, 450),
    "H200": Device("H200 SXM", 141, 4.8, 989, 1979, "e4m3fn", 4.0, 450),
    "MI300X": Device("MI300X", 192, 5.3, 1307, 2615, "e4m3fnuz", 3.5, 448),
    "MI355X": Device("MI355X", 288, 8.0, 2500, 5000, "e4m3fn", None, 538),
    "B200": Device("B200", 180, 8.0, 2250, 4500, "e4m3fn", 6.0, 900),
}
# The order of the report's projected columns.
PROJECTED = ("H100", "H200", "MI300X", "MI355X", "B200")


@dataclass(frozen=True)
class Ceilings:
    """What a kernel can reach on a device: used for the floor of a measured step."""

    tb_s: float
    bf16_tflops: float
    fp8_tflops: float
    source: str


# Measured on our H200 (2026-11-29, torch 2.11, triton 3.6; shared/perf/anchors.md).
MEASURED = {"H200": Ceilings(4.20, 740.0, 1300.0, "measured on our H200: copy 4.20 TB/s, bf16 GEMM 740, fp8 1300")}


def datasheet_ceilings(key: str) -> Ceilings:
    d = DEVICES[key]
    return Ceilings(d.tb_s, d.bf16_tflops, d.fp8_tflops, f"{d.name} datasheet")


def device_key(name: str) -> str | None:
    """'NVIDIA H200' -> 'H200', 'AMD Instinct MI300X' -> 'MI300X'; None when unknown (e.g. 'cpu')."""
    up = name.upper().replace(" ", "")
    for key in sorted(DEVICES, key=len, reverse=True):
        if key in up:
            return key
    return None


def ceilings_for(name: str) -> Ceilings | None:
    """The ceilings for a device name: measured ones where we have them, else the datasheet's."""
    key = device_key(name)
    if key is None:
        return None
    return MEASURED.get(key) or datasheet_ceilings(key)
