#!/usr/bin/env bash
# Installs what vscsi needs on a fresh Debian bookworm machine (as root):
# QEMU 10 (and qemu-utils) from bookworm-backports, the pieces of the guest image (busybox, fio,
# sg3_utils, cpio, kmod), then the project itself with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /etc/apt/sources.list.d/backports.sources ]; then
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  cat > /etc/apt/sources.list.d/backports.sources <<SRC
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# qemu-utils (qemu-storage-daemon: the NBD server of the nbd: backend's tests) from the
# same suite as QEMU, so their shared libraries agree.
apt-get install -y -qq -t bookworm-backports qemu-system-x86 qemu-utils >/dev/null \
  || apt-get install -y -qq qemu-system-x86 qemu-utils >/dev/null
apt-get install -y -qq busybox-static cpio kmod fio sg3-utils util-linux >/dev/null
# for the guest image (vscsi.vm): gcc + binutils build tiny stand-ins for the ~80 MB of
# libraries fio's unused engines (rbd, gluster, rdma...) pull in, keeping the initramfs
# at ~4 MB (without them the image still builds, just much larger and slower to boot);
# zstd unpacks the modules of kernels that compress them with it.
apt-get install -y -qq --no-install-recommends gcc binutils zstd >/dev/null
# the compiled data plane (setup.py): a C compiler and Python's headers build it, liburing's
# static archive gives it io_uring
apt-get install -y -qq --no-install-recommends gcc libc6-dev liburing-dev >/dev/null
# VSCSI_REQUIRE_COMPILED: a broken build of the compiled plane fails here, loudly, rather
# than leaving the tests to run on the Python path alone
VSCSI_REQUIRE_COMPILED=1 python3 -m pip install -q -e '.[dev]'
