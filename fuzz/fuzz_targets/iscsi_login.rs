//! The login state machine driven by Login requests built from arbitrary
//! bytes, as an initiator would send them one after another on a
//! connection. It must never panic, and:
//! - every response is a Login response that encodes and decodes back, with
//!   a data segment that parses as key=value text;
//! - a login that completes to a target with CHAP, or to discovery while
//!   discovery has CHAP, had that very secret proved, by the user it
//!   belongs to, in an answer to a challenge of this login;
//! - a completed login names a target that allows the initiator (normal
//!   sessions), and its negotiated lengths are within RFC 7143's ranges.
//!
//! The harness can answer a challenge correctly (it knows every secret),
//! so the fuzzer gets past CHAP and explores what comes after it.
#![no_main]

use std::collections::BTreeMap;

use bytes::BytesMut;
use iscsi::login::{chap_response, hex, unhex, Login, Outcome, SessionType};
use iscsi::pdu::{Digests, Opcode, Pdu};
use iscsi::target::{Chap, Registry, Target};
use iscsi::text;
use libfuzzer_sys::fuzz_target;

const OPEN: &str = "iqn.2026-11.org.fuzz:open";
const CHAP_A: &str = "iqn.2026-11.org.fuzz:chap-a";
const CHAP_B: &str = "iqn.2026-11.org.fuzz:chap-b";
const ONLY: &str = "iqn.2026-11.org.fuzz:only";
const ALLOWED: &str = "iqn.2026-11.org.fuzz:allowed";

/// (user, secret) pairs the harness can prove: targets A and B, and
/// discovery.
const SECRETS: [(&str, &str); 3] =
    [("alice", "secret-of-target-a"), ("bob", "secret-of-target-b"), ("disco", "secret-for-discovery")];

const KEYS: [&str; 28] = [
    "InitiatorName",
    "SessionType",
    "TargetName",
    "AuthMethod",
    "CHAP_A",
    "CHAP_N",
    "CHAP_R",
    "CHAP_I",
    "CHAP_C",
    "HeaderDigest",
    "DataDigest",
    "MaxRecvDataSegmentLength",
    "MaxBurstLength",
    "FirstBurstLength",
    "ImmediateData",
    "InitialR2T",
    "MaxOutstandingR2T",
    "ErrorRecoveryLevel",
    "MaxConnections",
    "DefaultTime2Wait",
    "DefaultTime2Retain",
    "IFMarker",
    "DataPDUInOrder",
    "DataSequenceInOrder",
    "InitiatorAlias",
    "IFMarkInt",
    "X-com.example.unknown",
    "TargetAlias",
];

const VALUES: [&str; 32] = [
    "iqn.2026-11.org.fuzz:initiator",
    ALLOWED,
    "Normal",
    "Discovery",
    OPEN,
    CHAP_A,
    CHAP_B,
    ONLY,
    "iqn.2026-11.org.fuzz:nowhere",
    "None",
    "CHAP",
    "CHAP,None",
    "5",
    "5,7",
    "7",
    "0",
    "1",
    "2",
    "511",
    "512",
    "262144",
    "16777215",
    "16777216",
    "4294967296",
    "-1",
    "Yes",
    "No",
    "CRC32C",
    "None,CRC32C",
    "alice",
    "0x00",
    "",
];

fn registry(discovery_chap: bool, mutual: bool) -> Registry {
    let registry = Registry::new(1);
    let target = |name: &str, chap: Option<usize>, initiators: Vec<String>| Target {
        name: name.to_string(),
        alias: String::new(),
        luns: BTreeMap::new(),
        chap: chap.map(|index| Chap {
            user: SECRETS[index].0.to_string(),
            secret: SECRETS[index].1.to_string(),
            mutual: mutual.then(|| ("target".to_string(), "mutual-secret".to_string())),
        }),
        initiators,
    };
    registry.set_targets(vec![
        target(OPEN, None, Vec::new()),
        target(CHAP_A, Some(0), Vec::new()),
        target(CHAP_B, Some(1), Vec::new()),
        target(ONLY, None, vec![ALLOWED.to_string()]),
    ]);
    if discovery_chap {
        registry.set_discovery_chap(Some(Chap {
            user: SECRETS[2].0.to_string(),
            secret: SECRETS[2].1.to_string(),
            mutual: None,
        }));
    }
    registry
}

