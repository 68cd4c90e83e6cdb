//! Erasure coding (RAID-5/6): where an object's blocks live among its
//! components, and the Reed-Solomon code that makes the parity.
//!
//! An erasure-coded object of `k` data and `m` parity components is cut
//! into stripes of `k` chunks of `chunk_blocks` blocks. Every component
//! holds one chunk of every stripe, at the same place: a component's block
//! `row` belongs to stripe `row / chunk_blocks`, so the `k + m` blocks at one
//! row of every component form a codeword. That keeps one block address
//! space for all components, which is what the owner's LSNs, tracking
//! bitmaps and synchronization bitmaps count in: a bitmap of rows is valid
//! on every component. Which component holds which chunk rotates by stripe
//! (stripe `s`, position `p` — data `0..k`, parity `k..k+m` — is on
//! component `(p + s) mod (k + m)`), so parity writes and reads spread over
//! all components.
//!
//! See `docs/design/erasure-coding.md`.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use blockstore::BLOCK_SIZE;
use reed_solomon_erasure::galois_8::ReedSolomon;

use crate::owner::Index;

/// Blocks per chunk: 64 KiB.
pub const CHUNK_BLOCKS: u64 = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Data chunks per stripe (`k`).
    pub data: usize,
    /// Parity chunks per stripe (`m`).
    pub parity: usize,
    pub chunk_blocks: u64,
}

/// A run of an object's blocks that lies in one chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub stripe: u64,
    /// Data position in the stripe (`0..k`).
    pub position: usize,
    /// The component holding it.
    pub component: Index,
    /// Its first row on that component, and its length in blocks.
    pub row: u64,
    pub count: u64,
    /// Its first block in the object.
    pub block: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodeError {
    #[error("{missing} of {width} chunks are missing; at most {parity} can be rebuilt")]
    TooManyMissing { missing: usize, width: usize, parity: usize },
    #[error("chunks of different lengths")]
    Lengths,
    #[error("erasure code: {0}")]
    Codec(String),
}

impl Layout {
    pub fn new(data: usize, parity: usize) -> Layout {
        Layout { data, parity, chunk_blocks: CHUNK_BLOCKS }
    }

    /// Components per object (`k + m`).
    pub fn width(&self) -> usize {
        self.data + self.parity
    }

    pub fn stripe_blocks(&self) -> u64 {
        self.data as u64 * self.chunk_blocks
    }

    /// Stripes holding `object_blocks` blocks (the last may be partly past
    /// the end: its rows exist and read as zeros).
    pub fn stripes(&self, object_blocks: u64) -> u64 {
        object_blocks.div_ceil(self.stripe_blocks())
    }

    /// Blocks each component holds for an object of `object_blocks`.
    pub fn rows(&self, object_blocks: u64) -> u64 {
        self.stripes(object_blocks) * self.chunk_blocks
    }

    pub fn stripe_of_row(&self, row: u64) -> u64 {
        row / self.chunk_blocks
    }

    /// The component holding position `position` of stripe `stripe`.
    pub fn component(&self, stripe: u64, position: usize) -> Index {
        ((position as u64 + stripe) % self.width() as u64) as Index
    }

    /// The position `component` holds in stripe `stripe`.
    pub fn position(&self, stripe: u64, component: Index) -> usize {
        let width = self.width() as u64;
        ((component as u64 + width - stripe % width) % width) as usize
    }

    /// The chunk pieces that object blocks `first..first + count` fall in,
    /// in object order.
    pub fn pieces(&self, first: u64, count: u64) -> Vec<Piece> {
        let mut pieces = Vec::new();
        let mut block = first;
        let end = first + count;
        while block < end {
            let stripe = block / self.stripe_blocks();
            let within = block % self.stripe_blocks();
            let position = (within / self.chunk_blocks) as usize;
            let offset = within % self.chunk_blocks;
            let run = (self.chunk_blocks - offset).min(end - block);
            pieces.push(Piece {
                stripe,
                position,
                component: self.component(stripe, position),
                row: stripe * self.chunk_blocks + offset,
                count: run,
                block,
            });
            block += run;
        }
        pieces
    }

    /// The object block held at `row` of the chunk at data position
    /// `position` (it may be past the object's end).
    pub fn block_at(&self, row: u64, position: usize) -> u64 {
        let stripe = self.stripe_of_row(row);
        stripe * self.stripe_blocks() + position as u64 * self.chunk_blocks + row % self.chunk_blocks
    }

