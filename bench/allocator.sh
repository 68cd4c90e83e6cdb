#!/usr/bin/env bash
# The node's global allocator, side by side: the same `tessera` built with
# mimalloc (the default) and with glibc's malloc (`--no-default-features`),
# each running a one-host `tessera up` cluster on the same data directory in
# turn (one host, so every run places and owns the objects alike). Per run,
# on two 1 GiB `none` volumes (bench-none and the default vol0, which is
# `none` on one host): 4 KiB random writes, then
# reads of the same blocks (so the owner's block cache misses), 20,000 each
# at depth 32 with qemu-img bench; the node's CPU per I/O is its task-clock
# over the run (perf stat) divided by the I/Os. Runs alternate between the
# two builds; each run's first round is a warm-up and not counted. Prints
# the medians, and the ratios mimalloc / glibc.
#
#   bench/allocator.sh            # 3 runs per build, about 5 minutes and two builds
#   RUNS=5 bench/allocator.sh
#
# Needs perf, libiscsi-bin and qemu-utils with qemu-block-extra (scripts/test
# installs the last two; perf is linux-perf).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
for tool in perf qemu-img iscsi-inq; do
    command -v "$tool" >/dev/null || { echo "bench/allocator.sh needs $tool" >&2; exit 1; }
done
work=$(mktemp -d)
up=
cleanup() {
    if [ -n "$up" ]; then
        kill "$up" 2>/dev/null || true
        wait "$up" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
cargo build --release -q -p tessera --no-default-features
cp target/release/tessera "$work/tessera-glibc"
cargo build --release -q -p tessera
cp target/release/tessera "$work/tessera-mimalloc"

none="iscsi://127.0.0.1:3360/iqn.2026-11.org.tessera:bench-none/0"
# One run of `build`: prints "build volume kind iops cpu_us_per_io" lines.
run() { # build
    local build=$1 bin="$work/tessera-$1" data="$work/cluster" log="$work/up.log" default pids
    "$bin" up --hosts 1 --data "$data" --base-port 7700 --iscsi-port 3360 >"$log" 2>&1 &
    up=$!
    # The URL is printed after "served over iSCSI": wait for it.
    for _ in $(seq 1 120); do
        grep -q "iscsi://127.0.0.1:3360/" "$log" && break
        kill -0 "$up" 2>/dev/null || break
        sleep 1
    done
    default=$(grep -o "iscsi://127.0.0.1:3360/[^ ]*" "$log" | head -1 || true)
    [ -n "$default" ] || { cat "$log" >&2; echo "tessera up did not come up" >&2; exit 1; }
    if [ "$("$bin" volume ls --data "$data" | grep -c bench-none || true)" = 0 ]; then
        "$bin" volume create bench-none --size 1024MiB --policy none --object-size 256MiB --data "$data" >/dev/null
        "$bin" target create iqn.2026-11.org.tessera:bench-none --lun 0=bench-none --data "$data" >/dev/null
        for _ in $(seq 1 60); do iscsi-inq "$none" >/dev/null 2>&1 && break; sleep 1; done
        # Filled once, so no read below finds a hole.
        qemu-img bench -f raw -t none -w -s 131072 -d 8 -c 8192 -S 131072 "$none" >/dev/null
        qemu-img bench -f raw -t none -w -s 131072 -d 8 -c 8192 -S 131072 "$default" >/dev/null
    fi
    for _ in $(seq 1 60); do iscsi-inq "$none" >/dev/null 2>&1 && break; sleep 1; done
    pids=$(pgrep -f "node --config $data" | paste -sd, || true)
    [ -n "$pids" ] || { echo "no node processes found" >&2; exit 1; }
    one() { # volume url w|r offset round
        local flag=() out secs ms
        [ "$3" = w ] && flag=(-w)
        out=$(perf stat -x, -e task-clock -p "$pids" -- \
            qemu-img bench -f raw -t none "${flag[@]}" -s 4096 -d 32 -c 20000 -o "$4" -S 32436224 "$2" 2>&1) ||
            { echo "$out" >&2; exit 1; }
        secs=$(sed -n 's/Run completed in \([0-9.]*\) seconds./\1/p' <<<"$out")
        ms=$(grep task-clock <<<"$out" | cut -d, -f1)
        [ "$5" -gt 1 ] && awk -v b="$build" -v v="$1" -v k="$3" -v s="$secs" -v ms="$ms" \
            'BEGIN { printf "%s %s %s %.0f %.2f\n", b, v, k, 20000 / s, ms * 1000 / 20000 }'
        return 0
    }
    for round in 1 2 3; do
        # Another start each round (the stride wraps the LUN; two rounds'
        # blocks may overlap a little, the writes before the reads see to
        # it that those miss the cache all the same).
        local offset=$(((RANDOM % 4096 + 1) * 4096))
        one bench-none "$none" w "$offset" "$round"
        one bench-none "$none" r "$offset" "$round"
        one vol0 "$default" w "$offset" "$round"
        one vol0 "$default" r "$offset" "$round"
    done
    kill "$up"
    wait "$up" 2>/dev/null || true
    up=
}
# The volumes are created and filled once, in a run whose rounds are not
# counted; then the builds take turns, the order alternating (ABBA...).
echo "== filling the volumes" >&2
run glibc >/dev/null
for index in $(seq 1 "$RUNS"); do
    echo "== run $index of $RUNS" >&2
    if [ $((index % 2)) = 1 ]; then order=(mimalloc glibc); else order=(glibc mimalloc); fi
    for build in "${order[@]}"; do run "$build" >>"$work/samples"; done
done

echo
echo "4 KiB random I/O at depth 32 on a one-host cluster, $RUNS runs per allocator (medians of $((RUNS * 2)) rounds); $(date -u +%F)"
echo
python3 - "$work/samples" <<'EOF'
import collections, statistics, sys
samples = collections.defaultdict(lambda: ([], []))
for line in open(sys.argv[1]):
    build, volume, kind, iops, cpu = line.split()
    samples[(build, volume, kind)][0].append(float(iops))
    samples[(build, volume, kind)][1].append(float(cpu))
print("| volume | I/O | glibc IOPS | mimalloc IOPS | ratio | glibc CPU µs/IO | mimalloc CPU µs/IO | ratio |")
print("|---|---|---|---|---|---|---|---|")
for volume in ("bench-none", "vol0"):
    for kind, name in (("w", "4K write"), ("r", "4K read")):
        g_iops, g_cpu = (statistics.median(x) for x in samples[("glibc", volume, kind)])
        m_iops, m_cpu = (statistics.median(x) for x in samples[("mimalloc", volume, kind)])
        print(f"| {volume} | {name} | {g_iops:.0f} | {m_iops:.0f} | {m_iops / g_iops:.2f}x "
              f"| {g_cpu:.1f} | {m_cpu:.1f} | {m_cpu / g_cpu:.2f}x |")
EOF
