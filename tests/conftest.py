"""Give JAX 8 emulated CPU devices before any backend initialises; fixtures several test files
share."""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The CLI processes tests start share one compilation cache for the session (set before xdist's
# workers start, so they inherit it): the smoke configs compile the same programs again and
# again. Tests of the cache, and runs that must compile from scratch, set their own directory.
if "INFRA_COMPILE_CACHE" not in os.environ:
    os.environ["INFRA_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="infra-test-compile-cache-")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# The tests' own processes (xdist's workers) compile through the same cache, with the CLI's
# settings (infra/compile_cache.py): many tests build the same small models on the same meshes,
# and in-process programs equal to a CLI run's are loaded instead of compiled again.
from infra import compile_cache  # noqa: E402

compile_cache.enable()

import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


# How xdist spreads the tests (pyproject.toml: --dist loadfile --no-loadscope-reorder): each
# test file runs whole on one worker, so its module fixtures (trained runs, imported models,
# servers) are built once, not once on each worker; and the files start in this order, the
# slowest first (their summed test time in CI), then the others as collected, so that no long
# file starts last while the other worker has nothing left to do. Only an order: a file
# missing here, or in the wrong place, costs time, never a test.
SLOWEST_FIRST = [
    "test_serve_engine.py", "test_pipeline.py", "test_nothing_lost.py", "test_reliability.py", "test_bucket.py",
    "test_moe.py", "test_parallelism.py", "test_gguf.py", "test_multihost.py", "test_vision.py",
    "test_quantization.py", "test_sft_cli.py", "test_serve_adapters.py", "test_rl.py",
    "test_interop_cli.py", "test_bench.py", "test_transformer.py", "test_sft.py", "test_cli.py",
    "test_forecast.py", "test_interop.py", "test_goodput.py", "test_dlrm.py",
    "test_plot_generate.py", "test_notebook.py", "test_bad_input.py", "test_hostile_server.py",
    "test_hostile_tools.py", "test_hostile_import.py", "test_model_memory.py",
    "test_serve_logprobs.py", "test_sharding.py", "test_serve_http.py", "test_tokenizer.py",
]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


@pytest.fixture
def mount(tmp_path):
    """`mount(name, options)`: a tmpfs at tmp_path/name (skips where mounting is not permitted)."""
    mounted = []

    def make(name: str, options: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        try:
            ok = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                                capture_output=True, timeout=30).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
        if not ok:
            pytest.skip("mounting a tmpfs is not permitted here")
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        subprocess.run(["umount", str(path)], capture_output=True)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny untied Llama with biases and a 300-token BPE tokenizer, saved by transformers."""
    from tests import hf_models

    root = tmp_path_factory.mktemp("hfcli")
    tok = root / "tok"
    tok.mkdir()
    hf_models.train_tokenizer(tok)
    return hf_models.save(hf_models.build("llama_untied"), root / "llama", tok)
