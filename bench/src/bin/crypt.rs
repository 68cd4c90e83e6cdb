//! Encryption at rest's cost per core: Tessera's XTS-AES-256 (`objects::crypt`)
//! sealing and opening 4 KiB blocks, beside OpenSSL's `aes-256-xts` on
//! 4096-byte buffers (`openssl speed -evp aes-256-xts -bytes 4096`), which
//! `bench/crypt.sh` runs in the same breath.
//!
//! ```sh
//! bench/crypt.sh
//! ```

use std::hint::black_box;
use std::time::{Duration, Instant};

use objects::crypt::{DataKey, Xts, KEY_BYTES};

const BLOCK: usize = 4096;

/// MiB per second of `work` over `blocks` 4 KiB blocks, run for about
/// `for_at_least`.
fn rate(for_at_least: Duration, blocks: &mut [u8], mut work: impl FnMut(u64, &mut [u8])) -> f64 {
    let started = Instant::now();
    let mut done = 0u64;
    while started.elapsed() < for_at_least {
        for (index, block) in blocks.chunks_exact_mut(BLOCK).enumerate() {
            work(done + index as u64, block);
        }
        done += (blocks.len() / BLOCK) as u64;
        black_box(&blocks);
    }
    (done * BLOCK as u64) as f64 / (1 << 20) as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let seconds: u64 = std::env::args().nth(1).and_then(|arg| arg.parse().ok()).unwrap_or(3);
    let key = DataKey(std::array::from_fn(|index| (index as u8).wrapping_mul(31).wrapping_add(7)));
    assert_eq!(key.0.len(), KEY_BYTES);
    let xts = Xts::new(&key);
    // 1 MiB of data, a block's worth at a time, as an owner seals a write.
    let mut blocks: Vec<u8> = (0..1 << 20).map(|index: usize| (index * 131 + 7) as u8).collect();
    let for_at_least = Duration::from_secs(seconds);
    let seal = rate(for_at_least, &mut blocks, |number, block| xts.encrypt(number, block));
    let open = rate(for_at_least, &mut blocks, |number, block| xts.decrypt(number, block));
    println!("tessera xts-aes-256 4096-byte blocks: seal {seal:.0} MiB/s, open {open:.0} MiB/s (one core)");
}
