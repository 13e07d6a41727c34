#!/usr/bin/env bash
# `make install`: a virtual environment with this package and the JAX this machine can use.
#
#   JAX=auto     (default) a compatible JAX already installed with a GPU/TPU plugin: system;
#                else CUDA when nvidia-smi finds an NVIDIA GPU (cuda13 with a driver >= 580,
#                cuda12 with >= 525), TPU on a TPU VM, CPU otherwise
#   JAX=cpu | cuda12 | cuda13 | tpu   that build of JAX from PyPI
#   JAX=system   the JAX already installed for $PYTHON (a vendor image, a cluster module): the
#                environment also sees $PYTHON's site-packages (a .pth file: that works when
#                $PYTHON is itself a virtual environment, as on many images, where
#                --system-site-packages would see the base interpreter's instead), and pip keeps
#                that JAX, its plugin and whatever else satisfies this package's ranges
#   JAX_VERSION=0.11.2   that exact version of JAX (not with system)
#   EXTRAS=dev,interop,eval   the optional dependencies (default: all three with the CPU build,
#                dev with an accelerator: `interop` pins the CPU build of torch, which `eval`'s
#                lm-eval needs; none: none)
# pip's own settings apply: PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR installs offline from wheels.
#
# Refuses, with one line and before touching the environment, what cannot work: CUDA without an
# NVIDIA GPU or with a driver too old for it, TPU off a TPU VM, system without a usable JAX.
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
JAX=${JAX:-auto}
JAX_VERSION=${JAX_VERSION:-}
# The range pyproject.toml allows, checked for a preinstalled JAX.
JAX_MIN=0.10.2
JAX_BELOW=0.13

die() {
  echo "make install: $*" >&2
  exit 2
}

driver_major() { # the NVIDIA driver's major version, empty when no GPU answers
  command -v nvidia-smi >/dev/null || return 0
  nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1 | cut -d. -f1
}

on_tpu_vm() { # Google's PCI vendor id on a device: a TPU
  grep -qs 0x1ae0 /sys/bus/pci/devices/*/vendor
}

system_jax() { # "VERSION PLUGIN" of the JAX $PYTHON has (PLUGIN: cuda12, cuda13, tpu or cpu)
  "$PYTHON" - "$JAX_MIN" "$JAX_BELOW" <<'EOF' 2>/dev/null
import sys
from importlib import metadata

def key(v):
    return tuple(int(p) for p in v.split(".")[:3] if p.isdigit())

try:
    version = metadata.version("jax")
except metadata.PackageNotFoundError:
    sys.exit(1)
names = {d.metadata["Name"].lower() for d in metadata.distributions() if d.metadata["Name"]}
plugin = next((p for p, n in (("cuda13", "jax-cuda13-plugin"), ("cuda12", "jax-cuda12-plugin"),
                              ("tpu", "libtpu")) if n in names), "cpu")
ok = key(sys.argv[1]) <= key(version) < key(sys.argv[2])
print(version, plugin, "ok" if ok else "out-of-range")
EOF
}

mode=$JAX
if [ "$mode" = auto ]; then
  read -r sys_version sys_plugin sys_ok <<<"$(system_jax || true)"
  major=$(driver_major)
  if [ "${sys_plugin:-cpu}" != cpu ] && [ "${sys_ok:-}" = ok ]; then
    mode=system
  elif [ -n "$major" ]; then
    if [ "$major" -ge 580 ]; then mode=cuda13; else mode=cuda12; fi
  elif on_tpu_vm; then
    mode=tpu
  else
    mode=cpu
  fi
  echo "make install: JAX=$mode (JAX=cpu|cuda12|cuda13|tpu|system to choose)"
fi

case $mode in
cpu) ;;
cuda12 | cuda13)
  major=$(driver_major)
  [ -n "$major" ] || die "JAX=$mode needs an NVIDIA GPU, and nvidia-smi finds none here (JAX=cpu installs the CPU build)"
  need=525
  [ "$mode" = cuda13 ] && need=580
  [ "$major" -ge "$need" ] || die "JAX=$mode needs an NVIDIA driver >= $need; this one is $major (JAX=cuda12 takes >= 525)"
  ;;
tpu)
  on_tpu_vm || die "JAX=tpu needs a TPU VM, and no TPU device is found here (JAX=cpu installs the CPU build)"
  ;;
system)
  [ -z "$JAX_VERSION" ] || die "JAX=system keeps the installed JAX; JAX_VERSION does not apply"
  read -r sys_version sys_plugin sys_ok <<<"$(system_jax || true)"
  [ -n "${sys_version:-}" ] || die "JAX=system: $PYTHON has no JAX installed (JAX=auto picks a build)"
  [ "$sys_ok" = ok ] || die "JAX=system: the installed JAX $sys_version is outside >=$JAX_MIN,<$JAX_BELOW"
  echo "make install: keeping JAX $sys_version ($sys_plugin) of $PYTHON"
  ;;
*) die "JAX=$mode: choose auto, cpu, cuda12, cuda13, tpu or system" ;;
esac

if [ "$mode" = cpu ]; then
  EXTRAS=${EXTRAS:-dev,interop,eval}
  jax_req="jax${JAX_VERSION:+==$JAX_VERSION}"
elif [ "$mode" = system ]; then
  EXTRAS=${EXTRAS:-dev}
  jax_req=""
else
  EXTRAS=${EXTRAS:-dev}
  jax_req="jax[$mode]${JAX_VERSION:+==$JAX_VERSION}"
fi

# With JAX=system alone, the environment sees $PYTHON's packages; remake it when that differs.
want_system=false
[ "$mode" = system ] && want_system=true
if [ -x "$VENV/bin/python" ]; then
  has_system=$([ -f "$VENV/.system-site" ] && echo true || echo false)
  [ "$has_system" = "$want_system" ] || rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  if [ "$want_system" = true ]; then
    site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    # After the environment's own site-packages: what pip installs here wins.
    "$PYTHON" -c "import site, sysconfig; print(*dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib']]), sep='\n')" >"$site/system-site.pth"
    touch "$VENV/.system-site"
  fi
fi
"$VENV/bin/pip" install -q --upgrade pip
# shellcheck disable=SC2086  # jax_req is empty or one word
target=".[$EXTRAS]"
[ "$EXTRAS" = none ] && target=.
"$VENV/bin/pip" install -e "$target" $jax_req
"$VENV/bin/python" -c "import jax; print('make install: jax', jax.__version__, 'on', jax.default_backend())"
