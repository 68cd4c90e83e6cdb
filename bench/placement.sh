#!/usr/bin/env bash
# The hierarchical scheduler at 5,000 simulated hosts: throughput, latency
# and quality against an all-knowing best fit (see bench/src/bin/placement_scale.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p bench --bin placement_scale
exec target/release/placement_scale "$@"
