//! Encryption at rest of an object's blocks: XTS-AES-256 (IEEE 1619),
//! one data unit per 4 KiB block, the block's number in the object as the
//! tweak.
//!
//! The owner encrypts what it writes before it reaches any component and
//! decrypts what it reads, so components, resyncs, repairs and the
//! erasure code see only ciphertext; a compare and write compares the
//! plaintext. An object's key is its own (the node keeps it in the
//! catalog's object record); replacing it ([`crate::object::Object::erase_key`])
//! leaves whatever the object held unreadable at once: SANITIZE's CRYPTO
//! ERASE.
//!
//! A block no write has reached reads as zeros from every component. A
//! block whose ciphertext is all zeros is therefore read as zeros, not
//! decrypted: a written block's ciphertext is all zeros with probability
//! 2^-32768.

use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use aes::Aes256;

use blockstore::BLOCK_SIZE;

/// Two AES-256 keys: the data key, then the tweak key.
pub const KEY_BYTES: usize = 64;

/// An object's key. Its `Debug` shows nothing of it.
#[derive(Clone, PartialEq, Eq)]
pub struct DataKey(pub [u8; KEY_BYTES]);

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

const UNIT: usize = 16;
const UNITS: usize = BLOCK_SIZE / UNIT;

/// XTS-AES-256 over whole 4 KiB blocks.
pub struct Xts {
    data: Aes256,
    tweak: Aes256,
}

impl Xts {
    pub fn new(key: &DataKey) -> Xts {
        let (data, tweak) = key.0.split_at(KEY_BYTES / 2);
        // IEEE 1619 §5.1: the two halves must differ.
        assert_ne!(data, tweak, "an XTS key whose two halves are equal");
        Xts { data: Aes256::new(GenericArray::from_slice(data)), tweak: Aes256::new(GenericArray::from_slice(tweak)) }
    }

    /// Encrypts `blocks` (whole blocks) in place, the first being block
    /// `first` of the object.
    pub fn encrypt(&self, first: u64, blocks: &mut [u8]) {
        for (index, block) in blocks.chunks_exact_mut(BLOCK_SIZE).enumerate() {
            self.unit(first + index as u64, block, |units| self.data.encrypt_blocks(units));
        }
    }

    /// Decrypts `blocks` in place, leaving blocks of all zeros as they are
    /// (never written).
    pub fn decrypt(&self, first: u64, blocks: &mut [u8]) {
        for (index, block) in blocks.chunks_exact_mut(BLOCK_SIZE).enumerate() {
            if block.iter().all(|&byte| byte == 0) {
                continue;
            }
            self.unit(first + index as u64, block, |units| self.data.decrypt_blocks(units));
        }
    }

