//! Reservations of one logical unit: RESERVE/RELEASE(6) and persistent
//! reservations (SPC-4 §5.13), as plain state so every rule is testable
//! without a connection.
//!
//! An I_T nexus is an initiator port (`<iqn>,i,0x<isid>`) and a relative
//! target port: each target host is one port, so the paths of one
//! initiator port through two hosts are two nexuses ([`Nexus`]).

use std::sync::Arc;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::sense::Sense;

/// Persistent reservation types.
pub mod kind {
    pub const WRITE_EXCLUSIVE: u8 = 1;
    pub const EXCLUSIVE_ACCESS: u8 = 3;
    pub const WRITE_EXCLUSIVE_REGISTRANTS_ONLY: u8 = 5;
    pub const EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: u8 = 6;
    pub const WRITE_EXCLUSIVE_ALL_REGISTRANTS: u8 = 7;
    pub const EXCLUSIVE_ACCESS_ALL_REGISTRANTS: u8 = 8;

    pub fn valid(kind: u8) -> bool {
        matches!(kind, 1 | 3 | 5 | 6 | 7 | 8)
    }

    /// Every registrant holds the reservation.
    pub fn all_registrants(kind: u8) -> bool {
        kind == WRITE_EXCLUSIVE_ALL_REGISTRANTS || kind == EXCLUSIVE_ACCESS_ALL_REGISTRANTS
    }

    /// Registrants (not only the holder) may access the medium.
    pub fn registrants_access(kind: u8) -> bool {
        matches!(kind, 5..=8)
    }

    pub fn exclusive_access(kind: u8) -> bool {
        matches!(kind, EXCLUSIVE_ACCESS | EXCLUSIVE_ACCESS_REGISTRANTS_ONLY | EXCLUSIVE_ACCESS_ALL_REGISTRANTS)
    }
}

/// What a command does to the medium, for reservation checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Allowed whatever the reservation (INQUIRY, REPORT LUNS, PR IN, ...).
    Always,
    Read,
    Write,
    /// Conflicts with an exclusive reservation held by another nexus
    /// (MODE SELECT, ...), like a write.
    Other,
}

/// An I_T nexus: an initiator port (`<iqn>,i,0x<isid>`) and the relative
/// target port it reaches the unit through (each target host is its own
/// port). Two paths of one initiator port through two hosts are two
/// nexuses, each registered on its own unless registered with ALL_TG_PT.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Nexus {
    pub initiator: String,
    pub port: u16,
}

impl Nexus {
    pub fn new(initiator: impl Into<String>, port: u16) -> Nexus {
        Nexus { initiator: initiator.into(), port }
    }
}

impl std::fmt::Display for Nexus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} through port {}", self.initiator, self.port)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub key: u64,
    pub initiator: String,
    /// The relative target port it was made through (every port when
    /// `all_target_ports`).
    pub port: u16,
    pub all_target_ports: bool,
}

impl Registration {
    /// Whether this registration is `nexus`'s.
    pub fn covers(&self, nexus: &Nexus) -> bool {
        self.initiator == nexus.initiator && (self.all_target_ports || self.port == nexus.port)
    }

    /// Who a unit attention meant for this registrant goes to.
    pub fn recipient(&self) -> Recipient {
        if self.all_target_ports {
            Recipient::Initiator(self.initiator.clone())
        } else {
            Recipient::Nexus(Nexus::new(self.initiator.clone(), self.port))
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// The nexus that reserved (or took it by PREEMPT or REGISTER AND
    /// MOVE). Every nexus its registration covers holds it; for the
    /// all-registrants types every registrant does.
    pub holder: Nexus,
    pub kind: u8,
}

/// Whom a unit attention is for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Recipient {
    Nexus(Nexus),
    /// Every nexus of this initiator port (an ALL_TG_PT registrant).
    Initiator(String),
    /// Every nexus through another target port than this one (a logical
    /// unit reset through that port; its own nexuses are told there).
    AllBut {
        port: u16,
    },
}

impl Recipient {
    pub fn includes(&self, nexus: &Nexus) -> bool {
        match self {
            Recipient::Nexus(to) => to == nexus,
            Recipient::Initiator(initiator) => *initiator == nexus.initiator,
            Recipient::AllBut { port } => *port != nexus.port,
        }
    }
}

/// A unit attention posted with the shared state, for whichever host
/// serves its recipients.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    pub number: u64,
    pub to: Recipient,
    pub asc: u8,
    pub ascq: u8,
}

