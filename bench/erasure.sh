#!/usr/bin/env bash
# Erasure-coding speed on one core: reed-solomon-erasure (used) beside
# reed-solomon-simd (see bench/src/bin/erasure.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p bench --bin erasure
exec taskset -c 0 "${CARGO_TARGET_DIR:-target}/release/erasure" "$@"