    /// One data unit: each 16-byte piece XORed with its tweak before and
    /// after `cipher`, all pieces through `cipher` at once (the AES
    /// instructions then run several in parallel).
    fn unit(&self, number: u64, block: &mut [u8], cipher: impl FnOnce(&mut [aes::Block])) {
        let mut tweak = aes::Block::from(u128::from(number).to_le_bytes());
        self.tweak.encrypt_block(&mut tweak);
        let mut value = u128::from_le_bytes(tweak.into());
        let mut tweaks = [0u128; UNITS];
        let mut units: [aes::Block; UNITS] = [aes::Block::default(); UNITS];
        for ((slot, unit), piece) in tweaks.iter_mut().zip(units.iter_mut()).zip(block.chunks_exact(UNIT)) {
            *slot = value;
            let piece = u128::from_le_bytes(piece.try_into().expect("16 bytes"));
            *unit = (piece ^ value).to_le_bytes().into();
            // Multiplication by the primitive element α of GF(2^128),
            // x^128 + x^7 + x^2 + x + 1.
            value = (value << 1) ^ ((value >> 127) * 0x87);
        }
        cipher(&mut units);
        for ((unit, piece), tweak) in units.iter().zip(block.chunks_exact_mut(UNIT)).zip(&tweaks) {
            let unit: [u8; UNIT] = (*unit).into();
            piece.copy_from_slice(&(u128::from_le_bytes(unit) ^ tweak).to_le_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> DataKey {
        let mut key = [0u8; KEY_BYTES];
        for (index, byte) in key.iter_mut().enumerate() {
            *byte = (index as u8).wrapping_mul(37).wrapping_add(11);
        }
        DataKey(key)
    }

    fn pattern(blocks: usize) -> Vec<u8> {
        (0..blocks * BLOCK_SIZE).map(|index| (index * 7 + index / 4096) as u8).collect()
    }

    #[test]
    fn a_block_decrypts_to_what_was_encrypted_and_only_under_its_own_number_and_key() {
        let xts = Xts::new(&key());
        let plain = pattern(3);
        let mut sealed = plain.clone();
        xts.encrypt(40, &mut sealed);
        assert_ne!(sealed, plain);
        // Every 16 bytes changed: no piece is left in the clear.
        for (sealed, plain) in sealed.chunks(UNIT).zip(plain.chunks(UNIT)) {
            assert_ne!(sealed, plain);
        }
        let mut opened = sealed.clone();
        xts.decrypt(40, &mut opened);
        assert_eq!(opened, plain);

        let mut elsewhere = sealed.clone();
        xts.decrypt(41, &mut elsewhere);
        assert_ne!(elsewhere[..BLOCK_SIZE], plain[..BLOCK_SIZE]);

        let mut other = key();
        other.0[0] ^= 1;
        let mut wrong = sealed;
        Xts::new(&other).decrypt(40, &mut wrong);
        assert!(wrong.chunks(UNIT).zip(plain.chunks(UNIT)).all(|(wrong, plain)| wrong != plain));
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|byte| format!("{byte:02x}")).collect()
    }

    /// The ciphertext another XTS-AES-256 implementation gives for the same
    /// key, tweak and block (Python's `cryptography` 48, over OpenSSL 3.0:
    /// `Cipher(algorithms.AES(key), modes.XTS(number.to_bytes(16,
    /// 'little')))`): its first 32 and last 16 bytes.
    #[test]
    fn a_block_is_sealed_as_other_xts_aes_256_implementations_seal_it() {
        let xts = Xts::new(&key());
        let cases = [
            (0, "6b8aecf184643c7c4e4ffbbac846f6c791059d423daeeed7232cc62fadc317e3", "635bc4eb5353209bc3bc50e846b20ae6"),
            (
                40,
                "d6d035055e99043c8286a9b3b33dbd95817f129410754aaedfa38c147ad2f5e1",
                "616577f0cd5a1e6a9dc0130e648861e7",
            ),
            (
                0x0123_4567_89ab_cdef,
                "9a889eeee853335ce40bfc41eb092ead55d4aa2aeabd12687cd15e40e6f523c3",
                "020f9e322d922d8fbd58aa9dc039b661",
            ),
        ];
        for (number, head, tail) in cases {
            let mut block = pattern(1);
            xts.encrypt(number, &mut block);
            assert_eq!(hex(&block[..32]), head, "block {number}");
            assert_eq!(hex(&block[BLOCK_SIZE - 16..]), tail, "block {number}");
        }
    }

    #[test]
    fn equal_blocks_at_different_numbers_differ_when_sealed() {
        let xts = Xts::new(&key());
        let mut sealed = vec![0x5au8; 2 * BLOCK_SIZE];
        xts.encrypt(0, &mut sealed);
        assert_ne!(sealed[..BLOCK_SIZE], sealed[BLOCK_SIZE..]);
    }

    #[test]
    fn a_block_of_zeros_on_the_medium_reads_as_zeros() {
        let xts = Xts::new(&key());
        let mut never_written = vec![0u8; BLOCK_SIZE];
        xts.decrypt(9, &mut never_written);
        assert_eq!(never_written, vec![0u8; BLOCK_SIZE]);
        // A written block of zeros is not zeros on the medium.
        let mut zeros = vec![0u8; BLOCK_SIZE];
        xts.encrypt(9, &mut zeros);
        assert!(zeros.iter().any(|&byte| byte != 0));
        xts.decrypt(9, &mut zeros);
        assert_eq!(zeros, vec![0u8; BLOCK_SIZE]);
    }
}
