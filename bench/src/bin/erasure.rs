//! Erasure-coding speed on one core: reed-solomon-simd (what
//! `objects::ec` uses) beside reed-solomon-erasure, in one run, for k+m =
//! 2+1, 3+1, 4+1 and 4+2 with 4 to 64 KiB chunks.
//!
//! Encode: GB/s of data chunks turned into parity. Decode: GB/s of data
//! chunks covered when the first `m` data chunks are lost and rebuilt from
//! the rest (the worst case: parity alone cannot be copied).
//!
//!     bench/erasure.sh [--seconds 0.5]

use std::hint::black_box;
use std::time::{Duration, Instant};

use clap::Parser;
use objects::ec::Layout;
use reed_solomon_erasure::galois_8::ReedSolomon;

#[derive(Parser)]
struct Args {
    /// Time spent on each measurement.
    #[arg(long, default_value_t = 0.5)]
    seconds: f64,
}

/// Runs `step` (which codes `bytes` of data) for about `time`; GB/s.
fn rate(time: Duration, bytes: usize, mut step: impl FnMut()) -> f64 {
    for _ in 0..8 {
        step();
    }
    let start = Instant::now();
    let mut rounds = 0u64;
    while start.elapsed() < time {
        for _ in 0..16 {
            step();
        }
        rounds += 16;
    }
    (rounds as f64 * bytes as f64) / start.elapsed().as_secs_f64() / 1e9
}

fn main() {
    let args = Args::parse();
    let time = Duration::from_secs_f64(args.seconds);
    println!("one core; GB/s of data chunks (k x chunk bytes per stripe)");
    println!(
        "{:>5} {:>7} | {:>12} {:>12} {:>7} | {:>12} {:>12} {:>7}",
        "k+m", "chunk", "simd enc", "erasure enc", "ratio", "simd dec", "erasure dec", "ratio"
    );
    for (k, m) in [(2, 1), (3, 1), (4, 1), (4, 2)] {
        for chunk_kib in [4usize, 16, 64] {
            let chunk = chunk_kib << 10;
            let layout = Layout::new(k, m);
            let data: Vec<Vec<u8>> = (0..k)
                .map(|i| (0..chunk).map(|j| (j as u64).wrapping_mul(2654435761).wrapping_add(i as u64) as u8).collect())
                .collect();
            let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
            let bytes = k * chunk;

            let simd_encode = rate(time, bytes, || {
                black_box(layout.encode(black_box(&refs)).expect("encode"));
            });
            let codec = ReedSolomon::new(k, m).expect("reed-solomon-erasure");
            let mut shards: Vec<Vec<u8>> = data.iter().cloned().chain((0..m).map(|_| vec![0u8; chunk])).collect();
            let erasure_encode = rate(time, bytes, || {
                codec.encode(black_box(&mut shards)).expect("encode");
            });

            let parity = layout.encode(&refs).expect("encode");
            let whole: Vec<Vec<u8>> = data.iter().cloned().chain(parity).collect();
            let simd_decode = rate(time, bytes, || {
                let mut pieces: Vec<Option<Vec<u8>>> =
                    whole.iter().enumerate().map(|(i, piece)| (i >= m).then(|| piece.clone())).collect();
                layout.reconstruct(&mut pieces).expect("reconstruct");
                black_box(pieces);
            });
            let erasure_decode = rate(time, bytes, || {
                let mut pieces: Vec<Option<Vec<u8>>> =
                    whole.iter().enumerate().map(|(i, piece)| (i >= m).then(|| piece.clone())).collect();
                codec.reconstruct_data(&mut pieces).expect("reconstruct");
                black_box(pieces);
            });
            println!(
                "{:>5} {:>5}Ki | {:>12.2} {:>12.2} {:>6.2}x | {:>12.2} {:>12.2} {:>6.2}x",
                format!("{k}+{m}"),
                chunk_kib,
                simd_encode,
                erasure_encode,
                simd_encode / erasure_encode,
                simd_decode,
                erasure_decode,
                simd_decode / erasure_decode,
            );
        }
    }
}
