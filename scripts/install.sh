#!/usr/bin/env bash
# Install everything LazyCAF needs on a fresh Debian 12 machine: system packages, a venv in
# .venv, the project with its FUSE and test extras. Idempotent; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
# fuse3/libfuse3-dev/pkg-config: pyfuse3 has no wheel, pip builds it against libfuse3.
# btrfs-progs: the host cache on a Btrfs loop image. patchelf: the relocatable sample.
# squashfs-tools: the XAR-like baseline in benchmarks. iproute2: network namespaces.
PKGS=(fuse3 libfuse3-dev pkg-config btrfs-progs patchelf squashfs-tools zstd iproute2 util-linux)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null
fi

PY=${PYTHON:-python3}
"$PY" -c 'import sys; assert sys.version_info >= (3, 11), "LazyCAF needs Python 3.11+"'
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[fuse,test]' 2>&1 \
  | grep -v "^WARNING: Location" || true
.venv/bin/python -c 'import pyfuse3, lmdb, blake3, trio, httpx, zstandard, hypercorn' \
  || { echo "install.sh: the venv is incomplete" >&2; exit 1; }
echo "install.sh: ready (.venv/bin/lazycaf)"
