"""Accelerator kinds: peak compute, memory and interconnect figures per chip, for planning and MFU.

Every figure is per chip (a TPU chip, or one GPU), in SI units: FLOP/s, bytes, bytes/s. Each row
cites where its figures come from. Conventions:

* `peak_flops`: dense bf16 matmul peak (no 2:4 sparsity; NVIDIA datasheets quote the sparse figure
  with an asterisk, twice the dense one).
* `ici_bw`: the published *bidirectional* chip-to-chip bandwidth per chip (TPU ICI, all links
  together; GPU NVLink). What a chip can send in one direction is half of it.
* `dcn_bw`: network bandwidth per chip and direction between ICI domains (TPU data-center
  network across slices; GPU InfiniBand/Ethernet between nodes).
* `ici_domain`: how many chips one ICI/NVLink domain holds (the largest single TPU slice; the 8
  GPUs of an HGX/DGX node). Collectives over groups larger than this cross the DCN.
"""

from __future__ import annotations

import dataclasses

from infra.errors import ConfigError

GB = 1e9
GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bytes: float
    hbm_bw: float  # bytes/s
    ici_bw: float  # bidirectional chip-to-chip bytes/s per chip (ICI / NVLink)
    dcn_bw: float  # bytes/s per chip and direction across ICI domains (DCN / inter-node network)
    ici_domain: int  # chips per ICI domain (largest slice / NVLink node)
    device_kinds: tuple[str, ...]  # lower-case substrings of `jax.Device.device_kind`
    sources: tuple[str, ...]
    note: str = ""

    @property
    def ici_egress(self) -> float:
        """Bytes/s one chip can send over ICI in one direction (half the bidirectional figure)."""
        return self.ici_bw / 2


CHIPS: dict[str, Chip] = {
    c.name: c
    for c in (
        # 275 TFLOP/s bf16, 32 GiB HBM2 at 1200 GB/s: https://cloud.google.com/tpu/docs/v4
        # ICI 6 links x 4.5e10 B/s one way; DCN ~2.5e10 B/s per 4-chip host:
        # https://jax-ml.github.io/scaling-book/tpus/
        Chip(
            name="tpu-v4", peak_flops=275e12, hbm_bytes=32 * GiB, hbm_bw=1200 * GB,
            ici_bw=6 * 2 * 45 * GB, dcn_bw=25 * GB / 4, ici_domain=4096,
            device_kinds=("tpu v4",),
            sources=("https://cloud.google.com/tpu/docs/v4",
                     "https://jax-ml.github.io/scaling-book/tpus/"),
            note="ICI and DCN from the scaling book (per link / per host), not the v4 spec page",
        ),
        # 197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s, 400 GB/s bidirectional ICI, 2 x 100 Gbps NICs
        # per 8-chip host, 256-chip pods: https://cloud.google.com/tpu/docs/v5e
        Chip(
            name="tpu-v5e", peak_flops=197e12, hbm_bytes=16 * GB, hbm_bw=819 * GB,
            ici_bw=400 * GB, dcn_bw=2 * 100e9 / 8 / 8, ici_domain=256,
            device_kinds=("tpu v5 lite", "tpu v5e"),
            sources=("https://cloud.google.com/tpu/docs/v5e",),
        ),
        # 459 TFLOP/s bf16, 95 GiB HBM2e at 2765 GB/s, 1200 GB/s bidirectional ICI, 50 Gbps DCN
        # per chip; the largest single-slice job is 6144 chips:
        # https://docs.cloud.google.com/tpu/docs/v5p-training
        Chip(
            name="tpu-v5p", peak_flops=459e12, hbm_bytes=95 * GiB, hbm_bw=2765 * GB,
            ici_bw=1200 * GB, dcn_bw=50e9 / 8, ici_domain=6144,
            device_kinds=("tpu v5p", "tpu v5"),  # v5p reports "TPU v5"; v5e "TPU v5 lite"
            sources=("https://docs.cloud.google.com/tpu/docs/v5p-training",
                     "https://cloud.google.com/tpu/docs/v5p"),
        ),
        # 918 TFLOP/s bf16, 32 GB HBM at 1638 GB/s, 800 GB/s bidirectional ICI, 256-chip pods:
        # https://docs.cloud.google.com/tpu/docs/v6e ; DCN ~2.5e10 B/s per 8-chip host:
        # https://jax-ml.github.io/scaling-book/tpus/
        Chip(
            name="tpu-v6e", peak_flops=918e12, hbm_bytes=32 * GB, hbm_bw=1638 * GB,
            ici_bw=800 * GB, dcn_bw=25 * GB / 8, ici_domain=256,
            device_kinds=("tpu v6 lite", "tpu v6e", "tpu v6"),
            sources=("https://docs.cloud.google.com/tpu/docs/v6e",
                     "https://jax-ml.github.io/scaling-book/tpus/"),
            note="DCN per chip is the scaling book's per-host figure / 8 (approximate)",
        ),
        # A100 SXM4 80GB: 312 TFLOP/s bf16 dense (624 sparse), 80 GB HBM2e at 2039 GB/s,
        # NVLink 600 GB/s: https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
        # (summarised at https://glennklockwood.com/garden/processors/A100); inter-node: one
        # 200 Gb/s HDR InfiniBand NIC per GPU (DGX A100 layout).
        Chip(
            name="a100-80gb", peak_flops=312e12, hbm_bytes=80 * GB, hbm_bw=2039 * GB,
            ici_bw=600 * GB, dcn_bw=200e9 / 8, ici_domain=8,
            device_kinds=("a100",),
            sources=("https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf",
                     "https://glennklockwood.com/garden/processors/A100"),
            note="inter-node bandwidth assumes one 200 Gb/s NIC per GPU",
        ),
        # H100 SXM5: 989 TFLOP/s bf16 dense (1979 sparse), 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s:
        # https://glennklockwood.com/garden/processors/h100 ; inter-node: rail-optimised fabric, one
        # 400 Gb/s NIC per GPU: https://docs.nvidia.com/enterprise-reference-architectures/hgx-ai-factory-h100-h200-b200/latest/networking-physical-topologies.html
        Chip(
            name="h100-sxm", peak_flops=989e12, hbm_bytes=80 * GB, hbm_bw=3350 * GB,
            ici_bw=900 * GB, dcn_bw=400e9 / 8, ici_domain=8,
            device_kinds=("h100",),
            sources=("https://glennklockwood.com/garden/processors/h100",
                     "https://docs.nvidia.com/enterprise-reference-architectures/hgx-ai-factory-h100-h200-b200/latest/networking-physical-topologies.html"),
            note="inter-node bandwidth assumes one 400 Gb/s NIC per GPU",
        ),
        # H200 SXM: the H100 die (989 TFLOP/s bf16 dense) with 141 GB HBM3e at 4.8 TB/s, NVLink
        # 900 GB/s: https://glennklockwood.com/garden/processors/h100 (H200 section),
        # https://www.aiminingco.com/gpu/h200/specs ; MLPerf system description (141 GB, 18x NVLink
        # 900 GB/s): https://raw.githubusercontent.com/mlcommons/inference_results_v4.1/main/closed/NVIDIA/systems/H200-SXM-141GBx8_TRT_MaxQ.json
        Chip(
            name="h200", peak_flops=989e12, hbm_bytes=141 * GB, hbm_bw=4800 * GB,
            ici_bw=900 * GB, dcn_bw=400e9 / 8, ici_domain=8,
            device_kinds=("h200",),
            sources=("https://glennklockwood.com/garden/processors/h100",
                     "https://www.aiminingco.com/gpu/h200/specs",
                     "https://raw.githubusercontent.com/mlcommons/inference_results_v4.1/main/closed/NVIDIA/systems/H200-SXM-141GBx8_TRT_MaxQ.json"),
            note="inter-node bandwidth assumes one 400 Gb/s NIC per GPU",
        ),
    )
}

