#!/usr/bin/env bash
# Installs the Debian packages rnull's guest (QEMU) tests and fuzz targets need.
#
#   qemu-system-x86    qemu-system-x86_64, boots the test guest (TCG); brings
#                      qemu-storage-daemon (the reference back-end) through
#                      qemu-system-common
#   fio                I/O load + data verification inside the guest
#   busybox-static     the guest's shell and userland
#   linux-image-amd64  the guest kernel (/boot/vmlinuz-*) and its modules
#   e2fsprogs          mkfs.ext4 inside the guest
#   clang, libclang-rt-14-dev
#                      libFuzzer with ASan/UBSan for the native fuzz targets (test/fuzz)
#   systemd            systemd-analyze, which checks systemd/rnull@.service (test 78)
#
# Node.js 20.3 or newer with npm, python3, make and g++ must already be there
# (they build the native addon and the benchmark client); this checks Node.
#
# Idempotent: when every package is already installed it does nothing (not
# even `apt-get update`). Uses sudo only when not running as root.
set -euo pipefail

node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a === 20 && b >= 3) ? 0 : 1)' ||
  { echo "install-deps: Node.js 20.3 or newer is needed (found $(node --version 2>/dev/null || echo none))" >&2; exit 1; }

PACKAGES=(qemu-system-x86 fio busybox-static linux-image-amd64 e2fsprogs clang libclang-rt-14-dev systemd)

missing=()
for pkg in "${PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
  [[ "$status" == installed ]] || missing+=("$pkg")
done

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "install-deps: all packages present (${PACKAGES[*]})"
  exit 0
fi

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "install-deps: not root and no sudo; cannot install ${missing[*]}" >&2; exit 1; }
  SUDO=(sudo)
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-deps: done"
