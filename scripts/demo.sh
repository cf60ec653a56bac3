#!/usr/bin/env bash
# Sets up a fresh machine and runs the demo: serve two RAM disks over vhost-user-scsi,
# boot a Linux guest with 2 vCPUs and 2 request queues, run fio inside, and show the
# requests per queue and the guest's per-CPU interrupts for each request queue.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-host.sh
exec python3 -m vscsi.demo "$@"
