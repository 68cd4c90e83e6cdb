//! Reservations of one logical unit: RESERVE/RELEASE(6) and persistent
//! reservations (SPC-4 §5.13), as plain state so every rule is testable
//! without a connection.
//!
//! An I_T nexus is named by its initiator port (`<iqn>,i,0x<isid>`); the
//! target has one port per portal group, so the port is implied.

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

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub key: u64,
    pub nexus: String,
    pub all_target_ports: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// The holder's nexus; for the all-registrants types every registrant
    /// holds it and this is the one that reserved.
    pub holder: String,
    pub kind: u8,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservations {
    pub generation: u32,
    pub registrations: Vec<Registration>,
    pub reservation: Option<Reservation>,
    /// RESERVE(6) holder.
    pub legacy: Option<String>,
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

/// Unit attentions a change leaves for other nexuses: (nexus, asc, ascq).
pub type Attentions = Vec<(String, u8, u8)>;

const RESERVATIONS_PREEMPTED: (u8, u8) = (0x2a, 0x03);
const RESERVATIONS_RELEASED: (u8, u8) = (0x2a, 0x04);
const REGISTRATIONS_PREEMPTED: (u8, u8) = (0x2a, 0x05);

/// Where a logical unit's reservations live when several target hosts
/// serve it (the unit keeps its own otherwise): every host's unit enforces
/// the same registrations and reservation, and they survive the host that
/// took them.
pub trait ReservationStore: Send + Sync {
    /// The newest state this host knows: checked on every command, so it
    /// must be cheap.
    fn load(&self) -> Arc<Reservations>;

    /// Applies `change` to the shared state as one atomic step (read,
    /// change, compare-and-set, again on a conflict: `change` may run more
    /// than once and must depend only on the state it is given). `Err`:
    /// the shared state cannot be reached.
    fn update<'a>(&'a self, change: &'a Change<'a>) -> BoxFuture<'a, Result<Result<Attentions, PrError>, String>>;
}

/// A change of reservations (what a PERSISTENT RESERVE OUT or RESERVE(6)
/// does), with the unit attentions it leaves for other nexuses.
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
    pub move_to: Option<String>,
    pub unregister_on_move: bool,
}

impl Reservations {
    pub fn registration(&self, nexus: &str) -> Option<&Registration> {
        self.registrations.iter().find(|registration| registration.nexus == nexus)
    }

    fn holds(&self, nexus: &str) -> bool {
        match &self.reservation {
            Some(reservation) if kind::all_registrants(reservation.kind) => self.registration(nexus).is_some(),
            Some(reservation) => reservation.holder == nexus,
            None => false,
        }
    }

