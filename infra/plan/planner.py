"""`plan()`: build the real train step on the planned mesh from abstract shapes, take the exact
per-device bytes from its state's shardings, and join them with the analytic estimate
(`estimate.py`) and, when compiled, XLA's own figures (`hlo.py`) into one `Plan`."""

from __future__ import annotations

import dataclasses
import math
import re

from infra import mesh as mesh_lib
from infra.errors import ConfigError
from infra.hardware import Chip, get_chip
from infra.mesh import AXES
from infra.plan import estimate as estimate_lib
from infra.plan.estimate import Collective
from infra.plan.hlo import Compiled, compile_step

# Where each figure comes from (the report labels every row with one of these).
EXACT = "exact (abstract state)"
MEASURED = "measured (XLA)"
ESTIMATE = "estimate"
AUTO_COMPILE_MAX_PARAMS = 2e8  # compile the step automatically below this many parameters
DEFAULT_MFU = 0.5


@dataclasses.dataclass
class Plan:
    experiment: str
    devices: int
    mesh: dict[str, int]  # total size per axis (ICI x DCN)
    ici: dict[str, int]
    dcn: dict[str, int]
    chip: Chip | None
    price_per_chip_hour: float | None
    assumed_mfu: float
    unit: str  # what throughput counts ("tokens")
    param_count: int
    units_per_step: int
    param_dtype: str
    compute_dtype: str
    remat: str
    microbatches: int
    # per-device bytes
    params_bytes: int  # exact
    opt_bytes: int  # exact: optimizer state + step + rng
    grads_bytes: int  # exact shapes/shardings of the trained params, param dtype (x2 with accumulation)
    batch_bytes: int  # exact
    activation_bytes: float | None  # estimate
    gather_buffer_bytes: float | None  # estimate
    params_bytes_total: int
    opt_bytes_total: int
    # compute
    flops_per_device: float | None  # what step time uses: measured if compiled, else estimate
    flops_label: str
    analytic_flops_per_device: float | None
    model_flops_per_device: float | None  # without remat recompute (for MFU)
    collectives: list[Collective]
    compiled: Compiled | None
    notes: list[str]
    # step-time model (None without a chip)
    compute_s: float | None = None
    overlapped_comm_s: float | None = None
    exposed_comm_s: float | None = None
    step_s: float | None = None
    efficiency: float | None = None
    units_per_s: float | None = None
    mfu: float | None = None
    cost_per_1b: float | None = None
    # mixture of experts (None for dense models): parameters a token uses, expert weights
    active_param_count: int | None = None
    expert_bytes: int | None = None  # exact, per device
    expert_bytes_total: int | None = None
    # pipeline stages (None without): stages, microbatches, repeats, ticks, bubble, per device
    # weights_bytes (exact), activation_bytes in flight and point_to_point_bytes (estimates)
    pipeline: dict | None = None

    @property
    def state_bytes(self) -> int:
        return self.params_bytes + self.opt_bytes

    @property
    def total_bytes(self) -> float:
        """Per-device memory estimate: exact state, gradients and batch plus estimated rest."""
        return (self.params_bytes + self.opt_bytes + self.grads_bytes + self.batch_bytes
                + (self.activation_bytes or 0) + (self.gather_buffer_bytes or 0))

    @property
    def collective_ici_bytes(self) -> float:
        return sum(c.ici_bytes for c in self.collectives)

    @property
    def collective_dcn_bytes(self) -> float:
        return sum(c.dcn_bytes for c in self.collectives)

    def fits(self) -> bool | None:
        return None if self.chip is None else self.total_bytes <= self.chip.hbm_bytes

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["chip"] = self.chip.name if self.chip else None
        out["total_bytes"] = self.total_bytes
        out["fits"] = self.fits()
        if self.compiled:
            out["compiled"]["total_bytes"] = self.compiled.total_bytes
        return out


