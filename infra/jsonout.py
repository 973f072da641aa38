"""JSON that every parser reads: non-finite numbers become `null`.

Python's `json.dumps` writes `NaN` and `Infinity` for non-finite floats, which is not JSON:
`jq`, JavaScript and most other readers reject the whole line. Every JSON the commands print or
write (eval, goodput, generate, metrics records) goes through `dumps` here.
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite(value: Any) -> Any:
    """`value` with every non-finite float (also inside lists, tuples and dicts) as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if hasattr(value, "dtype") and getattr(value, "shape", None) == ():  # numpy / jax scalars
        item = value.item()
        return finite(item) if isinstance(item, float) else item
    return value


def dumps(value: Any, **kwargs) -> str:
    """`json.dumps` of `finite(value)`; raises ValueError rather than write a bare NaN."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)
