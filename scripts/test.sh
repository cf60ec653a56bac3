#!/usr/bin/env bash
# Sets up a fresh machine (system packages, the project) and runs the whole test suite,
# real-guest tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-host.sh
exec python3 -m pytest -q "$@"
