"""Execute examples/quickstart.ipynb end to end in a fresh kernel of this interpreter."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402
from nbclient import NotebookClient  # noqa: E402

from tests.helpers import ROOT  # noqa: E402

NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"


def _kernel_manager(tmp_path: Path) -> KernelManager:
    """A `python3` kernel pinned to sys.executable, whatever kernelspecs the machine has installed."""
    spec_dir = tmp_path / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (test)",
        "language": "python",
    }))
    specs = KernelSpecManager(kernel_dirs=[str(spec_dir.parent)], ensure_native_kernel=False)
    return KernelManager(kernel_name="python3", kernel_spec_manager=specs)


def _texts(cell) -> str:
    out = []
    for o in cell.get("outputs", []):
        if o.get("output_type") == "stream":
            out.append(o.get("text", ""))
        elif "data" in o:
            out.append(o["data"].get("text/plain", ""))
    return "".join(out)


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # the committed notebook carries no outputs
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print('KERNEL_PYTHON=' + sys.executable)"))

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(
        QUICKSTART_STEPS="60",
        QUICKSTART_WORKDIR=str(tmp_path / "run"),
        INFRA_CPU_DEVICES="8",
        MPLBACKEND="module://matplotlib_inline.backend_inline",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
    )
    km = _kernel_manager(tmp_path)
    client = NotebookClient(
        nb,
        km=km,
        timeout=600,
        allow_errors=False,  # the first failing cell raises CellExecutionError with its traceback
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},  # cwd = examples/
    )
    try:
        client.execute(env=env)
    finally:  # a kernel manager we pass in is ours to stop: nbclient leaves its kernel running
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    assert not km.is_alive()

    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    text = "\n".join(_texts(c) for c in code)
    assert f"KERNEL_PYTHON={sys.executable}" in text
    assert "first eval loss: " in text and "last eval loss: " in text, text
    assert "resumed from step 60; first new step: 70" in text, text
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs), "no PNG plot output"
