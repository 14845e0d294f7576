"""scripts/build_sample.py: the guard against a CUDA download, package names, and the
files compileall could not compile. No build here (it takes a minute; the sample fixture of
tests/conftest.py builds one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from scripts import build_sample


def item(name: str, version: str, url: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "version": version}, "download_info": {"url": url}}


def test_package_name_normalises_specs() -> None:
    assert build_sample.package_name("torch==2.13.0") == "torch"
    assert build_sample.package_name(" Typing-Extensions>=4") == "typing_extensions"
    assert build_sample.package_name("numpy[extra]; python_version>'3'") == "numpy"


def test_local_torch_and_small_remote_deps_pass() -> None:
    report = {
        "install": [
            item("torch", "2.13.0+cpu", "file:///opt/wheels/torch-2.13.0%2Bcpu-cp311.whl"),
            item("filelock", "4.3.1", "https://files.example/filelock.whl"),
            item("numpy", "2.4.6", "file:///opt/pypi/files/numpy.whl"),
        ]
    }
    assert build_sample.heavy_downloads(report) == []


def test_remote_torch_and_cuda_runtime_are_refused() -> None:
    report = {
        "install": [
            item("torch", "2.14.0", "https://files.example/torch-2.14.0.whl"),
            item("nvidia_cublas_cu12", "12.8", "https://files.example/cublas.whl"),
            item("triton", "3.5", "https://files.example/triton.whl"),
            item("sympy", "1.14", "https://files.example/sympy.whl"),
        ]
    }
    found = build_sample.heavy_downloads(report)
    assert [f.split()[0] for f in found] == ["torch", "nvidia-cublas-cu12", "triton"]


def test_compile_errors_names_the_files() -> None:
    out = "\n".join(
        [
            "*** Error compiling '/s/torch/testing/_internal/py312_intrinsics.py'...",
            '  File "/s/torch/testing/_internal/py312_intrinsics.py", line 11',
            "SyntaxError: expected '('",
        ]
    )
    assert build_sample.compile_errors(out) == ["/s/torch/testing/_internal/py312_intrinsics.py"]
    assert build_sample.compile_errors("") == []


def test_the_plan_is_checked_only_when_torch_is_asked_for(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    pip = ["sh", "-c", f"touch {marker}; exit 1", "pip"]
    build_sample.check_plan(pip, ["numpy", "sympy"])  # no dry run at all
    assert not marker.exists()
    with pytest.raises(SystemExit):  # torch: the dry run runs (and here fails)
        build_sample.check_plan(pip, ["numpy", "Torch==2.13.0"])
    assert marker.exists()