ALIASES = {
    "v4": "tpu-v4", "tpuv4": "tpu-v4",
    "v5e": "tpu-v5e", "tpuv5e": "tpu-v5e", "v5litepod": "tpu-v5e", "tpu-v5-lite": "tpu-v5e",
    "v5p": "tpu-v5p", "tpuv5p": "tpu-v5p",
    "v6e": "tpu-v6e", "tpuv6e": "tpu-v6e", "trillium": "tpu-v6e",
    "a100": "a100-80gb", "a100-80g": "a100-80gb", "a100-sxm": "a100-80gb",
    "h100": "h100-sxm", "h100-sxm5": "h100-sxm",
    "h200-sxm": "h200",
}


def known_chips() -> list[str]:
    return list(CHIPS)


def get_chip(name: str) -> Chip:
    """The table row for `name` (case-insensitive; `v5p`, `H100` and similar aliases work)."""
    key = str(name).strip().lower().replace("_", "-")
    key = ALIASES.get(key, key)
    if key not in CHIPS:
        raise ConfigError(f"unknown chip '{name}'; known chips: {', '.join(CHIPS)}")
    return CHIPS[key]


def chip_for_device_kind(kind: str) -> Chip | None:
    """Map a `jax.Device.device_kind` string ("TPU v5 lite", "NVIDIA H100 80GB HBM3") to a row."""
    kind = kind.lower()
    if "a100" in kind and "40gb" in kind:
        return None  # the 40 GB A100 is not in the table
    best = None
    for chip in CHIPS.values():
        for sub in chip.device_kinds:
            # The longest matching substring wins: "tpu v5 lite" over "tpu v5".
            if sub in kind and (best is None or len(sub) > best[0]):
                best = (len(sub), chip)
    return best[1] if best else None


def detect_chip() -> Chip | None:
    """The table row for this process's first JAX device, or None (CPU, unknown accelerators)."""
    import jax

    return chip_for_device_kind(jax.devices()[0].device_kind)
