//! Property tests for what the target parses from the network: nothing an
//! initiator sends makes the parsers panic, and what the target encodes
//! decodes back to the same thing. `sanitize`: SANITIZE through a logical
//! unit. `login`: the login state machine, request by request. `held`:
//! commands held while the storage cannot serve them yet.

mod geometry;
mod held;
mod login;
mod sanitize;
mod shared_reservations;

/// Runs one command on `unit` from `nexus` through relative target port
/// `relative_port`, as a connection would.
async fn execute(
    unit: &iscsi::scsi::LogicalUnit,
    nexus: &str,
    relative_port: u16,
    cdb: &[u8],
    data: &[u8],
) -> iscsi::scsi::Reply {
    let port = iscsi::scsi::Port { target: "iqn.2026-11.test:target".into(), relative_port, group: relative_port };
    let nexus = iscsi::pr::Nexus::new(nexus, relative_port);
    let command = iscsi::scsi::Command {
        cdb,
        data: Bytes::copy_from_slice(data),
        nexus: &nexus,
        port: &port,
        luns: &[0],
        expected_length: data.len().max(4096) as u32,
    };
    unit.execute(command).await
}

use bytes::{Bytes, BytesMut};
use iscsi::pdu::{Digests, Pdu, PduError, BHS_LEN};
use iscsi::text;
use proptest::prelude::*;

fn digests() -> impl Strategy<Value = Digests> {
    (any::<bool>(), any::<bool>()).prop_map(|(header, data)| Digests { header, data })
}

fn pdu() -> impl Strategy<Value = Pdu> {
    (proptest::collection::vec(any::<u8>(), BHS_LEN), 0usize..4, proptest::collection::vec(any::<u8>(), 0..600))
        .prop_map(|(bhs, ahs_words, data)| {
            let mut pdu = Pdu {
                bhs: bhs.try_into().unwrap(),
                ahs: Bytes::from(vec![0xa5; ahs_words * 4]),
                data: Bytes::from(data),
            };
            // The lengths are the encoder's to set.
            pdu.bhs[4] = ahs_words as u8;
            pdu.bhs[5..8].copy_from_slice(&(pdu.data.len() as u32).to_be_bytes()[1..]);
            pdu
        })
}

proptest! {
    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048), digests in digests()) {
        if let Ok(Some((pdu, used))) = Pdu::decode(&bytes, digests, 1024) {
            prop_assert!(used <= bytes.len());
            prop_assert!(pdu.data.len() <= 1024);
        }
    }

    #[test]
    fn every_pdu_decodes_back_from_its_encoding_after_any_split(pdu in pdu(), digests in digests(), cut in any::<prop::sample::Index>()) {
        let mut wire = BytesMut::new();
        pdu.encode(digests, &mut wire);
        let cut = cut.index(wire.len());
        prop_assert_eq!(Pdu::decode(&wire[..cut], digests, 1 << 16), Ok(None));
        // Followed by the start of another PDU: only its own bytes are taken.
        let mut stream = wire.to_vec();
        stream.extend_from_slice(&wire[..cut]);
        prop_assert_eq!(Pdu::decode(&stream, digests, 1 << 16), Ok(Some((pdu, wire.len()))));
    }

    #[test]
    fn a_corrupted_byte_is_caught_by_the_digests(pdu in pdu(), at in any::<prop::sample::Index>(), flip in 1u8..=255) {
        let digests = Digests { header: true, data: true };
        let mut wire = BytesMut::new();
        pdu.encode(digests, &mut wire);
        let at = at.index(wire.len());
        wire[at] ^= flip;
        match Pdu::decode(&wire, digests, 1 << 16) {
            // A flipped length byte may make it wait for more, or exceed the limit.
            Ok(None) | Err(PduError::DataTooLong { .. }) | Err(PduError::HeaderDigest { .. }) | Err(PduError::DataDigest { .. }) => {}
            // Padding is not covered by the header digest but is by the data digest.
            Ok(Some((decoded, _))) => prop_assert!(false, "a corrupted PDU decoded: {:?}", decoded),
        }
    }

    #[test]
    fn parsing_arbitrary_text_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = text::parse(&bytes);
    }

    #[test]
    fn valid_lists_round_trip(pairs in proptest::collection::btree_map("[A-Za-z][A-Za-z0-9.+@_-]{0,62}", "[ -~]{0,300}", 0..20)) {
        let pairs: Vec<(String, String)> = pairs.into_iter().collect();
        prop_assert_eq!(text::parse(&text::encode(&pairs)), Ok(pairs));
    }
}