def plan(config, *, devices: int, mesh: dict[str, int] | str | None = None,
         chip: str | Chip | None = None, price_per_chip_hour: float | None = None,
         compile: bool | None = None, assumed_mfu: float = DEFAULT_MFU) -> Plan:
    """Plan `config` on `devices` chips with the given mesh sizes (axes not named are 1; None:
    the config's `mesh.*`). Needs `devices` JAX devices (emulated CPU devices are enough):
    shapes are abstract, nothing is allocated. `compile`: None = when the model has fewer than
    `AUTO_COMPILE_MAX_PARAMS` parameters."""
    from infra import train

    chip = chip if isinstance(chip, Chip) or chip is None else get_chip(chip)
    _check_inputs(price_per_chip_hour, assumed_mfu)
    cfg = _resolve_config(config, parse_mesh(mesh))
    jmesh, ici, dcn = _build_mesh(cfg, devices)
    notes: list[str] = []
    kernel = cfg.model.get("attention")
    if kernel in ("splash", "cudnn"):  # a TPU / GPU kernel: the emulated devices compile xla's
        cfg.model.attention = "xla"
        notes.append(f"compiled with model.attention=xla (the emulated devices cannot run "
                     f"{kernel}): XLA's FLOPs include the attention, as the run's MFU meter "
                     "adds the kernel's")
    trainer = train.build(cfg, mesh=jmesh)

    # ---- exact: the abstract state's leaves and their shardings
    exact = _exact(trainer, cfg)
    param_leaves, batch = exact.pop("param_leaves"), exact.pop("batch")

    # ---- estimate: the analytic model
    est = _estimate(trainer, jmesh, param_leaves, exact, ici=ici, dcn=dcn, chip=chip, notes=notes)

    # ---- measured: the compiled program
    compiled = _compiled(trainer, batch, devices, compile, exact["param_count"], notes)
    analytic = est.flops_per_device
    flops, label = analytic, ESTIMATE
    if compiled is not None and compiled.flops and not (compiled.has_loops and analytic):
        flops, label = compiled.flops, MEASURED

    # ---- step time and cost
    timing = None
    if chip is not None and flops:
        timing = estimate_lib.step_time(
            flops, est.model_flops_per_device, est.collectives, chip, assumed_mfu=assumed_mfu,
            units_per_step=exact["units_per_step"], devices=devices,
            price_per_chip_hour=price_per_chip_hour)
    elif chip is not None:
        notes.append("no FLOPs figure: step time not estimated (use --compile)")

    p = Plan(
        experiment=cfg.experiment, devices=devices, mesh=dict(jmesh.shape), ici=ici, dcn=dcn,
        chip=chip, price_per_chip_hour=price_per_chip_hour, assumed_mfu=assumed_mfu,
        unit=trainer.task.unit, **exact, activation_bytes=est.activation_bytes,
        gather_buffer_bytes=est.gather_buffer_bytes,
        flops_per_device=flops, flops_label=label, analytic_flops_per_device=analytic,
        model_flops_per_device=est.model_flops_per_device, collectives=est.collectives,
        compiled=compiled, notes=notes,
        pipeline=est.pipeline and {**est.pipeline, "weights_bytes": exact["params_bytes"]},
        **(dataclasses.asdict(timing) if timing else {}),
    )
    if chip is not None:
        notes += _advice(p, est, chip, devices, dcn)
    return p


def _check_inputs(price_per_chip_hour: float | None, assumed_mfu: float) -> None:
    if price_per_chip_hour is not None and not price_per_chip_hour > 0:
        raise ConfigError(f"--price must be > 0 (per chip-hour), got {price_per_chip_hour}")
    if not 0 < assumed_mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1], got {assumed_mfu}")


