//! SANITIZE (SBC-4 §5.30): OVERWRITE, BLOCK ERASE and CRYPTO ERASE of a
//! whole logical unit, and EXIT FAILURE MODE.
//!
//! A sanitize runs in the background, apart from the command that started
//! it: aborting that command, resetting the unit or losing the I_T nexus
//! does not stop it. While it runs, the unit answers every command but
//! INQUIRY, REPORT LUNS and REQUEST SENSE with NOT READY, SANITIZE IN
//! PROGRESS and how far it has got. If it fails, media access is refused
//! with SANITIZE COMMAND FAILED until a sanitize succeeds or, when the
//! failed one allowed it (AUSE), an EXIT FAILURE MODE.
//!
//! An overwrite may be paced to a number of bytes a second, so that
//! sanitizing a large unit does not take every disk and link it shares with
//! other volumes; a block erase only deallocates and is not paced.
//!
//! CRYPTO ERASE is offered by a device that encrypts what it stores
//! ([`BlockDevice::encrypted`]): it replaces the keys, so every block
//! written before reads as noise (an encrypted Tessera volume: each of its
//! objects' keys, in the catalog).
//! A sanitize is not resumed after the process serving the unit restarts.

use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};

use crate::scsi::{be16, BlockDevice, IoResult};
use crate::sense::Sense;

pub const OPCODE: u8 = 0x48;
pub const OVERWRITE: u8 = 0x01;
pub const BLOCK_ERASE: u8 = 0x02;
pub const CRYPTO_ERASE: u8 = 0x03;
pub const EXIT_FAILURE_MODE: u8 = 0x1f;

/// Blocks written or unmapped per request, and requests in flight.
const PIECE_BLOCKS: u64 = 2048;
const IN_FLIGHT: usize = 4;

/// A SANITIZE CDB whose reserved fields and service action were checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub service_action: u8,
    pub immediate: bool,
    /// ALLOW UNRESTRICTED SANITIZE EXIT: if this sanitize fails, EXIT
    /// FAILURE MODE may end the failure.
    pub unrestricted_exit: bool,
    pub parameter_length: u16,
}

/// What a sanitize does to every block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Operation {
    /// Writes `pattern`, repeated to fill each block, `passes` times;
    /// inverted on every other pass when `invert`.
    Overwrite {
        pattern: Bytes,
        passes: u8,
        invert: bool,
    },
    /// Deallocates every block: each then reads as zeros.
    BlockErase,
    /// Replaces the device's keys: each block written reads as noise.
    CryptoErase,
    ExitFailureMode,
}

impl Request {
    /// Checks the CDB before anything else: reserved bits and bytes, then
    /// the service action.
    pub fn parse(cdb: &[u8]) -> Result<Request, Sense> {
        if cdb[1] & 0x40 != 0 {
            return Err(Sense::invalid_cdb(1, Some(6)));
        }
        if let Some(byte) = (2..=6).find(|&byte| cdb[byte] != 0) {
            return Err(Sense::invalid_cdb(byte as u16, None));
        }
        let service_action = cdb[1] & 0x1f;
        if !matches!(service_action, OVERWRITE | BLOCK_ERASE | CRYPTO_ERASE | EXIT_FAILURE_MODE) {
            return Err(Sense::invalid_cdb(1, Some(4)));
        }
        Ok(Request {
            service_action,
            immediate: cdb[1] & 0x80 != 0,
            unrestricted_exit: cdb[1] & 0x20 != 0,
            parameter_length: be16(&cdb[7..]),
        })
    }

