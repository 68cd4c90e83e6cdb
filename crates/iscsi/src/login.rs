//! The login phase (RFC 7143 §6): security negotiation (None, CHAP with
//! optional mutual CHAP) and operational negotiation, one Login request at
//! a time, as a state machine with no I/O.

use std::sync::Arc;

use md5::{Digest, Md5};
use rand::RngCore;

use crate::pdu::{Opcode, Pdu};
use crate::target::{Chap, Registry, Target};
use crate::text;

/// What this target accepts in one data segment.
pub const TARGET_MAX_RECV: u32 = 262_144;
pub const MAX_BURST: u32 = 16 * 1024 * 1024;
pub const FIRST_BURST: u32 = 262_144;
/// The most text one login request may continue over several PDUs (the C
/// bit): an initiator that never stops continuing is refused, not buffered.
pub const LOGIN_TEXT_MAX: usize = 64 * 1024;

/// Login status classes and details (RFC 7143 §11.13.5).
pub mod status {
    /// Redirection: the target is, for now, at the `TargetAddress` given.
    pub const TARGET_MOVED_TEMPORARILY: u16 = 0x0101;
    pub const SERVICE_UNAVAILABLE: u16 = 0x0301;
    pub const AUTHENTICATION_FAILED: u16 = 0x0201;
    pub const FORBIDDEN: u16 = 0x0202;
    pub const NOT_FOUND: u16 = 0x0203;
    pub const UNSUPPORTED_VERSION: u16 = 0x0205;
    pub const MISSING_PARAMETER: u16 = 0x0207;
    pub const SESSION_DOES_NOT_EXIST: u16 = 0x020a;
    pub const INVALID_DURING_LOGIN: u16 = 0x020b;
    pub const INITIATOR_ERROR: u16 = 0x0200;
    pub const TARGET_ERROR: u16 = 0x0300;
}

const SECURITY: u8 = 0;
const OPERATIONAL: u8 = 1;
const FULL_FEATURE: u8 = 3;

/// Session parameters after negotiation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Params {
    pub header_digest: bool,
    pub data_digest: bool,
    /// The most data this target may send in one PDU.
    pub initiator_max_recv: u32,
    pub target_max_recv: u32,
    pub max_burst: u32,
    pub first_burst: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    pub max_outstanding_r2t: u32,
}