def _exact(trainer, cfg) -> dict:
    """The figures read off the abstract train state and its shardings (bytes per device)."""
    task, state = trainer.task, trainer.state.abstract
    params_total, params_local = _leaf_bytes(_leaves(state["params"]))
    opt_total, opt_local = _leaf_bytes(
        _leaves(state["opt_state"]) + _leaves(state["step"]) + _leaves(state["rng"]))
    param_leaves = _leaves(state["params"])
    microbatches = int(cfg.train.microbatches)
    # gradients exist for the trained params only (all of them, or LoRA's adapters)
    _, trained_local = _leaf_bytes(_leaves(trainer.state.model.split_trained(state["params"])[0]))
    batch = _abstract_batch(task, cfg, trainer.batch_shardings)
    _, batch_local = _leaf_bytes(batch.values())
    param_dtype = str(param_leaves[0].dtype) if param_leaves else "float32"
    moe = {}
    if cfg.model.get("num_experts"):
        import jax

        from infra.models import hyper_params

        experts = [x for path, x in jax.tree_util.tree_flatten_with_path(state["params"])[0]
                   if "moe" in map(str, (getattr(k, "key", k) for k in path))
                   and str(getattr(path[-1], "key", path[-1])) in ("gate", "up", "down")]
        total, local = _leaf_bytes(experts)
        moe = dict(active_param_count=hyper_params(cfg.model).active_params, expert_bytes=local,
                   expert_bytes_total=total)
    return dict(**moe,
        param_leaves=param_leaves, batch=batch, microbatches=microbatches,
        param_count=sum(math.prod(x.shape) for x in param_leaves),
        units_per_step=cfg.train.batch_size * task.units_per_example(), param_dtype=param_dtype,
        compute_dtype=str(cfg.model.get("dtype", param_dtype)),
        remat=str(cfg.model.get("remat", "none") or "none"),
        params_bytes=params_local, opt_bytes=opt_local,
        grads_bytes=trained_local * (2 if microbatches > 1 else 1), batch_bytes=batch_local,
        params_bytes_total=params_total, opt_bytes_total=opt_total)


def _estimate(trainer, jmesh, param_leaves, exact: dict, *, ici, dcn, chip, notes: list[str]):
    """The analytic model's figures (activations, FLOPs, collectives, the pipeline's), where it
    has one."""
    import jax.numpy as jnp

    from infra import sharding
    from infra.tasks import logical_rules

    cfg = trainer.config
    rules = sharding.normalize_rules(logical_rules(cfg), jmesh)
    est = estimate_lib.estimate(
        cfg, jmesh, rules, param_leaves, ici=ici, dcn=dcn, chip=chip, remat=exact["remat"],
        compute_bytes=jnp.dtype(exact["compute_dtype"]).itemsize,
        microbatches=exact["microbatches"], stages=trainer.schedule)
    if est.model is None:
        notes.append(f"no analytic model for model.name={cfg.model.get('name')!r}: activations, "
                     "analytic FLOPs and activation collectives are not estimated; use --compile")
    return est


def _compiled(trainer, batch, devices: int, compile: bool | None, param_count: int,
              notes: list[str]) -> Compiled | None:
    """The step compiled for the emulated devices (by default only for small models)."""
    if compile is None:
        compile = param_count < AUTO_COMPILE_MAX_PARAMS
        if not compile:
            notes.append(f"not compiled ({param_count / 1e9:.2f}B parameters >= "
                         f"{AUTO_COMPILE_MAX_PARAMS:.0e}; --compile forces it, slow on CPU)")
    if not compile:
        return None
    compiled = compile_step(trainer, batch, devices)
    if compiled.has_loops:
        notes.append("the compiled step has loops (scan over layers / microbatches): XLA "
                     "cost analysis and the HLO collective count may count a loop body once")
    return compiled


def _advice(p: Plan, est, chip: Chip, devices: int, dcn: dict[str, int]) -> list[str]:
    notes = []
    if not p.fits() and est.activation_bytes and est.activation_bytes > p.total_bytes / 2:
        notes.append("activations dominate the memory: try model.remat=full (or "
                     "save_dots), more train.microbatches, or more devices")
    slice_devices = devices // math.prod(dcn.values())
    if chip.name.startswith("tpu") and slice_devices > chip.ici_domain:
        notes.append(f"{slice_devices} chips per slice exceed the largest {chip.name} slice "
                     f"({chip.ici_domain}); collectives beyond it are counted as DCN — set "
                     "mesh.dcn_* sizes to plan a multi-slice run explicitly")
    return notes


