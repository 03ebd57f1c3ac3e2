#!/usr/bin/env bash
# The CRI end-to-end test (tests/tests/cri.rs), kept out of scripts/test.sh while it is flaky:
# a CRI container's output sometimes never reaches its CRI log (the first stdout line is lost
# every time; see docs/shim.md). Sets up everything first, like scripts/test.sh.
set -euo pipefail
# shellcheck source=scripts/lib.sh
. "$(dirname "$0")/lib.sh"

"$REPO/scripts/setup.sh"

cd "$REPO"
log "cargo test: the CRI end-to-end test"
cargo test --locked -p nutshell-tests --test cri -- --include-ignored --nocapture \
    cri_pod_with_two_containers_runs_in_one_microvm
