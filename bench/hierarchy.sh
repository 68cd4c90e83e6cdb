#!/usr/bin/env bash
# Failure detection at 100-5,000 simulated hosts: hierarchy vs flat monitor
# (see bench/src/bin/hierarchy_scale.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p bench --bin hierarchy_scale
exec target/release/hierarchy_scale "$@"
