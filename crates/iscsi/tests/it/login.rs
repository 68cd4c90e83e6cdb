//! The login state machine, request by request: CHAP logs in with the
//! right secret; what a login proved for one target or for discovery does
//! not carry over to another named later; continued text is bounded.

use std::collections::BTreeMap;

use iscsi::login::{chap_response, hex, status, unhex, Login, Outcome};
use iscsi::pdu::{Opcode, Pdu};
use iscsi::target::{Chap, Registry, Target};
use iscsi::text;

const INITIATOR: &str = "iqn.2026-11.org.test:initiator";
const A: &str = "iqn.2026-11.org.test:a";
const B: &str = "iqn.2026-11.org.test:b";

fn chap(user: &str, secret: &str) -> Chap {
    Chap { user: user.into(), secret: secret.into(), mutual: None }
}

fn registry() -> Registry {
    let registry = Registry::new(1);
    let target = |name: &str, chap: Chap| Target {
        name: name.into(),
        alias: String::new(),
        luns: BTreeMap::new(),
        chap: Some(chap),
        initiators: Vec::new(),
    };
    registry.set_targets(vec![target(A, chap("alice", "secret-of-a")), target(B, chap("bob", "secret-of-b"))]);
    registry.set_discovery_chap(Some(chap("disco", "secret-of-discovery")));
    registry
}

/// A Login request from stage `current` (to `next` if `transit`).
fn request(current: u8, next: Option<u8>, pairs: &[(&str, &str)]) -> Pdu {
    let mut pdu = Pdu::new(Opcode::LoginRequest);
    pdu.set_immediate(true);
    pdu.set_flags(current << 2 | next.map_or(0, |next| 0x80 | next));
    pdu.bhs[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0, 1]);
    let pairs: Vec<(String, String)> = pairs.iter().map(|(key, value)| (key.to_string(), value.to_string())).collect();
    pdu.data = text::encode(&pairs).into();
    pdu
}

fn status_of(response: &Pdu) -> u16 {
    u16::from_be_bytes([response.bhs[36], response.bhs[37]])
}

/// Runs the security stage with CHAP: returns the login, in the
/// operational stage, having proved `user`'s `secret`.
fn chap_login(registry: &Registry, declarations: &[(&str, &str)], user: &str, secret: &str) -> Login {
    let mut login = Login::new();
    let mut first = declarations.to_vec();
    first.push(("AuthMethod", "CHAP,None"));
    let (response, outcome) = login.step(&request(0, None, &first), registry);
    assert!(matches!(outcome, Outcome::Continue), "status {:#06x}", status_of(&response));
    let (response, outcome) = login.step(&request(0, None, &[("CHAP_A", "5")]), registry);
    assert!(matches!(outcome, Outcome::Continue), "status {:#06x}", status_of(&response));
    let answered = text::parse(&response.data).unwrap();
    let get = |name: &str| answered.iter().find(|(key, _)| key == name).map(|(_, value)| value.clone()).unwrap();
    let id: u8 = get("CHAP_I").parse().unwrap();
    let challenge = unhex(&get("CHAP_C")).unwrap();
    let answer = format!("0x{}", hex(&chap_response(id, secret.as_bytes(), &challenge)));
    let (response, outcome) = login.step(&request(0, Some(1), &[("CHAP_N", user), ("CHAP_R", &answer)]), registry);
    assert!(matches!(outcome, Outcome::Continue), "status {:#06x}", status_of(&response));
    assert_eq!(response.flags() & 0x83, 0x81, "moved to the operational stage");
    login
}

#[test]
fn chap_with_the_right_secret_logs_in() {
    let registry = registry();
    let mut login = chap_login(&registry, &[("InitiatorName", INITIATOR), ("TargetName", A)], "alice", "secret-of-a");
    let (response, outcome) = login.step(&request(1, Some(3), &[("MaxRecvDataSegmentLength", "65536")]), &registry);
    assert!(matches!(outcome, Outcome::Complete), "status {:#06x}", status_of(&response));
    assert_eq!(login.target.unwrap().name, A);
}

#[test]
fn a_target_named_after_chap_for_another_is_refused() {
    let registry = registry();
    let mut login = chap_login(&registry, &[("InitiatorName", INITIATOR), ("TargetName", A)], "alice", "secret-of-a");
    // Proved A's secret; now names B, whose secret it never proved.
    let (response, outcome) = login.step(&request(1, Some(3), &[("TargetName", B)]), &registry);
    assert!(matches!(outcome, Outcome::Fail), "logged in to B with A's secret");
    assert_eq!(status_of(&response), status::INITIATOR_ERROR);
}

