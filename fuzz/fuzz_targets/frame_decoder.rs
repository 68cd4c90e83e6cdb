//! The wire frame decoder fed arbitrary bytes in arbitrary pieces: it must
//! never panic, and every frame it accepts must re-encode to the same bytes.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use wire::frame::Decoder;

fuzz_target!(|data: &[u8]| {
    // The first byte picks how the input is split into reads.
    let Some((&split, input)) = data.split_first() else { return };
    let piece = (split as usize % 64) + 1;
    let decoder = Decoder::with_limit(64 * 1024);
    let mut buffer = BytesMut::new();
    let mut consumed = 0usize;
    for chunk in input.chunks(piece) {
        buffer.extend_from_slice(chunk);
        loop {
            let before = buffer.len();
            match decoder.decode(&mut buffer) {
                Ok(Some(frame)) => {
                    let start = consumed;
                    consumed += before - buffer.len();
                    let encoded = frame.to_bytes();
                    assert_eq!(&encoded[..], &input[start..consumed], "re-encoding differs");
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = decoder.finish(&buffer);
});
