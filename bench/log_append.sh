#!/usr/bin/env bash
# Shared-log append benchmark (see bench/src/bin/log_append.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p tessera -p bench
exec target/release/log_append "$@"