    /// The operation, with its parameter list checked. `data` may carry
    /// padding past the parameter list length.
    pub fn operation(&self, data: &[u8], block_size: u32) -> Result<Operation, Sense> {
        let length = usize::from(self.parameter_length);
        if self.service_action != OVERWRITE {
            // BLOCK ERASE, CRYPTO ERASE and EXIT FAILURE MODE take no
            // parameter list.
            if length != 0 {
                return Err(Sense::invalid_cdb(7, None));
            }
            return Ok(match self.service_action {
                BLOCK_ERASE => Operation::BlockErase,
                CRYPTO_ERASE => Operation::CryptoErase,
                _ => Operation::ExitFailureMode,
            });
        }
        // Four header bytes and a pattern of 1 to one block's bytes.
        if length < 5 || length > block_size as usize + 4 {
            return Err(Sense::invalid_cdb(7, None));
        }
        if data.len() < length {
            return Err(Sense::parameter_list_length());
        }
        let data = &data[..length];
        let passes = data[0] & 0x1f;
        if passes == 0 || data[0] & 0x60 != 0 {
            // An overwrite count of zero, or the TEST field set.
            return Err(Sense::invalid_parameter(0));
        }
        if data[1] != 0 {
            return Err(Sense::invalid_parameter(1));
        }
        let pattern_length = usize::from(be16(&data[2..]));
        if pattern_length == 0 || pattern_length > length - 4 || pattern_length > block_size as usize {
            return Err(Sense::invalid_parameter(2));
        }
        Ok(Operation::Overwrite {
            pattern: Bytes::copy_from_slice(&data[4..4 + pattern_length]),
            passes,
            invert: data[0] & 0x80 != 0,
        })
    }
}

/// How far a running sanitize has got, in blocks.
#[derive(Debug)]
pub struct Progress {
    done: AtomicU64,
    total: AtomicU64,
}

impl Progress {
    pub fn new(total: u64) -> Progress {
        Progress { done: AtomicU64::new(0), total: AtomicU64::new(total.max(1)) }
    }

    /// The blocks to do, once known for sure (the unit may have grown).
    pub fn set_total(&self, total: u64) {
        self.total.store(total.max(1), Ordering::Relaxed);
    }

    /// Done so far, in 65536ths (the sense data's progress indication).
    pub fn fraction(&self) -> u16 {
        let total = self.total.load(Ordering::Relaxed);
        let done = self.done.load(Ordering::Relaxed).min(total);
        (u128::from(done) * 65_536 / u128::from(total)).min(65_535) as u16
    }

    fn add(&self, blocks: u64) {
        self.done.fetch_add(blocks, Ordering::Relaxed);
    }
}

/// The unit's sanitize state.
#[derive(Debug, Default)]
pub struct State {
    pub running: Option<Arc<Progress>>,
    /// The last sanitize failed (with whether it allowed EXIT FAILURE
    /// MODE), and nothing has ended the failure since.
    pub failed: Option<bool>,
}

/// Spreads block writes over time at no more than `bytes_per_second`.
struct Pace {
    started: tokio::time::Instant,
    bytes_per_second: u64,
    block_size: u64,
    /// Blocks let go so far.
    issued: AtomicU64,
}

impl Pace {
    /// When the next `blocks` may start: once every block let go before
    /// them has had its share of time.
    fn due(&self, blocks: u64) -> tokio::time::Instant {
        let before = self.issued.fetch_add(blocks, Ordering::Relaxed) * self.block_size;
        self.started + Duration::from_secs_f64(before as f64 / self.bytes_per_second as f64)
    }
}

