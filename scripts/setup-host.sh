#!/usr/bin/env bash
# Installs what vscsi needs on a fresh Debian bookworm machine (as root):
# QEMU 10 (and qemu-utils) from bookworm-backports, the pieces of the guest image (busybox, fio,
# sg3_utils, cpio, kmod), libvirt (daemon, QEMU driver, virsh), then the project itself with
# its test extras.
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
# libvirt, for tests/test_guest_libvirt.py (the domain of docs/deploy.md): the daemon, its
# QEMU driver and virsh, without libvirt-daemon-system (systemd units, polkit, dnsmasq...),
# so what its postinst does is done here: QEMU runs as libvirt-qemu (group kvm, also in a
# group libvirt-qemu: libvirt's built-in user and group), and /dev/kvm belongs to group kvm
# as udev would have it -- otherwise libvirt finds KVM "gone" since its last probe of QEMU
# and probes it again on every look-up (a `virsh define` took 45 s). The test starts
# libvirtd and virtlogd where none runs; without libvirt it skips.
if apt-get install -y -qq --no-install-recommends libvirt-daemon libvirt-daemon-driver-qemu \
     libvirt-clients >/dev/null; then
  getent group kvm >/dev/null || groupadd --system kvm
  getent group libvirt-qemu >/dev/null || groupadd --system libvirt-qemu
  getent passwd libvirt-qemu >/dev/null \
    || useradd --system --gid kvm --home-dir /var/lib/libvirt --no-create-home \
         --shell /usr/sbin/nologin --comment "Libvirt Qemu" libvirt-qemu
  id -nG libvirt-qemu | grep -qw libvirt-qemu || usermod -a -G libvirt-qemu libvirt-qemu
  if [ -c /dev/kvm ]; then chgrp kvm /dev/kvm && chmod 0660 /dev/kvm; fi
else
  echo "setup-host.sh: libvirt could not be installed; tests/test_guest_libvirt.py will skip" >&2
fi
# VSCSI_REQUIRE_COMPILED: a broken build of the compiled plane fails here, loudly, rather
# than leaving the tests to run on the Python path alone
VSCSI_REQUIRE_COMPILED=1 python3 -m pip install -q -e '.[dev]'
