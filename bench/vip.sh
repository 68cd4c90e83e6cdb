#!/usr/bin/env bash
# Discovery VIP takeover: a 3-host cluster with a VIP; each round kills the
# VIP's owner with SIGKILL and times until another host has taken the VIP
# in the catalog, bound it, and discovery through it lists every target
# again (then restarts the killed host). Prints each round and the p50 and
# worst. Usage: bench/vip.sh [ROUNDS] (default 10). Needs libiscsi-bin. Uses
# the test build (the scenarios' profile): takeover time is failure detection
# and catalog round trips, not CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-10}"
TESSERA_VIP_ROUNDS="$rounds" exec cargo test -p tessera --test it -- --exact --nocapture \
    target_service::the_vip_moves_to_another_host_when_its_owner_is_killed_and_logins_through_it_are_redirected
