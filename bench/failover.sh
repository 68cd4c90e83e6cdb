#!/usr/bin/env bash
# I/O stall on failover: a 3-host cluster, a raid1(2) volume; a writer
# (qemu-io, i.e. libiscsi) writes a self-verifying pattern through one
# host's portal; each round kills that host with SIGKILL; the writer fails
# over to another host's portal after a 3 s path timeout, as a multipath
# initiator would, and retries what failed. Reports the longest time
# without an acknowledged write per round and the p50 and worst, and checks
# every acknowledged write is on the LUN. Usage: bench/failover.sh [ROUNDS]
# (default 10). Needs qemu-utils and qemu-block-extra.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-10}"
TESSERA_FAILOVER_ROUNDS="$rounds" exec cargo test -p tessera --test it -- --exact --nocapture \
    target_service::killing_the_host_an_initiator_writes_through_fails_over_to_another_portal_with_no_acknowledged_write_lost