/// Runs `piece(lba, count)` over blocks `0..blocks` in pieces of
/// `PIECE_BLOCKS`, `IN_FLIGHT` at once, each starting no earlier than
/// `pace` allows, counting each done piece.
async fn in_pieces<F, Fut>(blocks: u64, pace: Option<&Pace>, progress: &Progress, piece: F) -> IoResult<()>
where
    F: Fn(u64, u64) -> Fut,
    Fut: std::future::Future<Output = IoResult<()>>,
{
    futures::stream::iter((0..blocks.div_ceil(PIECE_BLOCKS)).map(|index| index * PIECE_BLOCKS))
        .map(|lba| {
            let count = PIECE_BLOCKS.min(blocks - lba);
            let due = pace.map(|pace| pace.due(count));
            let done = piece(lba, count);
            async move {
                if let Some(due) = due {
                    tokio::time::sleep_until(due).await;
                }
                done.await?;
                progress.add(count);
                IoResult::Ok(())
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<()>()
        .await
}

/// The blocks an operation touches: every block of every pass.
pub fn total_blocks(operation: &Operation, blocks: u64) -> u64 {
    match operation {
        Operation::Overwrite { passes, .. } => blocks * u64::from(*passes),
        Operation::BlockErase | Operation::CryptoErase | Operation::ExitFailureMode => blocks,
    }
}

/// Runs `operation` over blocks `0..blocks` of `device`, then flushes. An
/// overwrite writes no faster than `bytes_per_second`, when given.
pub async fn run(
    device: Arc<dyn BlockDevice>,
    operation: Operation,
    blocks: u64,
    bytes_per_second: Option<NonZeroU64>,
    progress: &Progress,
) -> IoResult<()> {
    match operation {
        Operation::Overwrite { pattern, passes, invert } => {
            let block = device.block_size() as usize;
            let pace = bytes_per_second.map(|rate| Pace {
                started: tokio::time::Instant::now(),
                bytes_per_second: rate.get(),
                block_size: block as u64,
                issued: AtomicU64::new(0),
            });
            let filled = fill(&pattern, block, PIECE_BLOCKS as usize);
            let inverted: Bytes = filled.iter().map(|byte| !byte).collect::<Vec<u8>>().into();
            for pass in 0..passes {
                let data = if invert && pass % 2 == 1 { inverted.clone() } else { filled.clone() };
                in_pieces(blocks, pace.as_ref(), progress, |lba, count| {
                    let device = device.clone();
                    let data = data.slice(..count as usize * block);
                    async move { device.write(lba, data).await }
                })
                .await?;
            }
        }
        Operation::BlockErase => {
            in_pieces(blocks, None, progress, |lba, count| {
                let device = device.clone();
                async move { device.unmap(lba, count).await }
            })
            .await?;
        }
        Operation::CryptoErase => {
            device.crypto_erase().await?;
            progress.add(blocks);
        }
        Operation::ExitFailureMode => return Ok(()),
    }
    device.flush().await
}

/// `count` blocks of `block` bytes, each `pattern` repeated to fill it.
fn fill(pattern: &[u8], block: usize, count: usize) -> Bytes {
    let mut one = Vec::with_capacity(block);
    while one.len() < block {
        let take = pattern.len().min(block - one.len());
        one.extend_from_slice(&pattern[..take]);
    }
    let mut out = BytesMut::with_capacity(block * count);
    for _ in 0..count {
        out.extend_from_slice(&one);
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sense::key;

    fn cdb(byte1: u8, length: u16) -> [u8; 10] {
        let mut cdb = [0u8; 10];
        cdb[0] = OPCODE;
        cdb[1] = byte1;
        cdb[7..9].copy_from_slice(&length.to_be_bytes());
        cdb
    }

    fn overwrite_list(first: u8, pattern_length: u16, pattern: &[u8]) -> Vec<u8> {
        let mut list = vec![first, 0];
        list.extend_from_slice(&pattern_length.to_be_bytes());
        list.extend_from_slice(pattern);
        list
    }

    fn invalid(result: Result<impl std::fmt::Debug, Sense>) -> (u8, u8) {
        let sense = result.expect_err("refused");
        assert_eq!(sense.key, key::ILLEGAL_REQUEST);
        (sense.asc, sense.ascq)
    }

    #[test]
    fn reserved_fields_and_unknown_service_actions_are_refused() {
        assert_eq!(invalid(Request::parse(&cdb(0x40 | BLOCK_ERASE, 0))), (0x24, 0));
        for byte in 2..=6 {
            let mut bad = cdb(BLOCK_ERASE, 0);
            bad[byte] = byte as u8;
            assert_eq!(Request::parse(&bad).unwrap_err().field, Some((true, byte as u16, None)));
        }
        for action in [0x00, 0x04, 0x1e] {
            assert_eq!(invalid(Request::parse(&cdb(action, 0))), (0x24, 0), "service action {action:#x}");
        }
        let request = Request::parse(&cdb(0x80 | 0x20 | OVERWRITE, 516)).unwrap();
        assert_eq!(
            request,
            Request { service_action: OVERWRITE, immediate: true, unrestricted_exit: true, parameter_length: 516 }
        );
    }

    #[test]
    fn block_erase_crypto_erase_and_exit_failure_mode_take_no_parameters() {
        let erase = Request::parse(&cdb(BLOCK_ERASE, 0)).unwrap();
        assert_eq!(erase.operation(&[], 512).unwrap(), Operation::BlockErase);
        let crypto = Request::parse(&cdb(CRYPTO_ERASE, 0)).unwrap();
        assert_eq!(crypto.operation(&[], 512).unwrap(), Operation::CryptoErase);
        let exit = Request::parse(&cdb(EXIT_FAILURE_MODE, 0)).unwrap();
        assert_eq!(exit.operation(&[], 512).unwrap(), Operation::ExitFailureMode);
        for action in [BLOCK_ERASE, CRYPTO_ERASE, EXIT_FAILURE_MODE] {
            let with_list = Request::parse(&cdb(action, 8)).unwrap();
            assert_eq!(invalid(with_list.operation(&[0; 8], 512)), (0x24, 0));
        }
    }

    #[test]
    fn overwrite_parameters_are_checked() {
        let request = |length: u16| Request::parse(&cdb(OVERWRITE, length)).unwrap();
        let full = overwrite_list(0x81, 512, &[0xaa; 512]);
        assert_eq!(
            request(516).operation(&full, 512).unwrap(),
            Operation::Overwrite { pattern: Bytes::from(vec![0xaa; 512]), passes: 1, invert: true }
        );
        // A short pattern, padded to a multiple of four bytes by the initiator.
        let mut short = overwrite_list(0x01, 4, &[1, 2, 3, 4]);
        short.extend_from_slice(&[0; 4]);
        assert!(matches!(request(8).operation(&short, 512), Ok(Operation::Overwrite { .. })));
        // The list length: at least a header and one pattern byte, at most
        // a header and one block.
        for length in [0, 1, 2, 3, 4, 517] {
            assert_eq!(invalid(request(length).operation(&[0; 520], 512)), (0x24, 0), "length {length}");
        }
        let refused = |list: Vec<u8>| invalid(request(516).operation(&list, 512));
        assert_eq!(refused(overwrite_list(0x00, 512, &[0xaa; 512])), (0x26, 0), "no passes");
        assert_eq!(refused(overwrite_list(0x21, 512, &[0xaa; 512])), (0x26, 0), "TEST field");
        assert_eq!(refused(overwrite_list(0x01, 0, &[0xaa; 512])), (0x26, 0), "empty pattern");
        assert_eq!(refused(overwrite_list(0x01, 516, &[0xaa; 512])), (0x26, 0), "pattern past the list");
        let mut reserved = overwrite_list(0x01, 512, &[0xaa; 512]);
        reserved[1] = 1;
        assert_eq!(refused(reserved), (0x26, 0), "reserved byte");
        assert_eq!(invalid(request(516).operation(&[0x01, 0, 2, 0], 512)), (0x1a, 0), "list cut short");
    }

    #[test]
    fn a_pattern_fills_each_block_and_progress_counts_in_65536ths() {
        let filled = fill(&[1, 2, 3], 8, 2);
        assert_eq!(&filled[..], &[1, 2, 3, 1, 2, 3, 1, 2, 1, 2, 3, 1, 2, 3, 1, 2]);
        let progress = Progress::new(4);
        assert_eq!(progress.fraction(), 0);
        progress.add(1);
        assert_eq!(progress.fraction(), 16_384);
        progress.add(3);
        assert_eq!(progress.fraction(), 65_535);
    }
}
