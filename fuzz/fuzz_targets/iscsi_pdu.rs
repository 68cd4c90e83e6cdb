//! The iSCSI PDU decoder fed arbitrary bytes with every digest setting: it
//! must never panic, and every PDU it accepts must re-encode to exactly the
//! bytes it took (padding aside, which the encoder writes as zeros).
#![no_main]

use bytes::BytesMut;
use iscsi::pdu::{Digests, Pdu};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the digests.
    let Some((&setting, mut input)) = data.split_first() else { return };
    let digests = Digests { header: setting & 1 != 0, data: setting & 2 != 0 };
    while let Ok(Some((pdu, used))) = Pdu::decode(input, digests, 64 * 1024) {
        assert!(used > 0 && used <= input.len());
        let mut encoded = BytesMut::new();
        pdu.encode(digests, &mut encoded);
        assert_eq!(encoded.len(), used, "re-encoding has another length");
        if !digests.data {
            // Without a data digest the padding is not checked: compare all
            // but the padding bytes.
            let data_end = encoded.len() - (pdu.data.len().div_ceil(4) * 4 - pdu.data.len());
            assert_eq!(&encoded[..data_end], &input[..data_end], "re-encoding differs");
        }
        input = &input[used..];
    }
});