# --------------------------------------------------------------------------- inputs


def parse_mesh(text: str | dict | None) -> dict[str, int] | None:
    """`"fsdp=256"` / `"data=2,fsdp=2,tensor=2,dcn_data=2"` -> {axis: size}; axes not named are 1."""
    if text is None or isinstance(text, dict):
        sizes = dict(text) if text else None
    else:
        sizes = {}
        for part in re.split(r"[,\s]+", text.strip()):
            if not part:
                continue
            key, eq, value = part.partition("=")
            if not eq:
                raise ConfigError(f"--mesh entry '{part}' must look like axis=size, e.g. fsdp=256")
            try:
                sizes[key.strip()] = int(value)
            except ValueError:
                raise ConfigError(f"--mesh {key}={value}: size must be an integer") from None
    if sizes is None:
        return None
    known = list(AXES) + [f"dcn_{a}" for a in AXES]
    for key, size in sizes.items():
        if key not in known:
            raise ConfigError(f"unknown mesh axis '{key}'; known axes: {', '.join(known)}")
        if not isinstance(size, int) or (size < 1 and size != -1):
            raise ConfigError(f"mesh {key}={size} must be a positive integer or -1 (fill)")
    return sizes


def _resolve_config(config, mesh: dict[str, int] | None):
    """A copy of `config` with the planned mesh sizes (unnamed axes = 1) and no distributed init."""
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
        if mesh is not None:
            for axis in AXES:
                cfg.mesh[axis] = mesh.get(axis, 1)
                cfg.mesh[f"dcn_{axis}"] = mesh.get(f"dcn_{axis}", 1)
        cfg.distributed.initialize = "never"
    return cfg


def _build_mesh(cfg, devices: int):
    """The planned mesh over the first `devices` JAX devices, and its ICI and DCN sizes."""
    import jax

    if not isinstance(devices, int) or devices < 1:
        raise ConfigError(f"--devices must be a positive integer, got {devices}")
    dcn_req = {a: cfg.mesh.get(f"dcn_{a}", 1) for a in mesh_lib.AXES}
    if any(s == -1 for s in dcn_req.values()):
        raise ConfigError("the planner needs explicit DCN sizes (mesh.dcn_<axis>), not -1")
    slices = math.prod(dcn_req.values())
    if devices % slices:
        raise ConfigError(f"{devices} devices cannot form {slices} slices (the product of the "
                          f"dcn_* sizes); choose dcn sizes whose product divides {devices}")
    ici, dcn = mesh_lib.mesh_shape(cfg.mesh, devices, slices)
    available = jax.devices()
    if len(available) < devices:
        raise ConfigError(
            f"planning for {devices} devices needs {devices} JAX devices but there are "
            f"{len(available)}; run `python -m infra plan` (it emulates --devices CPU devices) or "
            f"call infra.mesh.emulate_cpu_devices({devices}) before JAX starts"
        )
    shape = [ici[a] * dcn[a] for a in mesh_lib.AXES]
    mesh = jax.make_mesh(shape, mesh_lib.AXES, devices=available[:devices],
                         axis_types=(jax.sharding.AxisType.Auto,) * len(mesh_lib.AXES))
    return mesh, ici, dcn


def _abstract_batch(task, config, shardings: dict) -> dict:
    """The task's `abstract_batch` of one global batch, with the batch shardings."""
    import jax

    shapes = task.abstract_batch(config.train.batch_size)
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
            for k, v in shapes.items()}


def _leaf_bytes(leaves) -> tuple[int, int]:
    """(global bytes, bytes on one device) of ShapeDtypeStructs carrying NamedShardings."""
    total = local = 0
    for x in leaves:
        size = x.dtype.itemsize
        total += math.prod(x.shape) * size
        local += math.prod(x.sharding.shard_shape(x.shape)) * size
    return total, local


def _leaves(tree) -> list:
    import jax

    return jax.tree.leaves(tree)
