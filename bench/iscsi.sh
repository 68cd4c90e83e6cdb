#!/usr/bin/env bash
# iSCSI block I/O, Tessera beside tgt, in one run on loopback:
#   - Tessera: a `tessera up` cluster of 3 hosts; its default 1 GiB raid1(2)
#     volume, and a 1 GiB volume with policy none (both durable: a write is
#     acknowledged once fdatasync'd on every copy), and the same volume
#     encrypted at rest (`--encrypted`: XTS-AES-256 at the objects' owners);
#   - tgt: a 1 GiB file (page cache: acknowledged before it is durable), and
#     a 1 GiB file opened O_SYNC (`--bsoflags sync`: durable, the fair
#     comparison for Tessera's writes).
# Per LUN: 128 KiB sequential write over the whole LUN (which also fills it,
# so no read hits a hole), 128 KiB sequential read, 4 KiB random write and
# read at queue depth 32 (qemu-img bench with a prime stride), the same
# 4 KiB reads twice more, the second timed (re-read: tgt serves every pass
# from the page cache, Tessera the last from its block cache, the first
# from the components' files), and 4 KiB random read at depth 32 with
# iscsi-perf. Prints a table with ratios to
# tgt; about 5 minutes with the defaults.
#
#   bench/iscsi.sh                    # defaults
#   SECONDS_PER=20 bench/iscsi.sh     # longer iscsi-perf runs
#
# Needs tgt, libiscsi-bin and qemu-utils with qemu-block-extra (scripts/test
# installs them) and root (tgtd).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER=${SECONDS_PER:-10}
RANDOM_IOS=${RANDOM_IOS:-20000}
SIZE_MIB=1024
for tool in tgtd tgtadm qemu-img iscsi-perf curl; do
    command -v "$tool" >/dev/null || { echo "bench/iscsi.sh needs $tool (scripts/test installs it)" >&2; exit 1; }