    /// Whether the persistent reservation lets `nexus` run a command of
    /// class `access` (RESERVE(6) conflicts are the unit's to check: they
    /// follow their own, opcode-based table).
    pub fn allows(&self, nexus: &str, access: Access) -> bool {
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

    /// RESERVE(6).
    pub fn reserve_legacy(&mut self, nexus: &str) -> Result<(), PrError> {
        // SPC-3: RESERVE(6) conflicts with any persistent reservation state.
        if self.reservation.is_some() || !self.registrations.is_empty() {
            return Err(PrError::Conflict);
        }
        match &self.legacy {
            Some(holder) if holder != nexus => Err(PrError::Conflict),
            _ => {
                self.legacy = Some(nexus.to_string());
                Ok(())
            }
        }
    }

    /// RELEASE(6): releasing a reservation another nexus holds does nothing.
    pub fn release_legacy(&mut self, nexus: &str) -> Result<(), PrError> {
        if self.reservation.is_some() {
            return Err(PrError::Conflict);
        }
        if self.legacy.as_deref() == Some(nexus) {
            self.legacy = None;
        }
        Ok(())
    }

    /// A LUN reset or a session loss of the holder ends RESERVE(6).
    pub fn reset_legacy(&mut self, nexus: Option<&str>) {
        if nexus.is_none() || self.legacy.as_deref() == nexus {
            self.legacy = None;
        }
    }

    /// PERSISTENT RESERVE OUT.
    pub fn apply(&mut self, nexus: &str, request: &Request) -> Result<Attentions, PrError> {
        if self.legacy.as_ref().is_some_and(|holder| holder != nexus) {
            return Err(PrError::Conflict);
        }
        let mut attentions = Attentions::new();
        match request.action {
            action::REGISTER | action::REGISTER_AND_IGNORE => {
                let ignore = request.action == action::REGISTER_AND_IGNORE;
                match self.registrations.iter().position(|registration| registration.nexus == nexus) {
                    None => {
                        if !ignore && request.key != 0 {
                            return Err(PrError::Conflict);
                        }
                        if request.service_key != 0 {
                            self.registrations.push(Registration {
                                key: request.service_key,
                                nexus: nexus.to_string(),
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
                    None => self.reservation = Some(Reservation { holder: nexus.to_string(), kind: request.kind }),
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
                if request.service_key == 0 || destination == nexus {
                    return Err(Sense::invalid_parameter(8).into());
                }
                let Some(reservation) = self.reservation.clone() else { return Err(PrError::Conflict) };
                if kind::all_registrants(reservation.kind) {
                    return Err(Sense::invalid_cdb(2, None).into());
                }
                if !self.holds(nexus) {
                    return Err(PrError::Conflict);
                }
                match self.registrations.iter_mut().find(|registration| registration.nexus == destination) {
                    Some(registration) => registration.key = request.service_key,
                    None => self.registrations.push(Registration {
                        key: request.service_key,
                        nexus: destination.clone(),
                        all_target_ports: false,
                    }),
                }
                self.reservation = Some(Reservation { holder: destination, kind: reservation.kind });
                if request.unregister_on_move {
                    self.registrations.retain(|registration| registration.nexus != nexus);
                }
                self.generation = self.generation.wrapping_add(1);
            }
            _ => return Err(Sense::invalid_cdb(1, None).into()),
        }
        Ok(attentions)
    }

    fn check_key(&self, nexus: &str, key: u64) -> Result<(), PrError> {
        match self.registration(nexus) {
            Some(registration) if registration.key == key => Ok(()),
            _ => Err(PrError::Conflict),
        }
    }

    fn tell_others(&self, nexus: &str, (asc, ascq): (u8, u8), attentions: &mut Attentions) {
        for registration in &self.registrations {
            if registration.nexus != nexus {
                attentions.push((registration.nexus.clone(), asc, ascq));
            }
        }
    }

    fn unregister(&mut self, index: usize, attentions: &mut Attentions) {
        let gone = self.registrations.remove(index);
        let Some(reservation) = self.reservation.clone() else { return };
        let released = if kind::all_registrants(reservation.kind) {
            self.registrations.is_empty()
        } else {
            reservation.holder == gone.nexus
        };
        if released {
            self.reservation = None;
            if matches!(reservation.kind, 5 | 6) {
                self.tell_others(&gone.nexus, RESERVATIONS_RELEASED, attentions);
            }
        }
    }

    fn preempt(&mut self, nexus: &str, request: &Request, attentions: &mut Attentions) -> Result<(), PrError> {
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
            let removed: Vec<String> = self
                .registrations
                .iter()
                .filter(|registration| registration.key == request.service_key && registration.nexus != nexus)
                .map(|registration| registration.nexus.clone())
                .collect();
            if removed.is_empty() && !self.registrations.iter().any(|r| r.key == request.service_key) {
                return Err(PrError::Conflict);
            }
            self.registrations.retain(|registration| !removed.contains(&registration.nexus));
            for gone in removed {
                attentions.push((gone, REGISTRATIONS_PREEMPTED.0, REGISTRATIONS_PREEMPTED.1));
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
        let removed: Vec<String> = self
            .registrations
            .iter()
            .filter(|registration| {
                registration.nexus != nexus && (request.service_key == 0 || registration.key == request.service_key)
            })
            .map(|registration| registration.nexus.clone())
            .collect();
        self.registrations.retain(|registration| !removed.contains(&registration.nexus));
        for gone in &removed {
            attentions.push((gone.clone(), REGISTRATIONS_PREEMPTED.0, REGISTRATIONS_PREEMPTED.1));
        }
        if held.kind != request.kind {
            for registration in &self.registrations {
                if registration.nexus != nexus {
                    attentions.push((registration.nexus.clone(), 0x2a, 0x03));
                }
            }
        }
        self.reservation = Some(Reservation { holder: nexus.to_string(), kind: request.kind });
        Ok(())
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

/// Parses an iSCSI TransportID, returning the initiator port name and the
/// bytes it took.
pub fn parse_transport_id(bytes: &[u8]) -> Option<(String, usize)> {
    if bytes.len() < 4 || bytes[0] & 0x0f != 5 {
        return None;
    }
    let length = u16::from_be_bytes([bytes[2], bytes[3]]) as usize;
    let name = bytes.get(4..4 + length)?;
    let end = name.iter().position(|&byte| byte == 0).unwrap_or(name.len());
    let text = std::str::from_utf8(&name[..end]).ok()?;
    // Format 00b names only the initiator; it matches that initiator's port
    // as `<iqn>` alone.
    Some((text.to_string(), 4 + length))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn register(state: &mut Reservations, nexus: &str, key: u64) {
        let request = Request {
            action: action::REGISTER,
            kind: 0,
            key: 0,
            service_key: key,
            all_target_ports: false,
            move_to: None,
            unregister_on_move: false,
        };
        state.apply(nexus, &request).expect("register");
    }

    fn request(action: u8, kind: u8, key: u64, service_key: u64) -> Request {
        Request { action, kind, key, service_key, all_target_ports: false, move_to: None, unregister_on_move: false }
    }

    #[test]
    fn write_exclusive_registrants_only_lets_registrants_write_and_everyone_read() {
        let mut state = Reservations::default();
        register(&mut state, "a", 1);
        register(&mut state, "b", 2);
        state.apply("a", &request(action::RESERVE, kind::WRITE_EXCLUSIVE_REGISTRANTS_ONLY, 1, 0)).unwrap();
        assert!(state.allows("b", Access::Write));
        assert!(!state.allows("c", Access::Write));
        assert!(state.allows("c", Access::Read));
        assert_eq!(state.generation, 2, "reserve does not bump the generation");
    }

    #[test]
    fn exclusive_access_keeps_others_from_reading() {
        let mut state = Reservations::default();
        register(&mut state, "a", 1);
        register(&mut state, "b", 2);
        state.apply("a", &request(action::RESERVE, kind::EXCLUSIVE_ACCESS, 1, 0)).unwrap();
        assert!(!state.allows("b", Access::Read));
        assert!(state.allows("a", Access::Write));
        assert_eq!(state.apply("b", &request(action::RESERVE, kind::EXCLUSIVE_ACCESS, 2, 0)), Err(PrError::Conflict));
    }

    #[test]
    fn preempt_takes_the_reservation_and_removes_the_holder() {
        let mut state = Reservations::default();
        register(&mut state, "a", 1);
        register(&mut state, "b", 2);
        state.apply("a", &request(action::RESERVE, kind::WRITE_EXCLUSIVE, 1, 0)).unwrap();
        let attentions = state.apply("b", &request(action::PREEMPT, kind::EXCLUSIVE_ACCESS, 2, 1)).unwrap();
        assert_eq!(state.reservation.as_ref().unwrap().holder, "b");
        assert!(state.registration("a").is_none());
        assert!(attentions.iter().any(|(nexus, asc, _)| nexus == "a" && *asc == 0x2a));
    }

    #[test]
    fn wrong_key_conflicts_and_unregistering_the_holder_releases() {
        let mut state = Reservations::default();
        register(&mut state, "a", 1);
        assert_eq!(state.apply("a", &request(action::RESERVE, kind::WRITE_EXCLUSIVE, 9, 0)), Err(PrError::Conflict));
        state.apply("a", &request(action::RESERVE, kind::WRITE_EXCLUSIVE, 1, 0)).unwrap();
        state.apply("a", &request(action::REGISTER, 0, 1, 0)).unwrap();
        assert!(state.reservation.is_none());
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
