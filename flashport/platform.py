"""What machine flashport runs on: backend, GPU architecture, FP8 flavour, memory, versions.

`detect_platform()` reads everything once and returns a frozen `Platform`; nothing is cached in
module globals. The small pure helpers (`fp8_dtype_for_arch`, `arch_for_capability`,
`triton_target_for`) hold the decisions and are unit-tested on any machine.
"""

from __future__ import annotations

import os
import platform as _stdlib_platform
from dataclasses import dataclass

import torch

from flashport.errors import FlashportError

__all__ = [
    "Platform",
    "detect_platform",
    "fp8_dtype_for_arch",
    "arch_for_capability",
    "triton_target_for",
]


@dataclass(frozen=True)
class Platform:
    backend: str  # "cpu" | "cuda" | "rocm"
    device_name: str  # e.g. "NVIDIA H200", "AMD Instinct MI300X", or the CPU model
    arch: str  # "sm_90", "sm_100", "gfx942", "gfx950", ... or "cpu"
    triton_target: str | None  # "cuda:90", "hip:gfx942", or None on CPU
    fp8_dtype: torch.dtype  # torch.float8_e4m3fn, or torch.float8_e4m3fnuz on gfx94x
    total_memory_bytes: int
    free_memory_bytes: int
    triton_version: str | None
    torch_version: str

    @property
    def fp8_flavour(self) -> str:
        """"e4m3fn" or "e4m3fnuz"."""
        return str(self.fp8_dtype).removeprefix("torch.float8_")


def _base_arch(arch: str) -> str:
    """"gfx942:sramecc+:xnack-" -> "gfx942"; other names unchanged (lower-cased)."""
    return arch.strip().split(":", 1)[0].lower()


def fp8_dtype_for_arch(arch: str) -> torch.dtype:
    """The FP8 E4M3 flavour the hardware computes in.

    MI300-series (gfx940/941/942) use the "fnuz" variant (no negative zero, bias 8); every other
    target, including gfx950 (MI350) and all NVIDIA GPUs and CPU, uses OCP e4m3fn.
    """
    if _base_arch(arch).startswith("gfx94"):
        return torch.float8_e4m3fnuz
    return torch.float8_e4m3fn


def arch_for_capability(major: int, minor: int) -> str:
    """CUDA compute capability -> "sm_XY", e.g. (9, 0) -> "sm_90", (10, 0) -> "sm_100"."""
    return f"sm_{major}{minor}"


def triton_target_for(backend: str, arch: str) -> str | None:
    """Triton's target string: "cuda:90" for sm_90, "hip:gfx942" for gfx942, None for CPU."""
    if backend == "cuda":
        if not arch.startswith("sm_"):
            raise ValueError(f"not a CUDA arch: {arch!r}")
        return f"cuda:{arch.removeprefix('sm_')}"
    if backend == "rocm":
        return f"hip:{_base_arch(arch)}"
    return None


def _triton_version() -> str | None:
    try:
        import triton
    except Exception:  # not installed, or a broken install: treat both as absent
        return None
    return getattr(triton, "__version__", None)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return _stdlib_platform.processor() or _stdlib_platform.machine() or "cpu"


def _meminfo_bytes(field: str) -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # values are in kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cpu_memory() -> tuple[int, int]:
    """(total, available) bytes of host memory."""
    total = _meminfo_bytes("MemTotal")
    free = _meminfo_bytes("MemAvailable")
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        if total is None:
            total = page * os.sysconf("SC_PHYS_PAGES")
        if free is None:
            free = page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    total = total or 0
    return total, free if free is not None else total


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise FlashportError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from exc
    if dev.type not in ("cpu", "cuda"):
        raise FlashportError(f"unsupported device {str(dev)!r} (use cpu, cuda or cuda:N)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FlashportError(
                f"device {str(dev)!r} requested but no CUDA/ROCm GPU is visible to torch "
                f"{torch.__version__} (use --device cpu)"
            )
        count = torch.cuda.device_count()
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if not 0 <= index < count:
            raise FlashportError(f"device {str(dev)!r} requested but only {count} GPU(s) are visible")
        dev = torch.device("cuda", index)
    return dev


def detect_platform(device: str | torch.device | None = None) -> Platform:
    """Describe `device` ("cpu", "cuda", "cuda:N"; default/"auto": a GPU if torch sees one)."""
    dev = _resolve_device(device)
    triton_version = _triton_version()
    torch_version = str(torch.__version__)

    if dev.type == "cpu":
        total, free = _cpu_memory()
        return Platform(
            backend="cpu",
            device_name=_cpu_name(),
            arch="cpu",
            triton_target=None,
            fp8_dtype=fp8_dtype_for_arch("cpu"),
            total_memory_bytes=total,
            free_memory_bytes=free,
            triton_version=triton_version,
            torch_version=torch_version,
        )

    props = torch.cuda.get_device_properties(dev.index)
    if torch.version.hip is not None:
        backend = "rocm"
        arch = _base_arch(getattr(props, "gcnArchName", "") or "gfx")
    else:
        backend = "cuda"
        arch = arch_for_capability(props.major, props.minor)
    try:
        free, total = torch.cuda.mem_get_info(dev)
    except RuntimeError:
        total = int(props.total_memory)
        free = total
    return Platform(
        backend=backend,
        device_name=torch.cuda.get_device_name(dev.index),
        arch=arch,
        triton_target=triton_target_for(backend, arch),
        fp8_dtype=fp8_dtype_for_arch(arch),
        total_memory_bytes=int(total),
        free_memory_bytes=int(free),
        triton_version=triton_version,
        torch_version=torch_version,
    )