/// Reads the input a byte at a time; zeros once it runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        let Some((&first, rest)) = self.0.split_first() else { return 0 };
        self.0 = rest;
        first
    }

    fn bytes(&mut self, count: usize) -> Vec<u8> {
        let count = count.min(self.0.len());
        let (taken, rest) = self.0.split_at(count);
        self.0 = rest;
        taken.to_vec()
    }

    fn pairs(&mut self, out: &mut Vec<(String, String)>) {
        for _ in 0..self.byte() % 8 {
            let key = KEYS[self.byte() as usize % KEYS.len()];
            let value = VALUES[self.byte() as usize % VALUES.len()];
            out.push((key.to_string(), value.to_string()));
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let config = input.byte();
    let registry = registry(config & 1 != 0, config & 2 != 0);
    let mut login = Login::new();
    // The challenge of this login's last response, and the secrets proved
    // against a challenge of this login (index into SECRETS).
    let mut challenge: Option<(u8, Vec<u8>)> = None;
    let mut proved: Vec<usize> = Vec::new();
    for step in 0..24 {
        if input.0.is_empty() {
            break;
        }
        let (flags, mode, misc) = (input.byte(), input.byte(), input.byte());
        let mut request = Pdu::new(Opcode::LoginRequest);
        request.set_immediate(true);
        request.set_flags(flags & 0xcf);
        request.bhs[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0, misc]);
        if step == 0 {
            request.bhs[3] = if misc & 0x40 != 0 { misc & 3 } else { 0 };
            request.bhs[14..16].copy_from_slice(&u16::from(misc & 0x20 != 0).to_be_bytes());
        }
        let mut pairs = Vec::new();
        match mode & 3 {
            0 | 3 => input.pairs(&mut pairs),
            1 => {
                let length = input.byte() as usize;
                request.data = input.bytes(length).into();
            }
            _ => {
                // An answer to the last challenge, right or wrong.
                let index = misc as usize % SECRETS.len();
                let (user, secret) = SECRETS[index];
                let (id, challenge) = challenge.clone().unwrap_or((0, Vec::new()));
                let right = mode & 4 == 0;
                let secret = if right { secret.to_string() } else { format!("{secret}!") };
                pairs.push(("CHAP_N".into(), if mode & 8 == 0 { user.into() } else { "mallory".into() }));
                pairs.push(("CHAP_R".into(), format!("0x{}", hex(&chap_response(id, secret.as_bytes(), &challenge)))));
                if right && mode & 8 == 0 && !challenge.is_empty() {
                    proved.push(index);
                }
                if mode & 16 != 0 {
                    // Asks for mutual CHAP too.
                    pairs.push(("CHAP_I".into(), "7".into()));
                    pairs.push(("CHAP_C".into(), "0x0102030405060708".into()));
                }
                input.pairs(&mut pairs);
            }
        }
        if mode & 3 != 1 {
            request.data = text::encode(&pairs).into();
        }

        let (response, outcome) = login.step(&request, &registry);

        // The response is a Login response that goes over the wire intact.
        assert_eq!(response.opcode(), Some(Opcode::LoginResponse));
        let mut wire = BytesMut::new();
        response.encode(Digests::default(), &mut wire);
        let (decoded, used) = Pdu::decode(&wire, Digests::default(), 1 << 24).expect("decodes").expect("whole");
        assert_eq!(used, wire.len());
        // Bytes 4-7 (the segment lengths) are filled in by the encoding.
        assert_eq!((&decoded.bhs[..4], &decoded.bhs[8..]), (&response.bhs[..4], &response.bhs[8..]));
        assert_eq!(decoded.data, response.data);
        let answered = text::parse(&response.data).expect("the response's text parses");
        let get = |name: &str| answered.iter().find(|(key, _)| key == name).map(|(_, value)| value.clone());
        if let (Some(id), Some(value)) = (get("CHAP_I"), get("CHAP_C")) {
            let id = text::number(&id).and_then(|id| u8::try_from(id).ok()).expect("CHAP_I is a byte");
            challenge = Some((id, unhex(&value).expect("CHAP_C is hex")));
        }

        match outcome {
            Outcome::Continue => {}
            Outcome::Fail => {
                assert_ne!(response.bhs[36], 0, "a failed login answers a failure status");
                return;
            }
            Outcome::Complete => {
                assert_eq!(response.bhs[36..38], [0, 0], "a completed login answers success");
                let params = &login.params;
                assert!((512..=16_777_215).contains(&params.initiator_max_recv), "{params:?}");
                assert!((512..=16_777_215).contains(&params.max_burst), "{params:?}");
                assert!(params.first_burst <= params.max_burst && params.first_burst >= 512, "{params:?}");
                let chap = match login.session_type.expect("a completed login has a session type") {
                    SessionType::Normal => {
                        let target = login.target.clone().expect("a normal session names a target");
                        assert!(target.allows(&login.initiator), "{} let in {}", target.name, login.initiator);
                        target.chap.clone()
                    }
                    SessionType::Discovery => registry.discovery_chap(),
                };
                if let Some(chap) = chap {
                    let index = SECRETS.iter().position(|(user, _)| *user == chap.user).expect("a known user");
                    assert!(
                        proved.contains(&index),
                        "logged in to {:?} ({:?}) having proved only {:?}",
                        login.target.as_ref().map(|target| &target.name),
                        login.session_type,
                        proved.iter().map(|index| SECRETS[*index].0).collect::<Vec<_>>()
                    );
                }
                return;
            }
        }
    }
});