/// How many notices the shared state keeps: every host applies a change
/// before the change is answered, so a host misses one only if it was cut
/// off meanwhile (and then its sessions are gone or reset too).
pub const NOTICES_KEPT: usize = 64;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservations {
    pub generation: u32,
    pub registrations: Vec<Registration>,
    pub reservation: Option<Reservation>,
    /// Unit attentions for nexuses on other hosts, newest last (kept only
    /// when the state is shared).
    #[serde(default)]
    pub notices: Vec<Notice>,
    /// The number of the last notice posted.
    #[serde(default)]
    pub notices_posted: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PrError {
    Conflict,
    Sense(Sense),
}

impl From<Sense> for PrError {
    fn from(sense: Sense) -> PrError {
        PrError::Sense(sense)
    }
}

/// Unit attentions a change leaves: (to whom, asc, ascq).
pub type Attentions = Vec<(Recipient, u8, u8)>;

const RESERVATIONS_PREEMPTED: (u8, u8) = (0x2a, 0x03);
const RESERVATIONS_RELEASED: (u8, u8) = (0x2a, 0x04);
const REGISTRATIONS_PREEMPTED: (u8, u8) = (0x2a, 0x05);

/// Where a logical unit's reservations live when several target hosts
/// serve it (the unit keeps its own otherwise): every host's unit enforces
/// the same registrations and reservation, and they survive the host that
/// took them.
pub trait ReservationStore: Send + Sync {
    /// The newest state this host knows: checked on every command, so it
    /// must be cheap (the same `Arc` while nothing changed).
    fn load(&self) -> Arc<Reservations>;

    /// Applies `change` to the shared state as one atomic step (read,
    /// change, compare-and-set, again on a conflict: `change` may run more
    /// than once and must depend only on the state it is given), and
    /// returns once every other host serving the unit has applied it.
    /// `Err`: the shared state cannot be reached.
    fn update<'a>(&'a self, change: &'a Change<'a>) -> BoxFuture<'a, Result<Result<Attentions, PrError>, String>>;

    /// Whether this host can vouch that [`load`](Self::load) holds every
    /// change answered so far: false once it has not heard from the shared
    /// state for a while (cut off, it may have missed one). A unit whose
    /// reservations are in use then refuses the commands they govern, so
    /// no host enforces a stale reservation; a host making a change waits
    /// out the lease of any host that did not confirm it. (A unit with no
    /// registration as last seen goes on serving: one registered during a
    /// cut is not enforced by the host cut off until it hears again.)
    fn current(&self) -> bool {
        true
    }
}

/// A change of reservations (what a PERSISTENT RESERVE OUT does), with the
/// unit attentions it leaves for other nexuses.
pub type Change<'a> = dyn Fn(&mut Reservations) -> Result<Attentions, PrError> + Send + Sync + 'a;

/// PERSISTENT RESERVE OUT service actions.
pub mod action {
    pub const REGISTER: u8 = 0;
    pub const RESERVE: u8 = 1;
    pub const RELEASE: u8 = 2;
    pub const CLEAR: u8 = 3;
    pub const PREEMPT: u8 = 4;
    pub const PREEMPT_AND_ABORT: u8 = 5;
    pub const REGISTER_AND_IGNORE: u8 = 6;
    pub const REGISTER_AND_MOVE: u8 = 7;
}

