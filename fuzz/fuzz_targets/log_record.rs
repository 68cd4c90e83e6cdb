//! The entry store's record decoder on arbitrary bytes: it must never panic,
//! and a record it accepts must re-encode to the same bytes.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sharedlog::store::{decode_record, encode_record};
use sharedlog::types::Record;

fuzz_target!(|data: &[u8]| {
    if let Some((entry, length)) = decode_record(data) {
        let record = Record { streams: entry.streams.clone(), kind: entry.kind, payload: entry.payload.clone() };
        let mut encoded = BytesMut::new();
        encode_record(&mut encoded, entry.position, &record);
        assert_eq!(&encoded[..], &data[..length]);
    }
});
