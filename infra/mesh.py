"""Devices -> `jax.sharding.Mesh`, CPU-device emulation and multi-process start-up.

Mesh axes are `data`, `stage`, `fsdp`, `sequence`, `expert`, `tensor` (innermost: the fastest
links; `stage`: pipeline stages, `infra/models/pipeline.py`). Each has an ICI size
(`mesh.<axis>`, within a slice or host) and a DCN size (`mesh.dcn_<axis>`, across slices); -1
fills the remaining devices.

Every mesh is made here: a run's own (`make_mesh(config.mesh)`), serving's (`serve_mesh`) and
the one `hf export` reads a checkpoint onto (`fsdp_mesh`).
"""

from __future__ import annotations

import logging
import math
import os

from infra.config.sections import DistributedConfig, MeshConfig
from infra.errors import ConfigError, UserError

AXES = ("data", "stage", "fsdp", "sequence", "expert", "tensor")
distributed_started = False  # whether `initialize_distributed` started jax.distributed here
CPU_DEVICES_ENV = "INFRA_CPU_DEVICES"
log = logging.getLogger(__name__)


def emulate_cpu_devices(n: int) -> None:
    """Run on `n` emulated CPU devices. Must be called before JAX touches a backend."""
    import jax

    os.environ["JAX_PLATFORMS"] = "cpu"
    jax.config.update("jax_platforms", "cpu")
    try:
        jax.config.update("jax_num_cpu_devices", int(n))
    except RuntimeError as e:  # backends already initialised
        raise ConfigError(f"cannot emulate {n} CPU devices: JAX is already initialised ({e})") from None


def emulate_from_env() -> None:
    """Honour `INFRA_CPU_DEVICES=N` (the env-var form of `--cpu_devices N`)."""
    n = os.environ.get(CPU_DEVICES_ENV)
    if n:
        if not n.isdigit() or int(n) < 1:
            raise ConfigError(f"{CPU_DEVICES_ENV} must be a positive integer, got '{n}'")
        emulate_cpu_devices(int(n))


