"""The plan as a text table. Every row names where its figure comes from (exact, measured or
estimate), so a reader can tell what to trust before renting chips."""

from __future__ import annotations

from infra.hardware import known_chips
from infra.plan.planner import ESTIMATE, EXACT, MEASURED, Plan


def _bytes(x: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(x) >= scale:
            return f"{x / scale:,.2f} {unit}"
    return f"{x:,.0f} B"


def _count(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M")):
        if n >= scale:
            return f"{n / scale:,.3f}{suffix}"
    return f"{n:,}"


def _dur(s: float) -> str:
    if s >= 1:
        return f"{s:,.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:,.2f} ms"
    return f"{s * 1e6:,.2f} us"


def _si(x: float) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:,.2f} {prefix}"
    return f"{x:,.2f}"


def format_plan(p: Plan) -> str:
    """The plan as a text table; every figure says whether it is exact, measured or an estimate."""
    axes = " ".join(f"{a}={s}" for a, s in p.mesh.items())
    dcn = [f"dcn_{a}={s}" for a, s in p.dcn.items() if s > 1]
    lines = [
        f"plan: {p.experiment} on {p.devices} x {p.chip.name if p.chip else '(no --chip)'}, "
        f"mesh {axes}" + (f" ({', '.join(dcn)} across slices)" if dcn else ""),
        f"  {_count(p.param_count)} parameters ({p.param_dtype}), compute {p.compute_dtype}, "
        f"remat={p.remat}, microbatches={p.microbatches}; {p.units_per_step:,} {p.unit} per step",
    ]
    if p.active_param_count is not None:
        lines.append(f"  mixture of experts: {_count(p.active_param_count)} parameters active per "
                     f"token of {_count(p.param_count)}; expert weights {_bytes(p.expert_bytes_total)}"
                     f" in all, {_bytes(p.expert_bytes)} per device (exact); " + (
                         f"dispatch over expert={p.mesh['expert']}: in the collectives below"
                         if p.mesh.get("expert", 1) > 1 else
                         "no expert mesh axis: no dispatch communication"))
    if p.pipeline:
        pp = p.pipeline
        lines.append(
            f"  pipeline: {pp['stages']} stages x {pp['microbatches']} microbatches x "
            f"{pp['repeats']} repeat(s) = {pp['ticks']} ticks; bubble {pp['bubble']:.1%} of the "
            f"stage-ticks ((S-1)/(R*M+S-1), exact); per stage: weights "
            f"{_bytes(pp['weights_bytes'])} (exact), activations in flight "
            f"{_bytes(pp['activation_bytes'])}, sends {_bytes(pp['point_to_point_bytes'])} per "
            f"step (estimates)")
    lines += [
        "",
    ]
    lines += _memory(p) + [""] + _compute(p) + [""] + _collectives(p) + [""] + _step_time(p)
    lines += [f"note: {note}" for note in p.notes]
    lines.append("exact = from the abstract train state and its shardings; measured = from the "
                 "step compiled for emulated CPU devices; estimate = analytic model (formulas: "
                 "infra/plan/estimate.py docstring)")
    return "\n".join(lines)


def _row(name: str, value: str, label: str, width: int = 48) -> str:
    return f"  {name:<{width}} {value:>14}   {label}"


def _memory(p: Plan) -> list[str]:
    lines = ["per-device memory",
             _row(f"parameters ({p.param_dtype})", _bytes(p.params_bytes), EXACT),
             _row("optimizer state (+ step, rng)", _bytes(p.opt_bytes), EXACT),
             _row("gradients (param shardings and dtype)" + (" x2" if p.microbatches > 1 else ""),
                  _bytes(p.grads_bytes), EXACT),
             _row("batch", _bytes(p.batch_bytes), EXACT)]
    if p.activation_bytes is not None:
        lines.append(_row(f"activations saved for backward (remat={p.remat})",
                          _bytes(p.activation_bytes), ESTIMATE))
    if p.gather_buffer_bytes is not None:
        lines.append(_row("FSDP gathered-weight buffers (2 layers)", _bytes(p.gather_buffer_bytes),
                          ESTIMATE))
    lines.append(_row("total", _bytes(p.total_bytes), ESTIMATE if p.activation_bytes is not None
                      else "exact parts only: no activation estimate"))
    whole = p.params_bytes_total + p.opt_bytes_total
    lines.append(f"  (params + optimizer state: {_bytes(whole)} in all / {p.devices} devices = "
                 f"{_bytes(whole / p.devices)}; as sharded: {_bytes(p.state_bytes)} per device)")
    if p.chip is not None:
        hbm = p.chip.hbm_bytes
        verdict = ("fits" if p.fits() else
                   f"does NOT fit ({p.total_bytes / 2**30:,.1f} GiB > {hbm / 2**30:,.1f} GiB)")
        lines.append(_row(f"fits in {p.chip.name} HBM ({hbm / 2**30:,.1f} GiB)?", verdict,
                          ESTIMATE))
    if p.compiled is not None:
        cp = p.compiled
        lines += [_row("compiled: arguments (state + batch)", _bytes(cp.argument_bytes), MEASURED),
                  _row("compiled: temporaries", _bytes(cp.temp_bytes),
                       f"{MEASURED}, CPU buffer assignment"),
                  _row("compiled: total", _bytes(cp.total_bytes),
                       f"{MEASURED}, CPU buffer assignment")]
    return lines


def _compute(p: Plan) -> list[str]:
    lines = ["compute per step"]
    if p.flops_per_device is not None:
        lines += [_row("FLOPs per device", f"{p.flops_per_device:.3e}", p.flops_label),
                  _row("FLOPs, all devices", f"{p.flops_per_device * p.devices:.3e}",
                       p.flops_label)]
    cp = p.compiled
    if cp is not None and cp.flops and p.flops_label != MEASURED:
        lines.append(_row("FLOPs per device, XLA cost analysis", f"{cp.flops:.3e}",
                          f"{MEASURED}, loop bodies counted once: not used"))
    if p.analytic_flops_per_device is not None and p.flops_label == MEASURED:
        ratio = p.analytic_flops_per_device / p.flops_per_device
        lines.append(_row("FLOPs per device, analytic", f"{p.analytic_flops_per_device:.3e}",
                          f"{ESTIMATE} ({ratio:.0%} of measured)"))
    if p.flops_per_device is None:
        lines.append("  no FLOPs figure (no analytic model; use --compile)")
    return lines


def _collectives(p: Plan) -> list[str]:
    lines = [f"collectives per device per step {'ICI':>41} {'DCN':>12}"]
    for x in p.collectives:
        lines.append(f"  {x.what + ' over ' + ','.join(x.axes):<62} {_bytes(x.ici_bytes):>12} "
                     f"{_bytes(x.dcn_bytes):>12}   {ESTIMATE}")
    if not p.collectives:
        lines.append(f"  {'none (one device, or nothing sharded)':<62} {_bytes(0):>12} {_bytes(0):>12}")
    lines.append(f"  {'total':<62} {_bytes(p.collective_ici_bytes):>12} "
                 f"{_bytes(p.collective_dcn_bytes):>12}   {ESTIMATE}")
    cp = p.compiled
    if cp is not None:
        ops = ", ".join(f"{n} {op}" for op, n in sorted(cp.collective_counts.items()))
        lines.append(f"  {'compiled HLO: ' + (ops or 'none'):<62} {_bytes(cp.collective_bytes):>12} "
                     f"{'':>12}   {MEASURED}, CPU program (all-reduce where TPU/GPU reduce-scatter)")
    return lines


def _step_time(p: Plan) -> list[str]:
    if p.chip is None:
        return [f"step time and cost: give --chip ({', '.join(known_chips())})"]
    if p.step_s is None:
        return []
    ch = p.chip
    lines = [f"step time on {ch.name}: compute at {p.assumed_mfu:.0%} of "
             f"{ch.peak_flops / 1e12:,.0f} TFLOP/s; ICI {ch.ici_egress / 1e9:,.0f} GB/s, "
             f"DCN {ch.dcn_bw / 1e9:,.2f} GB/s per chip and direction",
             _row("compute", _dur(p.compute_s), ESTIMATE),
             _row("weight/gradient collectives (overlap compute)", _dur(p.overlapped_comm_s),
                  ESTIMATE),
             _row("activation collectives (critical path)", _dur(p.exposed_comm_s), ESTIMATE),
             _row("step time", _dur(p.step_s), ESTIMATE),
             _row("scaling efficiency (compute / step time)", f"{p.efficiency:.1%}", ESTIMATE),
             _row(f"{p.unit}/s, all chips", _si(p.units_per_s), ESTIMATE),
             _row(f"{p.unit}/s per chip", f"{p.units_per_s / p.devices:,.0f}", ESTIMATE),
             _row("MFU (model FLOPs / peak)", f"{p.mfu:.1%}", ESTIMATE)]
    if p.cost_per_1b is not None:
        lines.append(_row(f"cost per 1B {p.unit} at ${p.price_per_chip_hour:g}/chip-hour",
                          f"${p.cost_per_1b:,.2f}", ESTIMATE))
    else:
        lines.append(f"  (give --price <$ per chip-hour> for the cost per 1B {p.unit})")
    return lines
