#!/usr/bin/env bash
# Erasure-coded LUNs beside raid1 over iSCSI, in one run on loopback: a
# `tessera up --hosts 6` cluster; 576 MiB volumes (three 192 MiB objects,
# which hold whole stripes of every layout) with policies raid1:2,
# raid5:3+1, raid5:4+1 and raid6:4+2, all durable (a write is acknowledged
# once fdatasync'd on every component). Per LUN: 128 KiB sequential write
# over the whole LUN at depth 8, then 1 MiB (whole stripes but for 3+1's
# 192 KiB ones at the edges), then 4 KiB random write at depth 32
# (qemu-img bench, prime stride), the disk space its component files hold
# once full (capacity overhead = that / the LUN's size), and the share of
# it returned by unmapping every other MiB (qemu-io discard: UNMAP).
# Prints a table with ratios to raid1:2.
#
#   bench/erasure_iscsi.sh
#   RANDOM_IOS=50000 bench/erasure_iscsi.sh
#
# Needs libiscsi-bin and qemu-utils with qemu-block-extra (scripts/test
# installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
RANDOM_IOS=${RANDOM_IOS:-20000}
SIZE_MIB=576
command -v qemu-img >/dev/null || { echo "bench/erasure_iscsi.sh needs qemu-img (scripts/test installs it)" >&2; exit 1; }
cargo build --release -q -p tessera
tessera=$PWD/target/release/tessera
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for _ in $(seq 1 50); do
        alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ $alive = 0 ] && break
        sleep 0.1
    done
    for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

iscsi_port=3370
"$tessera" up --hosts 6 --data "$work/cluster" --base-port 7800 --iscsi-port "$iscsi_port" >"$work/up.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 180); do
    grep -q "served over iSCSI" "$work/up.log" && break
    sleep 1
done
grep -q "served over iSCSI" "$work/up.log" || { cat "$work/up.log" >&2; echo "tessera up did not come up" >&2; exit 1; }

policies=(raid1:2 raid5:3+1 raid5:4+1 raid6:4+2)
declare -A url
for policy in "${policies[@]}"; do
    name=bench-${policy//[:+]/-}
    "$tessera" volume create "$name" --size "${SIZE_MIB}MiB" --policy "$policy" --object-size 192MiB --data "$work/cluster" >/dev/null
    "$tessera" target create "iqn.2026-11.org.tessera:$name" --lun "0=$name" --data "$work/cluster" >/dev/null
    url[$policy]="iscsi://127.0.0.1:$iscsi_port/iqn.2026-11.org.tessera:$name/0"
    for _ in $(seq 1 60); do
        iscsi-inq "${url[$policy]}" >/dev/null 2>&1 && break
        sleep 1
    done
done

# Each component data file and the bytes it holds on disk.
allocation() {
    find "$work/cluster" -name 'c-*.data' -printf '%b %p\n' | awk '{ print $2, $1 * 512 }' | sort
}
# Bytes the files listed in $1 (a file of "path bytes" lines) hold now.
held_by() {
    allocation | join - "$1" | awk '{ s += $2 } END { printf "%d", s }'
}

bench() { # url write? size depth count step: operations per second
    local url=$1 write=$2 size=$3 depth=$4 count=$5 step=$6 flag=() out secs
    [ "$write" = w ] && flag=(-w)
    out=$(qemu-img bench -f raw -t none "${flag[@]}" -s "$size" -d "$depth" -c "$count" -S "$step" "$url" 2>&1) ||
        { echo "$out" >&2; return 1; }
    secs=$(sed -n 's/Run completed in \([0-9.]*\) seconds./\1/p' <<<"$out")
    awk -v c="$count" -v s="$secs" 'BEGIN { printf "%.0f", c / s }'
}

seq_count=$((SIZE_MIB * 8))
stride=$((4096 * 7919))
declare -A result
for policy in "${policies[@]}"; do
    echo "== $policy: ${url[$policy]}" >&2
    allocation >"$work/before"
    result[$policy,seqw]=$(bench "${url[$policy]}" w 131072 8 "$seq_count" 131072)
    # The LUN's component files: those the write made grow (the other
    # LUNs' files may change meanwhile, e.g. as their objects move).
    allocation | join - "$work/before" | awk '$2 > $3 { print $1, $3 }' >"$work/mine"
    before=$(awk '{ s += $2 } END { printf "%d", s }' "$work/mine")
    after=$(held_by "$work/mine")
    result[$policy,overhead]=$(awk -v a="$after" -v b="$before" -v s="$SIZE_MIB" 'BEGIN { printf "%.2f", (a - b) / (s * 1048576) }')
    result[$policy,seqw1m]=$(bench "${url[$policy]}" w 1048576 8 "$SIZE_MIB" 1048576)
    result[$policy,randw]=$(bench "${url[$policy]}" w 4096 32 "$RANDOM_IOS" "$stride")
    full=$(held_by "$work/mine")
    discards=()
    for mib in $(seq 0 2 $((SIZE_MIB - 1))); do discards+=(-c "discard ${mib}M 1M"); done
    qemu-io -f raw --discard=unmap "${discards[@]}" "${url[$policy]}" >/dev/null
    half=$(held_by "$work/mine")
    result[$policy,returned]=$(awk -v f="$full" -v h="$half" -v b="$before" 'BEGIN { printf "%.1f%%", 100 * (f - h) / (f - b) }')
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }'; }
echo
echo "Erasure-coded and raid1 LUNs over iSCSI on loopback, 6 hosts, ${SIZE_MIB} MiB LUNs; qemu-img bench -t none; $(date -u +%F)"
echo
printf "| %-10s | %16s | %8s | %16s | %8s | %20s | %8s | %22s | %22s |\n" policy "128K seq write QD8" "vs raid1" "1M seq write QD8" "vs raid1" "4K rand write QD32" "vs raid1" "disk held / LUN size" "returned by unmapping half"
printf "|%s|%s|%s|%s|%s|%s|%s|%s|%s|\n" ------------ ------------------ ---------- ------------------ ---------- ---------------------- ---------- ------------------------ ------------------------
for policy in "${policies[@]}"; do
    printf "| %-10s | %11s MiB/s | %8s | %11s MiB/s | %8s | %15s IOPS | %8s | %22s | %22s |\n" "$policy" \
        "$(awk -v o="${result[$policy,seqw]}" 'BEGIN { printf "%.0f", o / 8 }')" \
        "$(ratio "${result[$policy,seqw]}" "${result[raid1:2,seqw]}")" \
        "${result[$policy,seqw1m]}" "$(ratio "${result[$policy,seqw1m]}" "${result[raid1:2,seqw1m]}")" \
        "${result[$policy,randw]}" "$(ratio "${result[$policy,randw]}" "${result[raid1:2,randw]}")" \
        "${result[$policy,overhead]}x" "${result[$policy,returned]}"
done