    /// The run of object blocks `(first, count)` that holds every data
    /// block of rows `row..row + rows` (`rows` > 0): from the first row's
    /// block at position 0 to the last row's at position k - 1. Within one
    /// stripe it also holds the other rows' blocks between them; across
    /// stripes, everything between.
    pub fn blocks_of_rows(&self, row: u64, rows: u64) -> (u64, u64) {
        let first = self.block_at(row, 0);
        let last = self.block_at(row + rows.max(1) - 1, self.data - 1);
        (first, last - first + 1)
    }

    /// Parity for `data` (k pieces of equal length, whole blocks): m pieces.
    pub fn encode(&self, data: &[&[u8]]) -> Result<Vec<Vec<u8>>, CodeError> {
        assert_eq!(data.len(), self.data, "one piece per data position");
        let bytes = data[0].len();
        if data.iter().any(|piece| piece.len() != bytes) {
            return Err(CodeError::Lengths);
        }
        let mut parity = vec![vec![0u8; bytes]; self.parity];
        if bytes > 0 {
            codec(self.data, self.parity)?.encode_sep(data, &mut parity).map_err(failed)?;
        }
        Ok(parity)
    }

    /// Fills in the missing pieces of a codeword (by position: data `0..k`,
    /// parity `k..k+m`) from the others; at most `m` may be missing.
    pub fn reconstruct(&self, pieces: &mut [Option<Vec<u8>>]) -> Result<(), CodeError> {
        assert_eq!(pieces.len(), self.width(), "one slot per position");
        let missing = pieces.iter().filter(|piece| piece.is_none()).count();
        if missing == 0 {
            return Ok(());
        }
        if missing > self.parity {
            return Err(CodeError::TooManyMissing { missing, width: self.width(), parity: self.parity });
        }
        let bytes = pieces.iter().flatten().map(Vec::len).next().unwrap_or(0);
        if pieces.iter().flatten().any(|piece| piece.len() != bytes) {
            return Err(CodeError::Lengths);
        }
        if bytes == 0 {
            pieces.iter_mut().for_each(|piece| *piece = Some(Vec::new()));
            return Ok(());
        }
        codec(self.data, self.parity)?.reconstruct(pieces).map_err(failed)
    }
}

/// The code for k data and m parity pieces, made once per shape.
fn codec(data: usize, parity: usize) -> Result<&'static ReedSolomon, CodeError> {
    static CODECS: OnceLock<Mutex<HashMap<(usize, usize), &'static ReedSolomon>>> = OnceLock::new();
    let mut codecs = CODECS.get_or_init(Default::default).lock().expect("codecs lock");
    if let Some(codec) = codecs.get(&(data, parity)) {
        return Ok(codec);
    }
    let codec: &'static ReedSolomon = Box::leak(Box::new(ReedSolomon::new(data, parity).map_err(failed)?));
    codecs.insert((data, parity), codec);
    Ok(codec)
}

fn failed(error: reed_solomon_erasure::Error) -> CodeError {
    CodeError::Codec(error.to_string())
}