/// A decoded PERSISTENT RESERVE OUT request.
#[derive(Clone, Debug)]
pub struct Request {
    pub action: u8,
    pub kind: u8,
    pub key: u64,
    pub service_key: u64,
    pub all_target_ports: bool,
    /// REGISTER AND MOVE: the destination nexus.
    pub move_to: Option<Nexus>,
    pub unregister_on_move: bool,
}

/// RESERVE(6) / RELEASE(6) (SPC-2): held by one nexus, kept by each host's
/// unit (it ends with its nexus, at once), and in conflict with any
/// persistent reservation state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LegacyReservation(Option<Nexus>);

impl LegacyReservation {
    pub fn holder(&self) -> Option<&Nexus> {
        self.0.as_ref()
    }

    /// Held by another nexus than `nexus`.
    pub fn conflicts(&self, nexus: &Nexus) -> bool {
        self.0.as_ref().is_some_and(|holder| holder != nexus)
    }

    /// RESERVE(6).
    pub fn reserve(&mut self, nexus: &Nexus, persistent: &Reservations) -> Result<(), PrError> {
        // SPC-3: RESERVE(6) conflicts with any persistent reservation state.
        if persistent.reservation.is_some() || !persistent.registrations.is_empty() || self.conflicts(nexus) {
            return Err(PrError::Conflict);
        }
        self.0 = Some(nexus.clone());
        Ok(())
    }

    /// RELEASE(6): releasing a reservation another nexus holds does nothing.
    pub fn release(&mut self, nexus: &Nexus, persistent: &Reservations) -> Result<(), PrError> {
        if persistent.reservation.is_some() {
            return Err(PrError::Conflict);
        }
        if self.0.as_ref() == Some(nexus) {
            self.0 = None;
        }
        Ok(())
    }

    /// A logical unit reset (`None`) or the loss of the holder's nexus ends it.
    pub fn reset(&mut self, nexus: Option<&Nexus>) {
        if nexus.is_none() || self.0.as_ref() == nexus {
            self.0 = None;
        }
    }
}

impl Reservations {
    /// The registration of `nexus`.
    /// Whether any nexus is registered (a reservation needs a registration).
    pub fn in_use(&self) -> bool {
        !self.registrations.is_empty()
    }

    pub fn registration(&self, nexus: &Nexus) -> Option<&Registration> {
        self.registrations.iter().find(|registration| registration.covers(nexus))
    }

    fn registration_index(&self, nexus: &Nexus) -> Option<usize> {
        self.registrations.iter().position(|registration| registration.covers(nexus))
    }

    /// Whether `nexus` holds the reservation.
    pub fn holds(&self, nexus: &Nexus) -> bool {
        match &self.reservation {
            Some(reservation) if kind::all_registrants(reservation.kind) => self.registration(nexus).is_some(),
            Some(reservation) => {
                let mine = self.registration_index(nexus);
                mine.is_some() && mine == self.registration_index(&reservation.holder)
            }
            None => false,
        }
    }

    /// Whether the persistent reservation lets `nexus` run a command of
    /// class `access` (RESERVE(6) conflicts are the unit's to check: they
    /// follow their own, opcode-based table).
    pub fn allows(&self, nexus: &Nexus, access: Access) -> bool {
        if access == Access::Always {
            return true;
        }
        let Some(reservation) = &self.reservation else { return true };
        if self.holds(nexus) {
            return true;
        }
        let registered = self.registration(nexus).is_some();
        match access {
            Access::Always => true,
            Access::Read => {
                if kind::exclusive_access(reservation.kind) {
                    kind::registrants_access(reservation.kind) && registered
                } else {
                    true
                }
            }
            Access::Write | Access::Other => kind::registrants_access(reservation.kind) && registered,
        }
    }

    /// Posts unit attentions for the hosts serving their recipients: each
    /// picks up the notices numbered after the last it has seen.
    pub fn post(&mut self, attentions: Attentions) {
        for (to, asc, ascq) in attentions {
            self.notices_posted += 1;
            self.notices.push(Notice { number: self.notices_posted, to, asc, ascq });
        }
        let excess = self.notices.len().saturating_sub(NOTICES_KEPT);
        self.notices.drain(..excess);
    }

