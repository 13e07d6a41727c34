"""`make install`'s choices of JAX (scripts/install.sh): what cannot work is refused in one clear
line, before the environment is touched. Run: pytest tests/test_install.py"""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_SETTINGS = ("JAX", "JAX_VERSION", "EXTRAS", "PYTHON", "VENV")


def install(tmp_path, env=None, **settings):
    """Run install.sh with `settings` (JAX=..., PYTHON=...) into a fresh VENV under tmp_path."""
    venv = tmp_path / "venv"
    # make passes its command-line variables down (CI's Python 3.12 leg sets JAX_VERSION)
    inherited = {k: v for k, v in os.environ.items() if k not in _SETTINGS}
    environ = {**inherited, **(env or {}), "VENV": str(venv), **settings}
    out = subprocess.run(
        ["bash", str(ROOT / "scripts/install.sh")],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return out, venv


def fake_nvidia_smi(tmp_path, driver: str) -> dict:
    """A PATH on which `nvidia-smi` reports one GPU with this driver version."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "nvidia-smi"
    tool.write_text(f"#!/bin/sh\necho {driver}\n")
    tool.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


@pytest.mark.parametrize(
    "mode, message",
    [
        ("cuda13", "JAX=cuda13 needs an NVIDIA GPU, and nvidia-smi finds none here"),
        ("cuda12", "JAX=cuda12 needs an NVIDIA GPU"),
        ("tpu", "JAX=tpu needs a TPU VM"),
        ("rocm", "JAX=rocm: choose auto, cpu, cuda12, cuda13, tpu or system"),
    ],
)
def test_an_accelerator_build_without_the_accelerator_is_refused(tmp_path, mode, message):
    if mode.startswith("cuda") and subprocess.run(["which", "nvidia-smi"]).returncode == 0:
        pytest.skip("this machine has nvidia-smi")
    out, venv = install(tmp_path, JAX=mode)
    assert out.returncode == 2
    assert out.stderr.startswith(f"make install: {message}")
    assert len(out.stderr.strip().splitlines()) == 1  # one line
    assert not venv.exists()  # nothing was created or broken


def test_cuda13_needs_a_recent_driver(tmp_path):
    out, venv = install(tmp_path, env=fake_nvidia_smi(tmp_path, "535.104.05"), JAX="cuda13")
    assert out.returncode == 2
    assert "JAX=cuda13 needs an NVIDIA driver >= 580; this one is 535" in out.stderr
    assert not venv.exists()


def test_system_needs_an_installed_jax(tmp_path):
    """JAX=system with an interpreter that has no JAX (the one running the tests has one: a
    fresh virtual environment has none)."""
    bare = tmp_path / "bare"
    subprocess.run(["python3", "-m", "venv", "--without-pip", str(bare)], check=True)
    out, venv = install(tmp_path, JAX="system", PYTHON=str(bare / "bin/python"))
    assert out.returncode == 2
    assert "JAX=system:" in out.stderr and "has no JAX installed" in out.stderr
    assert not venv.exists()
