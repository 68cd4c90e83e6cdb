#!/usr/bin/env bash
# Tessera's cache against quick_cache and moka in one run: hit ratios,
# throughput, memory per entry (see bench/src/bin/cache.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p bench --bin cache
exec target/release/cache "$@"
