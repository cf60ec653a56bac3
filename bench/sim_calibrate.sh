#!/usr/bin/env bash
# Calibrate `vscsi simulate` from our own bench, then check the model against the same runs.
#
#   bash bench/sim_calibrate.sh [OUTDIR]          (default out/sim-calibrate)
#
# Runs the calibration set through the SMP driver (`vscsi bench --socket`), each run
# against a fresh `vscsi serve --once` with two RAM-disk targets and two request queues, and
# then `vscsi simulate --calibrate ... --check`, which exits 1 if the calibrated model is
# more than 20% off any run's IOPS. What each run constrains (src/vscsi/sim/README.md):
#   base-4k, base-64k   1 VCPU, 1 queue, iodepth 1: round trip and per-byte cost
#   piped               1 VCPU, 1 queue, iodepth 8: the busiest stage (guest vs host CPU)
#   x-percpu, x-single  2 VCPUs, iodepth 1, locality ~1 vs ~0.5: cost of a cross-CPU completion
#   par                 2 VCPUs, 2 queues, iodepth 4: host CPUs and whether VCPUs share them
# REQUESTS per run (default 8000); each configuration runs REPEAT times (default 3) and
# the fastest is kept (a try that fails is reported and skipped): other load on the machine only ever slows a run down. Run it on a
# quiet machine all the same: load puts millisecond outliers into the iodepth-1 latencies.
set -euo pipefail

out=${1:-out/sim-calibrate}
requests=${REQUESTS:-8000}
repeat=${REPEAT:-3}
mkdir -p "$out"
sock="$out/serve.sock"
serve_pid=

serve() {  # a fresh server per run: one front-end per `vscsi serve --once`
    rm -f "$sock"
    vscsi serve --socket "$sock" --queues 2 --lun 0:0=ram:64M --lun 1:0=ram:64M \
        --once --log-level warning &
    serve_pid=$!
    for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
}

stop() {
    if [ -n "$serve_pid" ]; then
        kill "$serve_pid" 2>/dev/null || true
        wait "$serve_pid" 2>/dev/null || true
        serve_pid=
    fi
}
trap stop EXIT

bench() {  # NAME ARGS...: keeps the fastest of $repeat runs
    local name=$1; shift
    for i in $(seq "$repeat"); do
        serve
        if ! vscsi bench --socket "$sock" --rw randread --requests "$requests" --json "$@" \
            > "$out/try-$name-$i.json" 2> "$out/try-$name-$i.err"; then
            echo "bench $name try $i failed: $(tail -n 1 "$out/try-$name-$i.err")" >&2
            rm -f "$out/try-$name-$i.json"
        fi
        stop
    done
    rm -f "$out"/try-"$name"-*.err
    if ! ls "$out"/try-"$name"-*.json > /dev/null 2>&1; then
        echo "bench $name: every try failed, left out of the calibration" >&2
        return 0
    fi
    python - "$out/bench-$name.json" "$out"/try-"$name"-*.json <<'PY'
import json, sys
runs = [json.load(open(p)) for p in sys.argv[2:]]
best = max(runs, key=lambda r: r["iops"])
json.dump(best, open(sys.argv[1], "w"), indent=2)
lat = best["lat_us"]
tries = " ".join(f"{r['iops']:.0f}" for r in runs)
print(f"{sys.argv[1]}: {best['iops']:.0f} IOPS (tries: {tries}), latency p50 {lat['p50']:.0f}"
      f" mean {lat['mean']:.0f} p99 {lat['p99']:.0f} us, locality {best['locality']:.2f}")
PY
    rm -f "$out"/try-"$name"-*.json
}

bench base-4k  --vcpus 1 --queues 1 --targets 1 --policy percpu --bs 4k  --iodepth 1
bench base-64k --vcpus 1 --queues 1 --targets 1 --policy percpu --bs 64k --iodepth 1
bench piped    --vcpus 1 --queues 1 --targets 1 --policy percpu --bs 4k  --iodepth 8
bench x-percpu --vcpus 2 --queues 2 --targets 2 --policy percpu --bs 4k  --iodepth 1
bench x-single --vcpus 2 --queues 2 --targets 2 --policy single --bs 4k  --iodepth 1
bench par      --vcpus 2 --queues 2 --targets 2 --policy percpu --bs 4k  --iodepth 4

vscsi simulate --calibrate "$out"/bench-*.json --params-out "$out/sim-params.json" --check
