//! The `key=value` lists of Login and Text PDUs (RFC 7143 §6): UTF-8
//! `key=value` strings, each followed by one NUL. A list split across PDUs
//! (the C bit) is joined before it is parsed.

/// A key is 1-63 bytes (RFC 7143 §6.1).
pub const KEY_MAX: usize = 63;
/// The longest value accepted: 255 bytes for most keys, but the CHAP
/// challenge and response are binary values that may be longer encoded, and
/// SendTargets answers carry addresses (§6.1 allows 8192 for some values).
pub const VALUE_MAX: usize = 8192;
/// The most pairs one list may carry.
pub const PAIRS_MAX: usize = 256;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    #[error("a key=value pair is not UTF-8")]
    NotUtf8,
    #[error("{0:?} has no '='")]
    NoEquals(String),
    #[error("key {0:?} is empty, longer than 63 bytes or has characters keys may not use")]
    BadKey(String),
    #[error("the value of {0} is longer than {VALUE_MAX} bytes")]
    ValueTooLong(String),
    #[error("key {0} appears twice")]
    Duplicate(String),
    #[error("more than {PAIRS_MAX} pairs")]
    TooMany,
}

/// Key characters: letters, digits, `.`, `-`, `+`, `@`, `_` (RFC 7143
/// §6.1's key-name set), which also covers `X-` and `X#` extension keys'
/// letters; `#` is allowed only as `X#`'s second byte.
fn valid_key(key: &str) -> bool {
    let allowed = |byte: u8| byte.is_ascii_alphanumeric() || b".-+@_".contains(&byte);
    !key.is_empty()
        && key.len() <= KEY_MAX
        && key
            .bytes()
            .enumerate()
            .all(|(index, byte)| allowed(byte) || (index == 1 && byte == b'#' && key.starts_with('X')))
}

/// Parses a list. A final pair without its NUL is accepted (some
/// initiators omit it); an empty list is empty.
pub fn parse(data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    let data = data.strip_suffix(&[0]).unwrap_or(data);
    if data.is_empty() {
        return Ok(pairs);
    }
    for raw in data.split(|byte| *byte == 0) {
        if pairs.len() == PAIRS_MAX {
            return Err(TextError::TooMany);
        }
        let pair = std::str::from_utf8(raw).map_err(|_| TextError::NotUtf8)?;
        let (key, value) = pair.split_once('=').ok_or_else(|| TextError::NoEquals(shorten(pair)))?;
        if !valid_key(key) {
            return Err(TextError::BadKey(shorten(key)));
        }
        if value.len() > VALUE_MAX {
            return Err(TextError::ValueTooLong(key.to_string()));
        }
        if pairs.iter().any(|(seen, _)| seen == key) {
            return Err(TextError::Duplicate(key.to_string()));
        }
        pairs.push((key.to_string(), value.to_string()));
    }
    Ok(pairs)
}

/// Encodes a list: every pair followed by a NUL.
pub fn encode<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in pairs {
        out.extend_from_slice(key.as_ref().as_bytes());
        out.push(b'=');
        out.extend_from_slice(value.as_ref().as_bytes());
        out.push(0);
    }
    out
}

/// A numerical value (RFC 7143 §6.1: decimal, or hexadecimal with `0x`).
pub fn number(value: &str) -> Option<u64> {
    match value.strip_prefix("0x").or_else(|| value.strip_prefix("0X")) {
        Some(hex) if !hex.is_empty() && hex.len() <= 16 => u64::from_str_radix(hex, 16).ok(),
        Some(_) => None,
        None if !value.is_empty() && value.len() <= 20 && value.bytes().all(|b| b.is_ascii_digit()) => {
            value.parse().ok()
        }
        None => None,
    }
}

/// Error messages quote at most this much of what they refuse.
fn shorten(text: &str) -> String {
    text.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_list_parses_and_encodes_back() {
        let wire = b"InitiatorName=iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test\0SessionType=Normal\0HeaderDigest=None,CRC32C\0X#Vendor=1\0";
        let pairs = parse(wire).unwrap();
        assert_eq!(pairs.len(), 4);
        assert_eq!(pairs[2], ("HeaderDigest".to_string(), "None,CRC32C".to_string()));
        assert_eq!(encode(&pairs), wire.to_vec());
    }

    #[test]
    fn bad_lists_are_refused_with_a_reason() {
        assert_eq!(parse(b""), Ok(vec![]));
        assert_eq!(parse(b"NoEquals\0"), Err(TextError::NoEquals("NoEquals".into())));
        assert_eq!(parse(b"=value\0"), Err(TextError::BadKey("".into())));
        assert_eq!(parse(b"Bad Key=1\0"), Err(TextError::BadKey("Bad Key".into())));
        assert_eq!(parse(b"A=1\0A=2\0"), Err(TextError::Duplicate("A".into())));
        assert_eq!(parse(b"A=\xff\0"), Err(TextError::NotUtf8));
        assert!(matches!(
            parse(&[b'K'; 64].iter().chain(b"=1").copied().collect::<Vec<_>>()),
            Err(TextError::BadKey(_))
        ));
        let long = [b"K=".as_slice(), &[b'v'; VALUE_MAX + 1]].concat();
        assert_eq!(parse(&long), Err(TextError::ValueTooLong("K".into())));
        // Empty pairs between NULs are not pairs.
        assert!(parse(b"A=1\0\0B=2\0").is_err());
    }

    #[test]
    fn numbers_are_decimal_or_hexadecimal() {
        assert_eq!(number("262144"), Some(262144));
        assert_eq!(number("0x40000"), Some(0x40000));
        assert_eq!(number(""), None);
        assert_eq!(number("0x"), None);
        assert_eq!(number("-1"), None);
        assert_eq!(number("99999999999999999999999"), None);
    }
}