done
cargo build --release -q -p tessera
tessera=$PWD/target/release/tessera
work=$(mktemp -d)
pids=()
cleanup() {
    # tgtd ignores SIGTERM while it serves targets: ask it to stop first.
    [ -n "${tgt_control:-}" ] && tgtadm --control-port "$tgt_control" --op delete --mode system >/dev/null 2>&1 || true
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

# Tessera.
iscsi_port=3360
"$tessera" up --data "$work/cluster" --base-port 7700 --iscsi-port "$iscsi_port" >"$work/up.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 120); do
    grep -q "served over iSCSI" "$work/up.log" && break
    sleep 1
done
grep -q "served over iSCSI" "$work/up.log" || { cat "$work/up.log" >&2; echo "tessera up did not come up" >&2; exit 1; }
raid1_url=$(grep -o "iscsi://127.0.0.1:$iscsi_port/[^ ]*" "$work/up.log" | head -1)
"$tessera" volume create bench-none --size "${SIZE_MIB}MiB" --policy none --object-size 256MiB --data "$work/cluster" >/dev/null
"$tessera" target create iqn.2026-11.org.tessera:bench-none --lun 0=bench-none --data "$work/cluster" >/dev/null
none_url="iscsi://127.0.0.1:$iscsi_port/iqn.2026-11.org.tessera:bench-none/0"
"$tessera" volume create bench-enc --size "${SIZE_MIB}MiB" --policy none --object-size 256MiB --encrypted --data "$work/cluster" >/dev/null
"$tessera" target create iqn.2026-11.org.tessera:bench-enc --lun 0=bench-enc --data "$work/cluster" >/dev/null
enc_url="iscsi://127.0.0.1:$iscsi_port/iqn.2026-11.org.tessera:bench-enc/0"
for url in "$none_url" "$enc_url"; do
    for _ in $(seq 1 60); do
        iscsi-inq "$url" >/dev/null 2>&1 && break
        sleep 1
    done
done

# tgt, on the same disk as Tessera's data.
tgt_port=3361
tgt_control=${TGT_CONTROL_PORT:-61}
tgtd -f -C "$tgt_control" --iscsi portal=127.0.0.1:$tgt_port >"$work/tgtd.log" 2>&1 &
pids+=($!)
sleep 1
tgt_lun() { # tid name file [bsoflags]
    local tid=$1 name=$2 file=$3
    truncate -s "${SIZE_MIB}M" "$file"
    tgtadm --control-port "$tgt_control" --lld iscsi --op new --mode target --tid "$tid" -T "$name"
    if [ $# -ge 4 ]; then
        tgtadm --control-port "$tgt_control" --lld iscsi --op new --mode logicalunit --tid "$tid" --lun 1 -b "$file" --bsoflags "$4"
    else
        tgtadm --control-port "$tgt_control" --lld iscsi --op new --mode logicalunit --tid "$tid" --lun 1 -b "$file"
    fi
    tgtadm --control-port "$tgt_control" --lld iscsi --op bind --mode target --tid "$tid" -I ALL
}
tgt_lun 1 iqn.2026-11.org.bench:file "$work/tgt-file.img"
tgt_lun 2 iqn.2026-11.org.bench:sync "$work/tgt-sync.img" sync
tgt_url="iscsi://127.0.0.1:$tgt_port/iqn.2026-11.org.bench:file/1"
sync_url="iscsi://127.0.0.1:$tgt_port/iqn.2026-11.org.bench:sync/1"

# One measurement: prints operations per second.
bench() { # url write? size depth count step
    local url=$1 write=$2 size=$3 depth=$4 count=$5 step=$6 flag=() out secs
    [ "$write" = w ] && flag=(-w)
    out=$(qemu-img bench -f raw -t none "${flag[@]}" -s "$size" -d "$depth" -c "$count" -S "$step" "$url" 2>&1) ||
        { echo "$out" >&2; return 1; }
    secs=$(sed -n 's/Run completed in \([0-9.]*\) seconds./\1/p' <<<"$out")
    awk -v c="$count" -v s="$secs" 'BEGIN { printf "%.0f", c / s }'
}
perf() { # url: 4 KiB random reads at depth 32 for SECONDS_PER seconds, IOPS
    local out
    out=$(iscsi-perf -b 8 -m 32 -r -t "$SECONDS_PER" "$1" 2>&1 || true)
    # Progress lines end in \r: "..., iops average 29145 (113 MB/s), ..."
    grep -o "iops average [0-9]*" <<<"$out" | tail -1 | awk '{ print $3 + 0 }'
}

# Block cache hits and misses summed over Tessera's hosts ("hits misses"),
# from each node's /metrics (the admin API, base port + 80).
cache_reads() {
    local hits=0 misses=0 host h m
    for host in 1 2 3; do
        # A node that does not answer in 5 s counts nothing.
        read -r h m < <(curl -s --max-time 5 "127.0.0.$host:7780/metrics" |
            awk '/^objects_block_cache_hits / { h = $2 } /^objects_block_cache_misses / { m = $2 } END { print h + 0, m + 0 }')
        hits=$((hits + h)) misses=$((misses + m))
    done
    echo "$hits $misses"
}
# The share of block lookups between two cache_reads that hit, or "-".
cache_hit_share() {
    awk -v a="$1" -v b="$2" 'BEGIN { split(a, x, " "); split(b, y, " "); h = y[1] - x[1]; n = h + y[2] - x[2];
        if (n > 0) printf "%.0f%%", 100 * h / n; else print "-" }'
}

names=(tgt-file tgt-sync tessera-none tessera-none-enc tessera-raid1)
urls=("$tgt_url" "$sync_url" "$none_url" "$enc_url" "$raid1_url")
seq_count=$((SIZE_MIB * 8))    # 128 KiB requests covering the LUN
stride=$((4096 * 7919))         # a prime number of 4 KiB blocks
declare -A result
for index in "${!names[@]}"; do
    name=${names[$index]}
    url=${urls[$index]}
    echo "== $name: $url" >&2
    result[$name,seqw]=$(bench "$url" w 131072 8 "$seq_count" 131072)
    result[$name,seqr]=$(bench "$url" r 131072 8 "$seq_count" 131072)
    result[$name,randw]=$(bench "$url" w 4096 32 "$RANDOM_IOS" "$stride")
    result[$name,randr]=$(bench "$url" r 4096 32 "$RANDOM_IOS" "$stride")
    # Read once more before the timed re-read: a block read once into a
    # full S3-FIFO cache is kept only once read again (as a ghost's return),
    # so a first re-read hits or misses by what the node's cache held
    # before (one run: 100% for the LUN whose objects came to host 1 with
    # an empty cache, 13% for the next two). The timed one then compares
    # cached reads alike.
    bench "$url" r 4096 32 "$RANDOM_IOS" "$stride" >/dev/null
    before=$(cache_reads)
    result[$name,reread]=$(bench "$url" r 4096 32 "$RANDOM_IOS" "$stride")
    result[$name,rereadhits]=$(cache_hit_share "$before" "$(cache_reads)")
    result[$name,perf]=$(perf "$url")
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }'; }
mib() { awk -v ops="$1" 'BEGIN { printf "%.0f MiB/s", ops / 8 }'; }
echo
echo "iSCSI over loopback, ${SIZE_MIB} MiB LUNs; qemu-img bench (-t none) and iscsi-perf; $(date -u +%F)"
echo
printf "| %-16s | %14s | %14s | %16s | %16s | %16s | %18s |\n" LUN "128K seq write" "128K seq read" "4K rand write QD32" "4K rand read QD32" "4K re-read QD32" "iscsi-perf 4K rand read QD32"
printf "|%s|%s|%s|%s|%s|%s|%s|\n" ------------------ ---------------- ---------------- ------------------ ------------------ ------------------ --------------------
for name in "${names[@]}"; do
    printf "| %-16s | %14s | %14s | %12s IOPS | %12s IOPS | %12s IOPS | %14s IOPS |\n" "$name" \
        "$(mib "${result[$name,seqw]}")" "$(mib "${result[$name,seqr]}")" \
        "${result[$name,randw]}" "${result[$name,randr]}" "${result[$name,reread]}" "${result[$name,perf]}"