/// Bytes in `blocks` blocks.
pub fn bytes(blocks: u64) -> usize {
    blocks as usize * BLOCK_SIZE
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(seed: u64, len: usize) -> Vec<u8> {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    #[test]
    fn the_blocks_of_rows_hold_every_block_those_rows_store() {
        for (k, m) in [(2, 1), (3, 1), (4, 2)] {
            let layout = Layout::new(k, m);
            let stripes = 3;
            let object_blocks = stripes * layout.stripe_blocks();
            for row in 0..stripes * layout.chunk_blocks {
                for rows in [1, 2, layout.chunk_blocks, 2 * layout.chunk_blocks + 1] {
                    let rows = rows.min(stripes * layout.chunk_blocks - row);
                    let (first, count) = layout.blocks_of_rows(row, rows);
                    // Every object block stored in those rows is in the run.
                    for block in 0..object_blocks {
                        let piece = layout.pieces(block, 1)[0];
                        if (row..row + rows).contains(&piece.row) {
                            assert!(
                                (first..first + count).contains(&block),
                                "{k}+{m}: rows {row}+{rows}: block {block}"
                            );
                        }
                    }
                    // And the run reaches no further than those rows' stripes.
                    let stripe_first = layout.stripe_of_row(row) * layout.stripe_blocks();
                    let stripe_end = (layout.stripe_of_row(row + rows - 1) + 1) * layout.stripe_blocks();
                    assert!(first >= stripe_first && first + count <= stripe_end);
                }
            }
            // One row: one block per data chunk, and the rows between them.
            assert_eq!(
                layout.blocks_of_rows(layout.chunk_blocks + 3, 1),
                (layout.stripe_blocks() + 3, (k as u64 - 1) * layout.chunk_blocks + 1)
            );
        }
    }

    #[test]
    fn every_position_of_every_stripe_is_on_a_distinct_component_and_rotates() {
        for (k, m) in [(2, 1), (3, 1), (4, 1), (4, 2)] {
            let layout = Layout::new(k, m);
            for stripe in 0..12 {
                let mut seen: Vec<Index> = (0..k + m).map(|p| layout.component(stripe, p)).collect();
                for p in 0..k + m {
                    assert_eq!(layout.position(stripe, layout.component(stripe, p)), p);
                }
                seen.sort();
                assert_eq!(seen, (0..k + m).collect::<Vec<_>>());
            }
            // Parity (position k) is on a different component in consecutive stripes.
            assert_ne!(layout.component(0, k), layout.component(1, k));
        }
    }

    #[test]
    fn pieces_cover_a_range_once_in_order_and_map_back_to_their_blocks() {
        let layout = Layout::new(3, 1);
        for (first, count) in [(0, 1), (5, 40), (15, 2), (47, 1), (0, 48), (10, 200)] {
            let pieces = layout.pieces(first, count);
            let mut next = first;
            for piece in &pieces {
                assert_eq!(piece.block, next);
                assert!(piece.count >= 1 && piece.count <= layout.chunk_blocks);
                for i in 0..piece.count {
                    assert_eq!(layout.block_at(piece.row + i, piece.position), piece.block + i);
                }
                assert_eq!(piece.row / layout.chunk_blocks, piece.stripe);
                assert_eq!(piece.component, layout.component(piece.stripe, piece.position));
                next += piece.count;
            }
            assert_eq!(next, first + count);
        }
        assert_eq!(layout.rows(48), 16);
        assert_eq!(layout.rows(49), 32);
    }

    #[test]
    fn any_m_missing_pieces_are_rebuilt_exactly() {
        for (k, m) in [(2, 1), (3, 1), (4, 1), (4, 2)] {
            let layout = Layout::new(k, m);
            for len in [BLOCK_SIZE, 3 * BLOCK_SIZE, 16 * BLOCK_SIZE] {
                let data: Vec<Vec<u8>> = (0..k).map(|i| pattern((k * 100 + i) as u64 + len as u64, len)).collect();
                let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
                let parity = layout.encode(&refs).unwrap();
                assert_eq!(parity.len(), m);
                let whole: Vec<Vec<u8>> = data.iter().cloned().chain(parity).collect();
                // Every set of up to m missing positions.
                for a in 0..k + m {
                    for b in a..k + m {
                        if m == 1 && b != a {
                            continue;
                        }
                        let mut pieces: Vec<Option<Vec<u8>>> = whole.iter().cloned().map(Some).collect();
                        pieces[a] = None;
                        pieces[b] = None;
                        layout.reconstruct(&mut pieces).unwrap();
                        let rebuilt: Vec<Vec<u8>> = pieces.into_iter().map(Option::unwrap).collect();
                        assert_eq!(rebuilt, whole, "k={k} m={m} len={len} missing {a},{b}");
                    }
                }
            }
        }
    }

    #[test]
    fn more_missing_than_parity_is_an_error_not_a_guess() {
        let layout = Layout::new(3, 1);
        let mut pieces = vec![Some(vec![1u8; BLOCK_SIZE]), None, None, Some(vec![2u8; BLOCK_SIZE])];
        assert_eq!(layout.reconstruct(&mut pieces), Err(CodeError::TooManyMissing { missing: 2, width: 4, parity: 1 }));
    }

    #[test]
    fn parity_is_linear_so_zero_data_has_zero_parity() {
        // Unwritten (deallocated) chunks read as zeros: a stripe of zeros
        // must have zero parity, so a reclaimed stripe needs no parity kept.
        let layout = Layout::new(4, 2);
        let zeros = vec![0u8; BLOCK_SIZE];
        let parity = layout.encode(&[&zeros, &zeros, &zeros, &zeros]).unwrap();
        assert!(parity.iter().all(|piece| piece.iter().all(|byte| *byte == 0)));
    }
}
