"""The CPU matmul peak's cache policy (best of several measurements, refreshed when stale or
exceeded), in process, with a fake measurement and the cache in a temporary directory."""

import json

import jax
import pytest

from infra import utilization as u

DAY = u.MAX_AGE_S


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("INFRA_CACHE_DIR", str(tmp_path))
    return tmp_path


class FakeMeasure:
    """Returns the given FLOP/s in turn and counts its calls."""

    def __init__(self, *values: float):
        self.values, self.calls = list(values), 0

    def __call__(self) -> float:
        self.calls += 1
        return self.values.pop(0)


def test_the_first_runs_each_measure_and_the_best_is_kept():
    values = [100e9, 140e9, 120e9, 130e9, 125e9][: u.MIN_SAMPLES]
    measure = FakeMeasure(*values)
    seen = [u.cpu_matmul_peak(measure, now=1000.0 + i) for i in range(u.MIN_SAMPLES)]
    assert measure.calls == u.MIN_SAMPLES
    assert seen == [max(values[: i + 1]) for i in range(u.MIN_SAMPLES)]
    # enough measurements: later runs read the cache and measure nothing
    assert u.cpu_matmul_peak(measure, now=2000.0) == max(values)
    assert measure.calls == u.MIN_SAMPLES


def test_a_busy_moment_never_lowers_the_cached_peak():
    u.remember_cpu_matmul_peak(150e9, now=0.0)
    assert u.remember_cpu_matmul_peak(52e9, now=10.0) == 150e9
    entry = json.loads(u.cache_path().read_text())
    assert entry["flops_per_sec"] == 150e9 and entry["measured_at"] == 0.0 and entry["samples"] == 2


def test_a_higher_measurement_replaces_the_cached_peak_and_its_time():
    u.remember_cpu_matmul_peak(110e9, now=0.0)
    assert u.remember_cpu_matmul_peak(127e9, now=50.0) == 127e9
    assert json.loads(u.cache_path().read_text())["measured_at"] == 50.0


def test_a_stale_cache_is_measured_afresh():
    for i in range(u.MIN_SAMPLES):
        u.remember_cpu_matmul_peak(200e9, now=float(i))
    measure = FakeMeasure(90e9)
    assert u.cpu_matmul_peak(measure, now=DAY + u.MIN_SAMPLES) == 90e9  # the old best is forgotten
    assert measure.calls == 1
    assert json.loads(u.cache_path().read_text())["samples"] == 1


def test_another_machine_or_jax_version_does_not_share_the_cache(monkeypatch):
    for i in range(u.MIN_SAMPLES):
        u.remember_cpu_matmul_peak(200e9, now=float(i))
    monkeypatch.setattr(jax, "__version__", "0.0.0-other")
    measure = FakeMeasure(80e9)
    assert u.cpu_matmul_peak(measure, now=10.0) == 80e9 and measure.calls == 1


@pytest.mark.parametrize("content", ["not json", "{}", '{"key": "x"}',
                                     '{"key": "K", "flops_per_sec": 140e9}'])
def test_an_unreadable_or_old_format_cache_is_not_trusted(content):
    u.cache_path().write_text(content.replace("K", u._machine_key()))  # the last: one old measurement
    measure = FakeMeasure(60e9)
    assert u.cpu_matmul_peak(measure, now=0.0) == 60e9 and measure.calls == 1


def test_an_unwritable_cache_still_gives_the_measurement(cache_dir, monkeypatch):
    (cache_dir / "file").write_text("")
    monkeypatch.setenv("INFRA_CACHE_DIR", str(cache_dir / "file"))  # a file, not a directory
    assert u.cpu_matmul_peak(FakeMeasure(70e9), now=0.0) == 70e9


def test_emulated_devices_share_the_cached_peak():
    for i in range(u.MIN_SAMPLES):
        u.remember_cpu_matmul_peak(160e9, now=u.time.time() - i)
    peak, source = u.peak_flops_per_device()
    assert peak == pytest.approx(160e9 / jax.local_device_count()) and "CPU matmul" in source


def test_matmul_probe_times_a_real_matmul():
    run, flops = u.matmul_probe(64)
    assert flops == 2 * 64**3 and run() > 0