#[test]
fn a_discovery_login_cannot_become_a_normal_one() {
    let registry = registry();
    let declarations = [("InitiatorName", INITIATOR), ("SessionType", "Discovery")];
    let mut login = chap_login(&registry, &declarations, "disco", "secret-of-discovery");
    let (_, outcome) = login.step(&request(1, Some(3), &[("SessionType", "Normal"), ("TargetName", B)]), &registry);
    assert!(matches!(outcome, Outcome::Fail), "a normal session to B with the discovery secret");
}

#[test]
fn repeating_the_same_declarations_is_fine() {
    let registry = registry();
    let declarations = [("InitiatorName", INITIATOR), ("TargetName", A)];
    let mut login = chap_login(&registry, &declarations, "alice", "secret-of-a");
    let (response, outcome) = login.step(&request(1, Some(3), &declarations), &registry);
    assert!(matches!(outcome, Outcome::Complete), "status {:#06x}", status_of(&response));
}

#[test]
fn continued_login_text_is_bounded() {
    let registry = registry();
    let mut login = Login::new();
    let mut chunk = Pdu::new(Opcode::LoginRequest);
    chunk.set_immediate(true);
    chunk.set_flags(0x40); // C: continued, security stage
    chunk.bhs[8..14].copy_from_slice(&[0x80, 0, 0, 0, 0, 1]);
    chunk.data = vec![b'a'; 8192].into();
    for sent in 1.. {
        let (response, outcome) = login.step(&chunk, &registry);
        match outcome {
            Outcome::Continue => assert!(sent * 8192 <= 1 << 20, "took {} KiB of continued text", sent * 8),
            Outcome::Fail => {
                assert_eq!(status_of(&response), status::INITIATOR_ERROR);
                break;
            }
            Outcome::Complete => panic!("completed on continued text"),
        }
    }
}

#[test]
fn a_redirected_target_sends_normal_logins_on_and_serves_discovery_itself() {
    use iscsi::target::Portal;
    use std::collections::HashMap;
    let registry = registry();
    registry.set_discovery_chap(None);
    let owner = Portal { address: "127.0.0.12:3260".into(), group: 2 };
    registry.set_redirects(HashMap::from([(A.to_string(), owner)]));
    // A normal login to A goes to its owner, before CHAP is negotiated.
    let mut login = Login::new();
    let first = request(0, Some(1), &[("InitiatorName", INITIATOR), ("TargetName", A), ("AuthMethod", "CHAP,None")]);
    let (response, outcome) = login.step(&first, &registry);
    assert!(matches!(outcome, Outcome::Fail), "a redirection closes the connection");
    assert_eq!(status_of(&response), status::TARGET_MOVED_TEMPORARILY);
    let answered = text::parse(&response.data).unwrap();
    // RFC 7143 §13.8: no portal group tag in a redirection.
    assert_eq!(answered, vec![("TargetAddress".to_string(), "127.0.0.12:3260".to_string())]);
    // B has no redirection: it is served here (its CHAP starts).
    let mut login = Login::new();
    let first = request(0, None, &[("InitiatorName", INITIATOR), ("TargetName", B), ("AuthMethod", "CHAP,None")]);
    let (response, outcome) = login.step(&first, &registry);
    assert!(matches!(outcome, Outcome::Continue), "status {:#06x}", status_of(&response));
    // Discovery is never redirected.
    let mut login = Login::new();
    let first =
        request(0, Some(3), &[("InitiatorName", INITIATOR), ("SessionType", "Discovery"), ("AuthMethod", "None")]);
    let (response, outcome) = login.step(&first, &registry);
    assert!(matches!(outcome, Outcome::Complete), "status {:#06x}", status_of(&response));
    // A registry that only redirects serves no session for a target it
    // has no redirection for.
    let vip = Registry::redirecting_only(0xffff);
    vip.set_targets(vec![Target {
        name: B.into(),
        alias: String::new(),
        luns: BTreeMap::new(),
        chap: None,
        initiators: Vec::new(),
    }]);
    let mut login = Login::new();
    let first = request(0, Some(1), &[("InitiatorName", INITIATOR), ("TargetName", B), ("AuthMethod", "None")]);
    let (response, outcome) = login.step(&first, &vip);
    assert!(matches!(outcome, Outcome::Fail));
    assert_eq!(status_of(&response), status::SERVICE_UNAVAILABLE);
    // An unknown target is not found, not redirected.
    let mut login = Login::new();
    let first = request(0, None, &[("InitiatorName", INITIATOR), ("TargetName", "iqn.2026-11.org.test:none")]);
    let (response, _) = login.step(&first, &registry);
    assert_eq!(status_of(&response), status::NOT_FOUND);
}
