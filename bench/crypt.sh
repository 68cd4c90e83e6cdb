#!/usr/bin/env bash
# Encryption at rest per core: Tessera's XTS-AES-256 over 4 KiB blocks beside
# OpenSSL's aes-256-xts on 4096-byte buffers, in one run; prints the ratio.
#
#   bench/crypt.sh          # 3 s per measurement
#   bench/crypt.sh 10       # 10 s per measurement
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-3}
command -v openssl >/dev/null || { echo "bench/crypt.sh needs openssl (Debian package openssl)" >&2; exit 1; }
cargo build --release -q -p bench --bin crypt
ours=$(target/release/crypt "$seconds")
echo "$ours"
# `openssl speed` prints kB/s (1000 bytes) per buffer size in its last line:
#   AES-256-XTS  123456.78k
theirs=$(openssl speed -evp aes-256-xts -bytes 4096 -seconds "$seconds" 2>/dev/null | tail -1)
echo "openssl $(openssl version | cut -d' ' -f2): $theirs"
openssl_mib=$(awk '{ v = $NF; sub(/k$/, "", v); printf "%.0f", v * 1000 / 1048576 }' <<<"$theirs")
seal=$(sed -n 's/.*seal \([0-9]*\) MiB.*/\1/p' <<<"$ours")
open=$(sed -n 's/.*open \([0-9]*\) MiB.*/\1/p' <<<"$ours")
echo "openssl aes-256-xts encrypt: $openssl_mib MiB/s (one core)"
awk -v s="$seal" -v o="$open" -v r="$openssl_mib" 'BEGIN { printf "ratio to openssl: seal %.2fx, open %.2fx\n", s / r, o / r }'
