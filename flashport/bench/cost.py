"""Cost per 1M tokens from a price table the user can override.

    cost per 1M tokens = (price per GPU-hour x GPUs) / (tokens per second x 3600) x 10^6

for output tokens and for total (input + output) tokens. Default prices are the typical 2026
$/GPU-hour of shared/perf/anchors.md (`devices.DEVICES`); `--prices FILE` takes a JSON object
{"H200": 3.2, "B200": 5.5, ...} (keys as in the report's columns; null = no price).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from flashport.bench.devices import DEVICES
from flashport.errors import FlashportError


def cost_per_million(tok_s: float, price_per_hour: float | None, num_gpus: int) -> float | None:
    """$ per 1M tokens at `tok_s` tokens/s over all `num_gpus` GPUs; None without a price or tokens."""
    if price_per_hour is None or not tok_s or not math.isfinite(tok_s) or tok_s <= 0:
        return None
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be at least 1, got {num_gpus}")
    return price_per_hour * num_gpus / (tok_s * 3600) * 1e6


def default_prices() -> dict[str, float | None]:
    return {k: d.price_per_hour for k, d in DEVICES.items()}


def load_prices(path: str | Path | None) -> dict[str, float | None]:
    """The default table, updated from a JSON file {device: $/GPU-hour or null}."""
    prices = default_prices()
    if path is None:
        return prices
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError:
        raise FlashportError(f"--prices {p}: file not found") from None
    except json.JSONDecodeError as e:
        raise FlashportError(f"--prices {p}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise FlashportError(f"--prices {p}: expected a JSON object {{device: $/GPU-hour}}")
    for k, v in raw.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
            raise FlashportError(f"--prices {p}: price of {k!r} must be a non-negative number or null, got {v!r}")
        prices[str(k)] = None if v is None else float(v)
    return prices