done
echo
echo "Ratios (Tessera / tgt):"
for name in tessera-none tessera-none-enc tessera-raid1; do
    echo "  $name: 4K read vs tgt-file $(ratio "${result[$name,randr]}" "${result[tgt-file,randr]}") (qemu-img), $(ratio "${result[$name,perf]}" "${result[tgt-file,perf]}") (iscsi-perf), re-read $(ratio "${result[$name,reread]}" "${result[tgt-file,reread]}");" \
        "durable 4K write vs tgt-sync $(ratio "${result[$name,randw]}" "${result[tgt-sync,randw]}"), vs tgt-file $(ratio "${result[$name,randw]}" "${result[tgt-file,randw]}");" \
        "128K write vs tgt-sync $(ratio "${result[$name,seqw]}" "${result[tgt-sync,seqw]}"), 128K read vs tgt-file $(ratio "${result[$name,seqr]}" "${result[tgt-file,seqr]}")"
done
# Where each single-copy volume's one component and its owner sit: a copy
# on the host serving iSCSI (host 1) is read without a network hop, one on
# another host over loopback TCP, which moves these volumes' figures more
# than anything else (bench/RESULTS.md).
for volume in bench-none bench-enc; do
    for object in $(seq 0 $((SIZE_MIB / 256 - 1))); do
        placed=$("$tessera" object show "$volume.$object" --data "$work/cluster" 2>&1 |
            grep -oE "owner host [0-9]+|on host [0-9]+" | tr '\n' ' ') || placed="(not known)"
        echo "Placement of $volume.$object (iSCSI served by host 1): $placed"
    done
done
echo "Block cache hits in each Tessera LUN's timed 4K re-read (the third read of the same blocks):" \
    "none $(printf %s "${result[tessera-none,rereadhits]}"), none-enc $(printf %s "${result[tessera-none-enc,rereadhits]}")," \
    "raid1 $(printf %s "${result[tessera-raid1,rereadhits]}")"
echo "Encryption at rest (tessera-none-enc / tessera-none): 128K write $(ratio "${result[tessera-none-enc,seqw]}" "${result[tessera-none,seqw]}"), 128K read $(ratio "${result[tessera-none-enc,seqr]}" "${result[tessera-none,seqr]}"), 4K write $(ratio "${result[tessera-none-enc,randw]}" "${result[tessera-none,randw]}"), 4K read $(ratio "${result[tessera-none-enc,randr]}" "${result[tessera-none,randr]}"), 4K re-read $(ratio "${result[tessera-none-enc,reread]}" "${result[tessera-none,reread]}")"
