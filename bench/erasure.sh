#!/usr/bin/env bash
# Erasure-coding speed on one core: reed-solomon-simd beside
# reed-solomon-erasure (see bench/src/bin/erasure.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p bench --bin erasure
exec taskset -c 0 target/release/erasure "$@"
