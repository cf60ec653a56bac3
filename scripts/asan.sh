#!/usr/bin/env bash
# The compiled data plane under AddressSanitizer: builds vscsi.dataplane._plane with
# -fsanitize=address in a copy of the source tree (the installed build is left alone),
# then runs the tests that feed it guest input -- rings (hostile chains included), the
# differential test, the device, the hostile vhost-user front-ends and the worker tests
# -- with libasan preloaded into Python and every `vscsi serve` those tests start.
# Any invalid read or write in the compiled code stops the process with a report.
#
#   ./scripts/asan.sh [pytest arguments...]
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d /tmp/vscsi-asan.XXXXXX)
trap 'rm -rf "$work"' EXIT
cp -r src setup.py pyproject.toml README.md "$work"/
rm -f "$work"/src/vscsi/dataplane/*.so "$work"/src/vscsi/dataplane/*.c
(cd "$work" && VSCSI_ASAN=1 VSCSI_REQUIRE_COMPILED=1 \
   python3 setup.py -q build_ext --inplace >/dev/null)

libasan=$(gcc -print-file-name=libasan.so)
# Python's own allocations are not instrumented; leaks are CPython's business here.
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:print_summary=1
export LD_PRELOAD=$libasan
export PYTHONPATH=$work/src
python3 - <<'PY'
import vscsi.dataplane as d
assert d.compiled is not None and d.compiled.__file__.startswith(__import__("os").environ["PYTHONPATH"]), d.compiled
print("ASan build:", d.compiled.__file__)
PY
exec python3 -m pytest -q -p no:cacheprovider tests/virtio tests/dataplane tests/device \
    tests/vhost_user "$@"