    /// PERSISTENT RESERVE OUT from `nexus` (a RESERVE(6) held by another
    /// nexus is the caller's to check first).
    pub fn apply(&mut self, nexus: &Nexus, request: &Request) -> Result<Attentions, PrError> {
        let mut attentions = Attentions::new();
        match request.action {
            action::REGISTER | action::REGISTER_AND_IGNORE => {
                let ignore = request.action == action::REGISTER_AND_IGNORE;
                // ALL_TG_PT acts as if sent through every port: the
                // initiator's registrations through other ports conflict,
                // or, ignoring keys, give way to it.
                let others = |registration: &Registration| {
                    registration.initiator == nexus.initiator && !registration.covers(nexus)
                };
                if request.all_target_ports && request.service_key != 0 && self.registrations.iter().any(others) {
                    if !ignore {
                        return Err(PrError::Conflict);
                    }
                    self.registrations.retain(|registration| !others(registration));
                }
                match self.registration_index(nexus) {
                    None => {
                        if !ignore && request.key != 0 {
                            return Err(PrError::Conflict);
                        }
                        if request.service_key != 0 {
                            self.registrations.push(Registration {
                                key: request.service_key,
                                initiator: nexus.initiator.clone(),
                                port: nexus.port,
                                all_target_ports: request.all_target_ports,
                            });
                        }
                    }
                    Some(index) => {
                        if !ignore && self.registrations[index].key != request.key {
                            return Err(PrError::Conflict);
                        }
                        if request.service_key == 0 {
                            self.unregister(index, &mut attentions);
                        } else {
                            self.registrations[index].key = request.service_key;
                        }
                    }
                }
                self.generation = self.generation.wrapping_add(1);
            }
            action::RESERVE => {
                self.check_key(nexus, request.key)?;
                if !kind::valid(request.kind) {
                    return Err(Sense::invalid_cdb(2, None).into());
                }
                match &self.reservation {
                    None => self.reservation = Some(Reservation { holder: nexus.clone(), kind: request.kind }),
                    Some(reservation) if self.holds(nexus) && reservation.kind == request.kind => {}
                    Some(_) => return Err(PrError::Conflict),
                }
            }
            action::RELEASE => {
                self.check_key(nexus, request.key)?;
                let Some(reservation) = self.reservation.clone() else { return Ok(attentions) };
                if !self.holds(nexus) {
                    return Ok(attentions);
                }
                if reservation.kind != request.kind {
                    return Err(Sense::new(crate::sense::key::ILLEGAL_REQUEST, 0x26, 0x04).into());
                }
                self.reservation = None;
                if kind::registrants_access(reservation.kind) {
                    self.tell_others(nexus, RESERVATIONS_RELEASED, &mut attentions);
                }
            }
            action::CLEAR => {
                self.check_key(nexus, request.key)?;
                self.tell_others(nexus, RESERVATIONS_PREEMPTED, &mut attentions);
                self.registrations.clear();
                self.reservation = None;
                self.generation = self.generation.wrapping_add(1);
            }
            action::PREEMPT | action::PREEMPT_AND_ABORT => {
                self.check_key(nexus, request.key)?;
                self.preempt(nexus, request, &mut attentions)?;
                self.generation = self.generation.wrapping_add(1);
            }
            action::REGISTER_AND_MOVE => {
                self.check_key(nexus, request.key)?;
                let Some(destination) = request.move_to.clone() else {
                    return Err(Sense::invalid_parameter(24).into());
                };
                if request.service_key == 0
                    || destination == *nexus
                    || self.registration(&destination).is_some_and(|registration| registration.covers(nexus))
                {
                    return Err(Sense::invalid_parameter(8).into());
                }
                let Some(reservation) = self.reservation.clone() else { return Err(PrError::Conflict) };
                if kind::all_registrants(reservation.kind) {
                    return Err(Sense::invalid_cdb(2, None).into());
                }
                if !self.holds(nexus) {
                    return Err(PrError::Conflict);
                }
                let source = self.registration_index(nexus).expect("the holder is registered");
                match self.registration_index(&destination) {
                    Some(index) => self.registrations[index].key = request.service_key,
                    None => self.registrations.push(Registration {
                        key: request.service_key,
                        initiator: destination.initiator.clone(),
                        port: destination.port,
                        all_target_ports: false,
                    }),
                }
                self.reservation = Some(Reservation { holder: destination, kind: reservation.kind });
                if request.unregister_on_move {
                    self.registrations.remove(source);
                }
                self.generation = self.generation.wrapping_add(1);
            }
            _ => return Err(Sense::invalid_cdb(1, None).into()),
        }
        Ok(attentions)
    }

