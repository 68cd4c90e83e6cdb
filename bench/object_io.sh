#!/usr/bin/env bash
# 4 KiB random I/O through the block client API for none, raid1(2),
# raid1(3) and none encrypted against pwrite+fdatasync on a plain file, then resync throughput
# (see bench/src/bin/object_io.rs). About 2 minutes with the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p bench --bin object_io
exec target/release/object_io "$@"
