"""What the step compiled for the emulated CPU mesh measures: XLA's FLOPs and memory figures, and
the bytes its collectives move, read from the compiled HLO text (XLA reports no such figure)."""

from __future__ import annotations

import dataclasses
import math
import re
import time

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e5m2fnuz": 1,
    "f8e4m3fnuz": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}
_COLLECTIVE_RE = re.compile(
    r"=\s*(?P<type>\([^()]*\)|[^\s()]+)\s+"
    r"(?P<op>all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?P<start>-start)?\("
)


@dataclasses.dataclass
class Compiled:
    """Figures from the step compiled for the emulated CPU mesh."""

    seconds: float
    flops: float | None  # cost_analysis()["flops"]: per device (SPMD-partitioned program)
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    collective_bytes: float  # per device, from the compiled HLO
    collective_counts: dict[str, int]
    has_loops: bool

    @property
    def total_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


def compile_step(trainer, batch, devices: int) -> Compiled:
    """Compile `trainer`'s step ahead of time for its abstract state and `batch`, and measure it."""
    start = time.perf_counter()
    compiled = trainer.train_step.lower(trainer.state.abstract, batch).compile()
    seconds = time.perf_counter() - start
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = cost.get("flops") if cost else None
    mem = compiled.memory_analysis()
    hlo = compiled.as_text()
    coll, counts = hlo_collective_bytes(hlo, devices)
    return Compiled(
        seconds=seconds, flops=float(flops) if flops is not None else None,
        argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
        collective_bytes=coll, collective_counts=counts,
        has_loops=bool(re.search(r"\bwhile\(", hlo)),
    )


def hlo_collective_bytes(hlo: str, num_devices: int) -> tuple[float, dict[str, int]]:
    """Bytes each device sends in the collectives of a compiled (SPMD-partitioned) HLO module:
    all-gather S·(n-1)/n of its output S, reduce-scatter (n-1)·output, all-reduce 2·S·(n-1)/n,
    all-to-all S·(n-1)/n, collective-permute S. Ops inside loops count once."""
    total, counts = 0.0, {}
    for line in hlo.splitlines():
        m = _COLLECTIVE_RE.search(line)
        if not m or "-done(" in line:
            continue
        op = m.group("op")
        sizes = _type_bytes(m.group("type"))
        if m.group("start") and op in ("all-gather", "collective-permute") and len(sizes) > 1:
            sizes = sizes[len(sizes) // 2:]  # async start: (operands, outputs)
        size = float(sum(sizes))
        if op == "collective-permute":
            moved = size
        else:
            n = _group_size(line, num_devices)
            if n <= 1:
                continue
            moved = {"all-gather": size * (n - 1) / n, "reduce-scatter": size * (n - 1),
                     "all-reduce": 2 * size * (n - 1) / n, "all-to-all": size * (n - 1) / n}[op]
        total += moved
        counts[op] = counts.get(op, 0) + 1
    return total, counts


def _type_bytes(text: str) -> list[int]:
    """Bytes of each array in an HLO type, e.g. `(f32[], bf16[4,64]{1,0})` -> [4, 512]."""
    out = []
    for dtype, dims in re.findall(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]", text):
        if dtype in _DTYPE_BYTES:
            out.append(_DTYPE_BYTES[dtype] * math.prod(int(x) for x in dims.split(",") if x))
    return out


def _group_size(line: str, num_devices: int) -> int:
    """Devices per replica group of a collective, in any of the three HLO notations."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    if m:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
        names = re.findall(r"'([^']+)'", m.group(2))
        return math.prod(int(sizes[n]) for n in names if n in sizes)
    m = re.search(r"replica_groups=\[([\d,]+)\]<=", line)
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"replica_groups=\{\{([\d,\s]*)\}", line)
    if m:
        return len([x for x in m.group(1).split(",") if x.strip()])
    return num_devices  # `replica_groups={}`: all devices
