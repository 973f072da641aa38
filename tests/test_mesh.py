"""Mesh construction from config sizes."""

import jax
import pytest
from ml_collections import ConfigDict

from infra import mesh
from infra.errors import ConfigError


def cfg(**sizes):
    base = dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1)
    return ConfigDict({**base, **sizes})


def test_fill_and_explicit_sizes():
    assert dict(mesh.make_mesh(cfg()).shape) == {"data": 8, "stage": 1, "fsdp": 1,
                                                 "sequence": 1, "expert": 1, "tensor": 1}
    assert dict(mesh.make_mesh(cfg(data=2, fsdp=-1, tensor=2)).shape) == {
        "data": 2, "stage": 1, "fsdp": 2, "sequence": 1, "expert": 1, "tensor": 2}
    assert dict(mesh.make_mesh(cfg(data=2, expert=4)).shape)["expert"] == 4
    assert dict(mesh.make_mesh(cfg(data=2, stage=4)).shape)["stage"] == 4
    m = mesh.make_mesh(cfg(data=1, fsdp=4, tensor=2))
    assert m.axis_types == (jax.sharding.AxisType.Auto,) * 6
    assert m.size == 8


@pytest.mark.parametrize(
    "sizes, message",
    [
        (dict(data=2, fsdp=2, tensor=4), "needs 16 devices but 8 are available"),
        (dict(data=2, fsdp=1, tensor=1), "needs 2 devices but 8 are available"),
        (dict(data=-1, fsdp=3), "3 does not divide 8"),
        (dict(data=-1, fsdp=-1), "at most one ICI mesh axis may be -1"),
        (dict(dcn_data=2), "DCN mesh"),
    ],
)
def test_mismatch_is_one_clear_error(sizes, message):
    with pytest.raises(ConfigError, match=message):
        mesh.make_mesh(cfg(**sizes))


def test_single_process_does_not_initialize_distributed():
    d = ConfigDict(dict(initialize="auto", coordinator_address="", num_processes=0, process_id=-1))
    assert mesh.initialize_distributed(d) is False