    fn check_key(&self, nexus: &Nexus, key: u64) -> Result<(), PrError> {
        match self.registration(nexus) {
            Some(registration) if registration.key == key => Ok(()),
            _ => Err(PrError::Conflict),
        }
    }

    /// Tells every registrant but `nexus`'s registration.
    fn tell_others(&self, nexus: &Nexus, (asc, ascq): (u8, u8), attentions: &mut Attentions) {
        for registration in &self.registrations {
            if !registration.covers(nexus) {
                attentions.push((registration.recipient(), asc, ascq));
            }
        }
    }

    fn unregister(&mut self, index: usize, attentions: &mut Attentions) {
        let holder = self.reservation.as_ref().and_then(|reservation| self.registration_index(&reservation.holder));
        let gone = self.registrations.remove(index);
        let Some(reservation) = self.reservation.clone() else { return };
        let released =
            if kind::all_registrants(reservation.kind) { self.registrations.is_empty() } else { holder == Some(index) };
        if released {
            self.reservation = None;
            if matches!(reservation.kind, 5 | 6) {
                let nexus = Nexus::new(gone.initiator, gone.port);
                self.tell_others(&nexus, RESERVATIONS_RELEASED, attentions);
            }
        }
    }

    fn preempt(&mut self, nexus: &Nexus, request: &Request, attentions: &mut Attentions) -> Result<(), PrError> {
        let reservation = self.reservation.clone();
        let preempts_reservation = match &reservation {
            None => false,
            Some(held) if kind::all_registrants(held.kind) => request.service_key == 0,
            Some(held) => self.registration(&held.holder).map(|holder| holder.key) == Some(request.service_key),
        };
        if !preempts_reservation {
            // Removes registrations only.
            if request.service_key == 0 {
                return Err(Sense::invalid_parameter(8).into());
            }
            if !self.registrations.iter().any(|registration| registration.key == request.service_key) {
                return Err(PrError::Conflict);
            }
            let removed = self.remove_registrations(|registration| {
                registration.key == request.service_key && !registration.covers(nexus)
            });
            for gone in removed {
                attentions.push((gone.recipient(), REGISTRATIONS_PREEMPTED.0, REGISTRATIONS_PREEMPTED.1));
            }
            if let Some(held) = &reservation {
                if kind::all_registrants(held.kind) && self.registrations.is_empty() {
                    self.reservation = None;
                }
            }
            return Ok(());
        }
        if !kind::valid(request.kind) {
            return Err(Sense::invalid_cdb(2, None).into());
        }
        let held = reservation.expect("preempting a reservation");
        let removed = self.remove_registrations(|registration| {
            !registration.covers(nexus) && (request.service_key == 0 || registration.key == request.service_key)
        });
        for gone in removed {
            attentions.push((gone.recipient(), REGISTRATIONS_PREEMPTED.0, REGISTRATIONS_PREEMPTED.1));
        }
        if held.kind != request.kind {
            // SPC-4: a changed type is a release for the registrants left.
            self.tell_others(nexus, RESERVATIONS_RELEASED, attentions);
        }
        self.reservation = Some(Reservation { holder: nexus.clone(), kind: request.kind });
        Ok(())
    }