impl Default for Params {
    fn default() -> Params {
        Params {
            header_digest: false,
            data_digest: false,
            initiator_max_recv: 8192,
            target_max_recv: TARGET_MAX_RECV,
            max_burst: 262_144,
            first_burst: 65_536,
            immediate_data: true,
            initial_r2t: true,
            max_outstanding_r2t: 1,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionType {
    Discovery,
    Normal,
}

#[derive(Debug, PartialEq, Eq)]
enum Auth {
    /// AuthMethod not yet agreed.
    Start,
    /// None agreed, or CHAP done.
    Done,
    /// CHAP chosen; waiting for CHAP_A.
    ChapAlgorithm,
    /// Challenge sent.
    ChapResponse { id: u8, challenge: Vec<u8> },
}

/// What the connection does after one step.
#[derive(Debug)]
pub enum Outcome {
    /// Send the response; more Login requests follow.
    Continue,
    /// Send the response; the connection is in full feature phase.
    Complete,
    /// Send the response (a failure or redirection status) and close.
    Fail,
}

/// The login state of one connection.
pub struct Login {
    stage: u8,
    auth: Auth,
    pub initiator: String,
    pub isid: [u8; 6],
    pub session_type: Option<SessionType>,
    pub target: Option<Arc<Target>>,
    pub params: Params,
    /// Operational keys the target has declared (sent once).
    declared: bool,
    /// The initiator answered the target's CHAP challenge.
    chap_verified: bool,
    /// Text of a request split over several PDUs (C bit).
    partial: Vec<u8>,
    first: bool,
    pub cmd_sn: u32,
}

impl Default for Login {
    fn default() -> Login {
        Login::new()
    }
}

impl Login {
    pub fn new() -> Login {
        Login {
            stage: SECURITY,
            auth: Auth::Start,
            initiator: String::new(),
            isid: [0; 6],
            session_type: None,
            target: None,
            params: Params::default(),
            declared: false,
            chap_verified: false,
            partial: Vec::new(),
            first: true,
            cmd_sn: 0,
        }
    }

    /// The initiator port name: `<iqn>,i,0x<isid>`.
    pub fn nexus(&self) -> String {
        let isid: String = self.isid.iter().map(|byte| format!("{byte:02x}")).collect();
        format!("{},i,0x{isid}", self.initiator)
    }

    /// Handles one Login request. Returns the response: sequence numbers,
    /// and the TSIH of a completing login, are the connection's to set.
    pub fn step(&mut self, request: &Pdu, registry: &Registry) -> (Pdu, Outcome) {
        let flags = request.flags();
        let (transit, more, current, next) = (flags & 0x80 != 0, flags & 0x40 != 0, (flags >> 2) & 3, flags & 3);
        let mut response = Pdu::new(Opcode::LoginResponse);
        response.bhs[8..14].copy_from_slice(&request.bhs[8..14]);
        response.set_initiator_task_tag(request.initiator_task_tag());
        let fail = |mut response: Pdu, code: u16| {
            response.bhs[36..38].copy_from_slice(&code.to_be_bytes());
            response.set_flags(current << 2);
            (response, Outcome::Fail)
        };
        if self.first {
            self.first = false;
            self.isid.copy_from_slice(&request.bhs[8..14]);
            self.cmd_sn = request.cmd_sn();
            if request.bhs[3] > 0 {
                // VersionMin above the one version there is.
                return fail(response, status::UNSUPPORTED_VERSION);
            }
            if u16::from_be_bytes([request.bhs[14], request.bhs[15]]) != 0 {
                // Adding a connection to a session (MaxConnections is 1).
                return fail(response, status::SESSION_DOES_NOT_EXIST);
            }
        }
        if current == 2
            || current == FULL_FEATURE
            || current != self.stage && !(self.stage == SECURITY && current == OPERATIONAL)
        {
            return fail(response, status::INVALID_DURING_LOGIN);
        }
        if current == OPERATIONAL && self.stage == SECURITY {
            // The security stage was skipped.
            if self.auth == Auth::Start {
                self.auth = Auth::Done;
                if self.chap(registry).is_some() {
                    return fail(response, status::AUTHENTICATION_FAILED);
                }
            }
            self.stage = OPERATIONAL;
        }
        if self.partial.len() + request.data.len() > LOGIN_TEXT_MAX {
            return fail(response, status::INITIATOR_ERROR);
        }
        self.partial.extend_from_slice(&request.data);
        if more {
            // Continued: answer empty, wait for the rest.
            if transit {
                return fail(response, status::INVALID_DURING_LOGIN);
            }
            response.set_flags(current << 2);
            return (response, Outcome::Continue);
        }
        let data = std::mem::take(&mut self.partial);
        let pairs = match text::parse(&data) {
            Ok(pairs) => pairs,
            Err(_) => return fail(response, status::INITIATOR_ERROR),
        };
        let mut answers: Vec<(String, String)> = Vec::new();
        if let Err(code) = self.declarations(&pairs, registry, &mut answers) {
            return fail(response, code);
        }
        // A discovery VIP sends a normal login on to the target's owner
        // before anything is negotiated (the initiator authenticates there).
        if self.session_type == Some(SessionType::Normal) {
            if let Some(address) = self.target.as_ref().and_then(|target| registry.redirect(&target.name)) {
                response.data = text::encode(&[("TargetAddress".to_string(), address)]).into();
                return fail(response, status::TARGET_MOVED_TEMPORARILY);
            }
            if registry.is_redirect_only() {
                // Nowhere to send it yet (no live host for the target).
                return fail(response, status::SERVICE_UNAVAILABLE);
            }
        }
        // A target with CHAP takes no operational stage before CHAP is
        // done (the target may be named only in this very request, with
        // the security stage skipped).
        if current == OPERATIONAL && !self.chap_verified && self.chap(registry).is_some() {
            return fail(response, status::AUTHENTICATION_FAILED);
        }
        if current == SECURITY {
            if let Err(code) = self.security(&pairs, registry, &mut answers) {
                return fail(response, code);
            }
        }
        if let Err(code) = self.operational(&pairs, &mut answers) {
            return fail(response, code);
        }
        let mut agreed = transit;
        if transit && (next == 2 || next <= current || (current == SECURITY && self.auth != Auth::Done)) {
            agreed = false;
        }
        if agreed && next == FULL_FEATURE && self.session_type == Some(SessionType::Normal) && !self.declared {
            // Declare ours before the full feature phase.
            self.declare(&mut answers);
        }
        let mut outcome = Outcome::Continue;
        let mut byte = current << 2;
        if agreed {
            byte |= 0x80 | next;
            self.stage = next;
            if next == FULL_FEATURE {
                outcome = Outcome::Complete;
            }
        }
        response.set_flags(byte);
        response.data = text::encode(&answers).into();
        (response, outcome)
    }

    fn chap(&self, registry: &Registry) -> Option<Chap> {
        match self.session_type {
            Some(SessionType::Normal) => self.target.as_ref().and_then(|target| target.chap.clone()),
            Some(SessionType::Discovery) => registry.discovery_chap(),
            None => None,
        }
    }

    /// InitiatorName, SessionType, TargetName: required in the first request.
    /// Later requests may repeat them but not change them: what a login
    /// proved (CHAP for one target, or for discovery) must not carry over to
    /// another target or session type named afterwards.
    fn declarations(
        &mut self,
        pairs: &[(String, String)],
        registry: &Registry,
        answers: &mut Vec<(String, String)>,
    ) -> Result<(), u16> {
        for (key, value) in pairs {
            match key.as_str() {
                "InitiatorName" => {
                    if !self.initiator.is_empty() && self.initiator != *value {
                        return Err(status::INITIATOR_ERROR);
                    }
                    self.initiator = value.clone();
                }
                "SessionType" => {
                    let session_type = match value.as_str() {
                        "Discovery" => SessionType::Discovery,
                        "Normal" => SessionType::Normal,
                        _ => return Err(status::INITIATOR_ERROR),
                    };
                    if self.session_type.is_some_and(|declared| declared != session_type) {
                        return Err(status::INITIATOR_ERROR);
                    }
                    self.session_type = Some(session_type);
                }
                "TargetName" => {
                    if let Some(declared) = &self.target {
                        if declared.name != *value {
                            return Err(status::INITIATOR_ERROR);
                        }
                    }
                    let target = registry.target(value).ok_or(status::NOT_FOUND)?;
                    self.target = Some(target);
                }
                _ => {}
            }
        }
        if self.initiator.is_empty() {
            return Err(status::MISSING_PARAMETER);
        }
        let session_type = *self.session_type.get_or_insert(SessionType::Normal);
        if session_type == SessionType::Normal {
            let Some(target) = &self.target else { return Err(status::MISSING_PARAMETER) };
            if !target.allows(&self.initiator) {
                return Err(status::FORBIDDEN);
            }
            if !answers.iter().any(|(key, _)| key == "TargetPortalGroupTag")
                && pairs.iter().any(|(k, _)| k == "TargetName")
            {
                answers.push(("TargetAlias".into(), target.alias.clone()));
                answers.push(("TargetPortalGroupTag".into(), registry.portal_group().to_string()));
            }
        }
        Ok(())
    }

    fn security(
        &mut self,
        pairs: &[(String, String)],
        registry: &Registry,
        answers: &mut Vec<(String, String)>,
    ) -> Result<(), u16> {
        let chap = self.chap(registry);
        let get = |name: &str| pairs.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str());
        if let Some(offer) = get("AuthMethod") {
            let offered: Vec<&str> = offer.split(',').collect();
            let choice = if chap.is_some() {
                if !offered.contains(&"CHAP") {
                    return Err(status::AUTHENTICATION_FAILED);
                }
                self.auth = Auth::ChapAlgorithm;
                "CHAP"
            } else if offered.contains(&"None") {
                self.auth = Auth::Done;
                "None"
            } else {
                return Err(status::AUTHENTICATION_FAILED);
            };
            answers.push(("AuthMethod".into(), choice.into()));
            return Ok(());
        }
        let Some(chap) = chap else {
            if self.auth == Auth::Start {
                // No AuthMethod offered and none needed.
                self.auth = Auth::Done;
            }
            return Ok(());
        };
        match std::mem::replace(&mut self.auth, Auth::Done) {
            Auth::Start => Err(status::AUTHENTICATION_FAILED),
            Auth::Done => Ok(()),
            Auth::ChapAlgorithm => {
                let algorithms = get("CHAP_A").ok_or(status::AUTHENTICATION_FAILED)?;
                if !algorithms.split(',').any(|algorithm| algorithm == "5") {
                    return Err(status::AUTHENTICATION_FAILED);
                }
                let mut challenge = vec![0u8; 16];
                rand::thread_rng().fill_bytes(&mut challenge);
                let id = rand::random::<u8>();
                answers.push(("CHAP_A".into(), "5".into()));
                answers.push(("CHAP_I".into(), id.to_string()));
                answers.push(("CHAP_C".into(), format!("0x{}", hex(&challenge))));
                self.auth = Auth::ChapResponse { id, challenge };
                Ok(())
            }
            Auth::ChapResponse { id, challenge } => {
                let name = get("CHAP_N").ok_or(status::AUTHENTICATION_FAILED)?;
                let response = get("CHAP_R").and_then(unhex).ok_or(status::AUTHENTICATION_FAILED)?;
                if name != chap.user || response != chap_response(id, chap.secret.as_bytes(), &challenge) {
                    return Err(status::AUTHENTICATION_FAILED);
                }
                self.chap_verified = true;
                if let (Some(their_id), Some(their_challenge)) = (get("CHAP_I"), get("CHAP_C")) {
                    let Some((user, secret)) = &chap.mutual else { return Err(status::AUTHENTICATION_FAILED) };
                    let their_id: u8 = text::number(their_id)
                        .and_then(|id| u8::try_from(id).ok())
                        .ok_or(status::AUTHENTICATION_FAILED)?;
                    let their_challenge = unhex(their_challenge).ok_or(status::AUTHENTICATION_FAILED)?;
                    if their_challenge == challenge || their_challenge.is_empty() {
                        // A reflected challenge.
                        return Err(status::AUTHENTICATION_FAILED);
                    }
                    answers.push(("CHAP_N".into(), user.clone()));
                    let answer = chap_response(their_id, secret.as_bytes(), &their_challenge);
                    answers.push(("CHAP_R".into(), format!("0x{}", hex(&answer))));
                } else if chap.mutual.is_some() {
                    // The target is configured for mutual CHAP; the
                    // initiator did not ask for it, which is its choice.
                }
                self.auth = Auth::Done;
                Ok(())
            }
        }
    }

    fn operational(&mut self, pairs: &[(String, String)], answers: &mut Vec<(String, String)>) -> Result<(), u16> {
        let discovery = self.session_type == Some(SessionType::Discovery);
        for (key, value) in pairs {
            let number = || text::number(value);
            let answer: Option<String> = match key.as_str() {
                "InitiatorName" | "SessionType" | "TargetName" | "InitiatorAlias" | "AuthMethod" => None,
                key if key.starts_with("CHAP_") => None,
                "HeaderDigest" | "DataDigest" => {
                    let choice = value.split(',').find(|option| *option == "CRC32C" || *option == "None");
                    match choice {
                        Some(choice) => {
                            let on = choice == "CRC32C";
                            if key == "HeaderDigest" {
                                self.params.header_digest = on;
                            } else {
                                self.params.data_digest = on;
                            }
                            Some(choice.to_string())
                        }
                        None => Some("Reject".into()),
                    }
                }
                "MaxRecvDataSegmentLength" => {
                    match number().filter(|n| (512..=16_777_215).contains(n)) {
                        Some(n) => self.params.initiator_max_recv = n as u32,
                        None => return Err(status::INITIATOR_ERROR),
                    }
                    if !self.declared {
                        self.declare(answers);
                    }
                    None
                }
                _ if discovery && is_session_key(key) => Some("Irrelevant".into()),
                "MaxConnections" => Some(if number().is_some() { "1".into() } else { "Reject".into() }),
                "InitialR2T" => yes_no(value).map(|yes| {
                    // OR: the target would do without.
                    self.params.initial_r2t = yes;
                    if yes { "Yes" } else { "No" }.to_string()
                }),
                "ImmediateData" => yes_no(value).map(|yes| {
                    self.params.immediate_data = yes;
                    if yes { "Yes" } else { "No" }.to_string()
                }),
                "MaxBurstLength" => number().filter(|n| (512..=16_777_215).contains(n)).map(|n| {
                    self.params.max_burst = (n as u32).min(MAX_BURST);
                    self.params.first_burst = self.params.first_burst.min(self.params.max_burst);
                    self.params.max_burst.to_string()
                }),
                "FirstBurstLength" => number().filter(|n| (512..=16_777_215).contains(n)).map(|n| {
                    self.params.first_burst = (n as u32).min(FIRST_BURST).min(self.params.max_burst);
                    self.params.first_burst.to_string()
                }),
                "DefaultTime2Wait" => number().filter(|n| *n <= 3600).map(|n| n.to_string()),
                "DefaultTime2Retain" => number().filter(|n| *n <= 3600).map(|_| "0".into()),
                "MaxOutstandingR2T" => number().filter(|n| (1..=65535).contains(n)).map(|_| {
                    self.params.max_outstanding_r2t = 1;
                    "1".into()
                }),
                "DataPDUInOrder" | "DataSequenceInOrder" => yes_no(value).map(|_| "Yes".into()),
                "ErrorRecoveryLevel" => number().filter(|n| *n <= 2).map(|_| "0".into()),
                "IFMarker" | "OFMarker" => yes_no(value).map(|_| "No".into()),
                "IFMarkInt" | "OFMarkInt" => Some("Irrelevant".into()),
                _ => Some("NotUnderstood".into()),
            };
            let answer = answer.or_else(|| {
                let silent = matches!(
                    key.as_str(),
                    "InitiatorName"
                        | "SessionType"
                        | "TargetName"
                        | "InitiatorAlias"
                        | "AuthMethod"
                        | "MaxRecvDataSegmentLength"
                ) || key.starts_with("CHAP_");
                (!silent).then(|| "Reject".to_string())
            });
            // Once per key: a target-only key the initiator sent too
            // (TargetAlias, say) is not answered over the target's own.
            if let Some(answer) = answer.filter(|_| !answers.iter().any(|(answered, _)| answered == key)) {
                answers.push((key.clone(), answer));
            }
        }
        if self.params.first_burst > self.params.max_burst {
            self.params.first_burst = self.params.max_burst;
        }
        Ok(())
    }

    fn declare(&mut self, answers: &mut Vec<(String, String)>) {
        self.declared = true;
        answers.push(("MaxRecvDataSegmentLength".into(), self.params.target_max_recv.to_string()));
    }
}

/// Keys that only mean something in a normal session.
fn is_session_key(key: &str) -> bool {
    matches!(
        key,
        "MaxConnections"
            | "InitialR2T"
            | "ImmediateData"
            | "MaxBurstLength"
            | "FirstBurstLength"
            | "MaxOutstandingR2T"
            | "DataPDUInOrder"
            | "DataSequenceInOrder"
    )
}

fn yes_no(value: &str) -> Option<bool> {
    match value {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

/// CHAP with MD5 (RFC 1994): MD5(id || secret || challenge).
pub fn chap_response(id: u8, secret: &[u8], challenge: &[u8]) -> Vec<u8> {
    let mut hasher = Md5::new();
    hasher.update([id]);
    hasher.update(secret);
    hasher.update(challenge);
    hasher.finalize().to_vec()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// A binary value: `0x` hex (RFC 7143 §6.1).
pub fn unhex(value: &str) -> Option<Vec<u8>> {
    let digits = value.strip_prefix("0x").or_else(|| value.strip_prefix("0X"))?;
    if digits.len() % 2 != 0 {
        return None;
    }
    (0..digits.len()).step_by(2).map(|at| u8::from_str_radix(digits.get(at..at + 2)?, 16).ok()).collect()
}
