//! The Login/Text key=value parser fed arbitrary bytes: it must never
//! panic, and a list it accepts must encode and parse back to itself.
#![no_main]

use iscsi::text;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(pairs) = text::parse(data) {
        assert_eq!(text::parse(&text::encode(&pairs)), Ok(pairs));
    }
});
