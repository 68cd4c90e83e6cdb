#!/usr/bin/env bash
# Throughput cost of in-place GC (see bench/src/bin/gc_dip.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p tessera -p bench
exec target/release/gc_dip "$@"