def _is_multiprocess_env() -> bool:
    """True when the environment describes a run of several processes."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h]) > 1:
        return True
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_NUM_PROCESSES"):
        if int(os.environ.get(var, "1") or 1) > 1:
            return True
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    return _jax_detects_cluster()


def _jax_detects_cluster() -> bool:
    """Ask JAX's own cluster detection (Cloud TPU VMs via their metadata server, GKE, Slurm,
    Open MPI), which is what `jax.distributed.initialize()` itself uses."""
    try:
        from jax._src.clusters import ClusterEnv  # no public API exposes the detection
    except ImportError:
        return False
    return any(
        not env.opt_in_only_method and env.is_env_present() for env in ClusterEnv._cluster_types
    )


def initialize_distributed(cfg: DistributedConfig) -> bool:
    """Call `jax.distributed.initialize` when the run is multi-process. Returns whether it did.

    Explicit `distributed.coordinator_address` / `num_processes` / `process_id` win; otherwise
    JAX auto-detects TPU VMs, Slurm and Open MPI.
    """
    import jax

    cfg = DistributedConfig.from_config(cfg)
    mode = cfg.initialize
    explicit = bool(cfg.coordinator_address) or cfg.num_processes > 1
    if mode == "never" or (mode == "auto" and not explicit and not _is_multiprocess_env()):
        return False
    if jax.distributed.is_initialized():
        return True
    kwargs = {"heartbeat_timeout_seconds": int(cfg.heartbeat_timeout_s)}
    if cfg.coordinator_address:
        kwargs["coordinator_address"] = cfg.coordinator_address
    if cfg.num_processes > 0:
        kwargs["num_processes"] = cfg.num_processes
    if cfg.process_id >= 0:
        kwargs["process_id"] = cfg.process_id
    global distributed_started
    try:
        jax.distributed.initialize(**kwargs)
        distributed_started = True
    except (ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"cannot start the multi-process runtime (distributed.initialize={mode}): {first}; "
            f"set distributed.coordinator_address, num_processes and process_id, run where JAX "
            f"detects the cluster (TPU VM, Slurm, Open MPI), or set distributed.initialize=auto"
        ) from None
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True


def _fill(sizes: dict[str, int], total: int, what: str, unit: str) -> dict[str, int]:
    """Replace a single -1 by whatever makes the product equal `total`; check the product."""
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ConfigError(f"at most one {what} mesh axis may be -1, got {', '.join(free)}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    shown = " x ".join(f"{a}={s}" for a, s in sizes.items())
    if free:
        if total % fixed:
            raise ConfigError(
                f"{what} mesh {shown} cannot fill {total} {unit}: {fixed} does not divide {total}; "
                f"choose axis sizes whose product divides {total}"
            )
        sizes = {**sizes, free[0]: total // fixed}
    elif fixed != total:
        raise ConfigError(
            f"{what} mesh {shown} needs {fixed} {unit} but {total} are available; "
            f"make the sizes multiply to {total} or set one axis to -1"
        )
    return sizes


def mesh_shape(cfg: MeshConfig, num_devices: int,
               num_slices: int = 1) -> tuple[dict[str, int], dict[str, int]]:
    """Resolve (ICI sizes, DCN sizes) per axis from `config.mesh` for the given device count."""
    cfg = MeshConfig.from_config(cfg)
    dcn = _fill({a: cfg[f"dcn_{a}"] for a in AXES}, num_slices, "DCN", "slices")
    ici = _fill({a: cfg[a] for a in AXES}, num_devices // num_slices, "ICI", "devices")
    return ici, dcn


def make_mesh(cfg: MeshConfig, devices=None):
    """Build the mesh described by `config.mesh` over `devices` (default: all devices)."""
    import jax
    from jax.experimental import mesh_utils

    devices = list(devices if devices is not None else jax.devices())
    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    ici, dcn = mesh_shape(cfg, len(devices), num_slices)
    axis_types = (jax.sharding.AxisType.Auto,) * len(AXES)
    if num_slices > 1:
        grid = mesh_utils.create_hybrid_device_mesh(
            [ici[a] for a in AXES], [dcn[a] for a in AXES], devices=devices
        )
        return jax.sharding.Mesh(grid, AXES, axis_types=axis_types)
    shape = [ici[a] * dcn[a] for a in AXES]
    return jax.make_mesh(shape, AXES, axis_types=axis_types, devices=devices)


def _single_axis_sizes(**sizes: int) -> MeshConfig:
    """A mesh section: every ICI and DCN axis 1 but `sizes`."""
    return MeshConfig(**({a: 1 for a in AXES} | sizes))


def serve_mesh(config, devices=None, tensor: int | None = None):
    """The serving mesh, `data` x `tensor` over `devices`: kv heads over `tensor` (default: the
    largest divisor of the device count that divides the kv heads), slots over `data` (the
    rest)."""
    import jax

    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    kv = int(config.model.num_kv_heads)
    if tensor is None:
        tensor = max(t for t in range(1, n + 1) if n % t == 0 and kv % t == 0)
    elif tensor < 1 or n % tensor:
        raise UserError(f"--tensor {tensor} must divide the {n} devices")
    return make_mesh(_single_axis_sizes(data=n // tensor, tensor=tensor), devices=devices)


def fsdp_mesh(config):
    """Parameters sharded FSDP-style over every device (tensor-parallel as trained where the
    device count allows): what `hf export` reads a checkpoint onto."""
    import jax

    n = len(jax.devices())
    tensor = int(config.mesh.tensor)
    tensor = tensor if tensor > 0 and n % tensor == 0 else 1
    return make_mesh(_single_axis_sizes(fsdp=-1, tensor=tensor))


def describe(mesh) -> str:
    """`data=2 fsdp=2 tensor=2 (8 cpu devices, 1 process)`."""
    import jax

    axes = " ".join(f"{a}={s}" for a, s in mesh.shape.items())
    return f"{axes} ({mesh.size} {mesh.devices.flat[0].platform} devices, {jax.process_count()} process(es))"
