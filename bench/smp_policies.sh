#!/bin/sh
# The SMP driver over a `vscsi serve` started here: each policy on the same job, the
# figures that tell them apart (MB/s, locality, IPIs, FIFO violations), one line each.
# Then the cover letter's table (`vscsi bench --preset coverletter`).
#
#   bench/smp_policies.sh [OUT_DIR]      (default: ./smp-results)
#
# Environment: VCPUS (2), TARGETS (4), RUNTIME (2 seconds per run).
set -eu
out=${1:-smp-results}
vcpus=${VCPUS:-2}
targets=${TARGETS:-4}
runtime=${RUNTIME:-2}
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'kill "$serve" 2>/dev/null; wait "$serve" 2>/dev/null; rm -rf "$tmp"' EXIT INT TERM

luns=""
t=0
while [ "$t" -lt "$targets" ]; do luns="$luns --lun $t:0=ram:64M"; t=$((t + 1)); done
# shellcheck disable=SC2086
python -m vscsi.serve --socket "$tmp/s.sock" --queues "$vcpus" --log-level warning $luns \
    2>"$out/serve.log" &
serve=$!
while [ ! -S "$tmp/s.sock" ]; do sleep 0.1; done

run() {  # name, then bench options
    name=$1; shift
    vscsi bench --socket "$tmp/s.sock" --json --vcpus "$vcpus" --rw read --bsrange 4k-64k \
        --iodepth 4 --runtime "$runtime" "$@" > "$out/$name.json"
    python - "$out/$name.json" "$name" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]:<22} {r['mbps']:7.0f} MB/s  locality {r['locality']:.3f}  "
      f"IPIs {r['ipis']:6d}  FIFO violations {r['fifo_violations']:4d}  "
      f"per queue {r['per_queue']}")
PY
}

run percpu --policy percpu
run single --policy single
run pertarget --policy pertarget
run pertarget-late-100ms --policy pertarget --hint-delay 100
run percpu-unpinned --policy percpu --no-pin
run blkmq-shared-target --policy blkmq --targets 1 --numjobs 2

vscsi bench --preset coverletter --vcpus "$vcpus" --socket "$tmp/s.sock" --out "$out" \
    --runtime "$runtime" --preset-targets "$(seq -s, 1 "$targets")"
