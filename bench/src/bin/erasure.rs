//! Erasure-coding speed on one core: reed-solomon-erasure with its SIMD
//! code (what `objects::ec` uses) beside reed-solomon-simd, in one run, for
//! k+m = 2+1, 3+1, 4+1 and 4+2 with 4 to 64 KiB chunks.
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
use reed_solomon_simd::{ReedSolomonDecoder, ReedSolomonEncoder};

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
    println!("one core; GB/s of data chunks (k x chunk bytes per stripe); rse = reed-solomon-erasure (used), rss = reed-solomon-simd");
    println!(
        "{:>5} {:>7} | {:>9} {:>9} {:>7} | {:>9} {:>9} {:>7}",
        "k+m", "chunk", "rse enc", "rss enc", "ratio", "rse dec", "rss dec", "ratio"
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

            let used_encode = rate(time, bytes, || {
                black_box(layout.encode(black_box(&refs)).expect("encode"));
            });
            let mut encoder = ReedSolomonEncoder::new(k, m, chunk).expect("reed-solomon-simd");
            let simd_encode = rate(time, bytes, || {
                for piece in &refs {
                    encoder.add_original_shard(piece).expect("shard");
                }
                let result = encoder.encode().expect("encode");
                black_box(result.recovery_iter().count());
            });

            // Both lose the first m data chunks and rebuild them.
            let parity = layout.encode(&refs).expect("encode");
            let whole: Vec<Vec<u8>> = data.iter().cloned().chain(parity).collect();
            let used_decode = rate(time, bytes, || {
                let mut pieces: Vec<Option<Vec<u8>>> =
                    whole.iter().enumerate().map(|(i, piece)| (i >= m).then(|| piece.clone())).collect();
                layout.reconstruct(&mut pieces).expect("reconstruct");
                black_box(pieces);
            });
            let mut encoder = ReedSolomonEncoder::new(k, m, chunk).expect("reed-solomon-simd");
            for piece in &refs {
                encoder.add_original_shard(piece).expect("shard");
            }
            let recovery: Vec<Vec<u8>> =
                encoder.encode().expect("encode").recovery_iter().map(<[u8]>::to_vec).collect();
            let mut decoder = ReedSolomonDecoder::new(k, m, chunk).expect("reed-solomon-simd");
            let simd_decode = rate(time, bytes, || {
                for (index, piece) in data.iter().enumerate().skip(m) {
                    decoder.add_original_shard(index, piece).expect("shard");
                }
                for (index, piece) in recovery.iter().enumerate() {
                    decoder.add_recovery_shard(index, piece).expect("shard");
                }
                let result = decoder.decode().expect("decode");
                black_box(result.restored_original_iter().map(|(_, piece)| piece.to_vec()).collect::<Vec<_>>());
            });
            println!(
                "{:>5} {:>5}Ki | {:>9.2} {:>9.2} {:>6.2}x | {:>9.2} {:>9.2} {:>6.2}x",
                format!("{k}+{m}"),
                chunk_kib,
                used_encode,
                simd_encode,
                used_encode / simd_encode,
                used_decode,
                simd_decode,
                used_decode / simd_decode,
            );
        }
    }
}