    fn remove_registrations(&mut self, remove: impl Fn(&Registration) -> bool) -> Vec<Registration> {
        let (removed, kept) = std::mem::take(&mut self.registrations).into_iter().partition(|r| remove(r));
        self.registrations = kept;
        removed
    }
}

/// The iSCSI TransportID (SPC-4 §7.6.4.6, format 01b) for an initiator port
/// named `<iqn>,i,0x<isid>`.
pub fn transport_id(nexus: &str) -> Vec<u8> {
    let mut name = nexus.as_bytes().to_vec();
    name.push(0);
    while !name.len().is_multiple_of(4) {
        name.push(0);
    }
    let mut out = vec![0x45, 0];
    out.extend_from_slice(&(name.len() as u16).to_be_bytes());
    out.extend_from_slice(&name);
    out
}

/// Parses an iSCSI TransportID naming an initiator port (format 01b),
/// returning the port's name and the bytes it took. Format 00b names only
/// the initiator, not a port, and is refused.
pub fn parse_transport_id(bytes: &[u8]) -> Option<(String, usize)> {
    if bytes.len() < 4 || bytes[0] & 0x0f != 5 || bytes[0] >> 6 != 1 {
        return None;
    }
    let length = u16::from_be_bytes([bytes[2], bytes[3]]) as usize;
    let name = bytes.get(4..4 + length)?;
    let end = name.iter().position(|&byte| byte == 0).unwrap_or(name.len());
    let text = std::str::from_utf8(&name[..end]).ok()?;
    text.contains(",i,0x").then(|| (text.to_string(), 4 + length))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nexus(name: &str) -> Nexus {
        Nexus::new(name, 1)
    }

    fn register(state: &mut Reservations, name: &str, key: u64) {
        let request = Request {
            action: action::REGISTER,
            kind: 0,
            key: 0,
            service_key: key,
            all_target_ports: false,
            move_to: None,
            unregister_on_move: false,
        };
        state.apply(&nexus(name), &request).expect("register");
    }

    fn request(action: u8, kind: u8, key: u64, service_key: u64) -> Request {
        Request { action, kind, key, service_key, all_target_ports: false, move_to: None, unregister_on_move: false }
    }

    #[test]
    fn write_exclusive_registrants_only_lets_registrants_write_and_everyone_read() {
        let mut state = Reservations::default();
        register(&mut state, "a", 1);
        register(&mut state, "b", 2);
        state.apply(&nexus("a"), &request(action::RESERVE, kind::WRITE_EXCLUSIVE_REGISTRANTS_ONLY, 1, 0)).unwrap();
        assert!(state.allows(&nexus("b"), Access::Write));
        assert!(!state.allows(&nexus("c"), Access::Write));
        assert!(state.allows(&nexus("c"), Access::Read));
        assert_eq!(state.generation, 2, "reserve does not bump the generation");
    }

    #[test]
    fn exclusive_access_keeps_others_from_reading() {
        let mut state = Reservations::default();
        register(&mut state, "a", 1);
        register(&mut state, "b", 2);
        state.apply(&nexus("a"), &request(action::RESERVE, kind::EXCLUSIVE_ACCESS, 1, 0)).unwrap();
        assert!(!state.allows(&nexus("b"), Access::Read));
        assert!(state.allows(&nexus("a"), Access::Write));
        assert_eq!(
            state.apply(&nexus("b"), &request(action::RESERVE, kind::EXCLUSIVE_ACCESS, 2, 0)),
            Err(PrError::Conflict)
        );
    }

    #[test]
    fn preempt_takes_the_reservation_and_removes_the_holder() {
        let mut state = Reservations::default();
        register(&mut state, "a", 1);
        register(&mut state, "b", 2);
        state.apply(&nexus("a"), &request(action::RESERVE, kind::WRITE_EXCLUSIVE, 1, 0)).unwrap();
        let attentions = state.apply(&nexus("b"), &request(action::PREEMPT, kind::EXCLUSIVE_ACCESS, 2, 1)).unwrap();
        assert_eq!(state.reservation.as_ref().unwrap().holder, nexus("b"));
        assert!(state.registration(&nexus("a")).is_none());
        assert!(attentions.iter().any(|(to, asc, _)| to.includes(&nexus("a")) && *asc == 0x2a));
    }

    #[test]
    fn wrong_key_conflicts_and_unregistering_the_holder_releases() {
        let mut state = Reservations::default();
        register(&mut state, "a", 1);
        assert_eq!(
            state.apply(&nexus("a"), &request(action::RESERVE, kind::WRITE_EXCLUSIVE, 9, 0)),
            Err(PrError::Conflict)
        );
        state.apply(&nexus("a"), &request(action::RESERVE, kind::WRITE_EXCLUSIVE, 1, 0)).unwrap();
        state.apply(&nexus("a"), &request(action::REGISTER, 0, 1, 0)).unwrap();
        assert!(state.reservation.is_none());
    }

    fn register_through(state: &mut Reservations, nexus: &Nexus, key: u64, all_target_ports: bool) {
        let request = Request { all_target_ports, ..request(action::REGISTER, 0, 0, key) };
        state.apply(nexus, &request).expect("register");
    }

    #[test]
    fn the_paths_of_one_initiator_port_through_two_target_ports_are_two_nexuses() {
        let mut state = Reservations::default();
        let (first, second) = (Nexus::new("a", 1), Nexus::new("a", 2));
        register_through(&mut state, &first, 1, false);
        assert!(state.registration(&second).is_none(), "registered through port 1 only");
        // The second path registers on its own (as multipath tools do,
        // path by path), with the same key, and is a second registrant.
        register_through(&mut state, &second, 1, false);
        assert_eq!(state.registrations.len(), 2);
        state.apply(&first, &request(action::RESERVE, kind::WRITE_EXCLUSIVE, 1, 0)).unwrap();
        assert!(state.holds(&first));
        assert!(!state.holds(&second), "the holder is the nexus that reserved");
        assert!(!state.allows(&second, Access::Write));
        // Unregistering the second path leaves the first's registration and reservation.
        state.apply(&second, &request(action::REGISTER, 0, 1, 0)).unwrap();
        assert!(state.holds(&first));
        assert_eq!(state.registrations.len(), 1);
    }

    #[test]
    fn a_registration_with_all_target_ports_covers_every_port_of_its_initiator() {
        let mut state = Reservations::default();
        register_through(&mut state, &Nexus::new("a", 1), 1, true);
        register_through(&mut state, &Nexus::new("b", 1), 2, false);
        assert_eq!(state.registration(&Nexus::new("a", 9)).map(|r| r.key), Some(1));
        assert!(state.registration(&Nexus::new("b", 9)).is_none());
        state.apply(&Nexus::new("a", 1), &request(action::RESERVE, kind::EXCLUSIVE_ACCESS, 1, 0)).unwrap();
        assert!(state.holds(&Nexus::new("a", 7)), "every port of an ALL_TG_PT registrant holds it");
        assert!(!state.allows(&Nexus::new("b", 1), Access::Read));
        // A release through another port releases, and tells nobody: the
        // type lets no registrant but the holder in.
        let attentions = state.apply(&Nexus::new("a", 3), &request(action::RELEASE, kind::EXCLUSIVE_ACCESS, 1, 0));
        assert_eq!(attentions, Ok(Vec::new()));
        assert!(state.reservation.is_none());
        // Preempting the ALL_TG_PT registrant tells each of its nexuses.
        let attentions = state.apply(&Nexus::new("b", 1), &request(action::PREEMPT, 0, 2, 1)).unwrap();
        assert_eq!(attentions, vec![(Recipient::Initiator("a".into()), 0x2a, 0x05)]);
        assert!(attentions[0].0.includes(&Nexus::new("a", 4)));
    }

    #[test]
    fn all_target_ports_never_overlaps_a_registration_through_one_port() {
        let mut state = Reservations::default();
        register_through(&mut state, &Nexus::new("a", 1), 1, false);
        // As if sent through port 1 too, where "a" is registered with another key.
        let registering = Request { all_target_ports: true, ..request(action::REGISTER, 0, 0, 2) };
        assert_eq!(state.apply(&Nexus::new("a", 2), &registering), Err(PrError::Conflict));
        // Ignoring keys, it replaces the registration through port 1.
        let ignoring = Request { all_target_ports: true, ..request(action::REGISTER_AND_IGNORE, 0, 0, 2) };
        state.apply(&Nexus::new("a", 2), &ignoring).unwrap();
        assert_eq!(state.registrations.len(), 1);
        assert_eq!(state.registration(&Nexus::new("a", 1)).map(|r| r.key), Some(2));
    }

    #[test]
    fn register_and_move_hands_the_reservation_to_the_nexus_through_the_named_port() {
        let mut state = Reservations::default();
        let (from, to) = (Nexus::new("a", 1), Nexus::new("b", 2));
        register_through(&mut state, &from, 1, false);
        state.apply(&from, &request(action::RESERVE, kind::WRITE_EXCLUSIVE, 1, 0)).unwrap();
        let moving = Request {
            move_to: Some(to.clone()),
            unregister_on_move: true,
            ..request(action::REGISTER_AND_MOVE, 0, 1, 5)
        };
        state.apply(&from, &moving).unwrap();
        assert_eq!(state.reservation.as_ref().map(|r| &r.holder), Some(&to));
        assert!(state.holds(&to));
        assert!(!state.holds(&Nexus::new("b", 1)), "b through another port is another nexus");
        assert!(state.registration(&from).is_none(), "unregistered on the move");
        // Moving to oneself is refused.
        let back = Request { move_to: Some(to.clone()), ..request(action::REGISTER_AND_MOVE, 0, 5, 6) };
        assert!(matches!(state.apply(&to, &back), Err(PrError::Sense(_))));
    }

    #[test]
    fn posted_notices_are_numbered_and_only_the_newest_are_kept() {
        let mut state = Reservations::default();
        for _ in 0..NOTICES_KEPT + 5 {
            state.post(vec![(Recipient::AllBut { port: 1 }, 0x29, 0x03)]);
        }
        assert_eq!(state.notices.len(), NOTICES_KEPT);
        assert_eq!(state.notices_posted, (NOTICES_KEPT + 5) as u64);
        assert_eq!(state.notices.first().map(|notice| notice.number), Some(6));
        assert!(!state.notices[0].to.includes(&Nexus::new("a", 1)));
        assert!(state.notices[0].to.includes(&Nexus::new("a", 2)));
    }

    #[test]
    fn reserve_6_conflicts_with_persistent_state_and_ends_with_its_nexus() {
        let (a, b) = (Nexus::new("a", 1), Nexus::new("b", 1));
        let mut legacy = LegacyReservation::default();
        let mut persistent = Reservations::default();
        legacy.reserve(&a, &persistent).unwrap();
        assert_eq!(legacy.reserve(&b, &persistent), Err(PrError::Conflict));
        assert!(legacy.conflicts(&b) && !legacy.conflicts(&a));
        legacy.release(&b, &persistent).unwrap();
        assert_eq!(legacy.holder(), Some(&a), "releasing another's reservation does nothing");
        legacy.reset(Some(&a));
        assert_eq!(legacy.holder(), None);
        register_through(&mut persistent, &b, 1, false);
        assert_eq!(legacy.reserve(&a, &persistent), Err(PrError::Conflict));
    }

    #[test]
    fn transport_ids_round_trip() {
        let id = transport_id("iqn.2026-11.org.example:a,i,0x23d000000001");
        assert_eq!(id.len() % 4, 0);
        let (name, used) = parse_transport_id(&id).unwrap();
        assert_eq!(name, "iqn.2026-11.org.example:a,i,0x23d000000001");
        assert_eq!(used, id.len());
    }
}
