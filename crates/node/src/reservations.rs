//! SCSI persistent reservations shared by every host serving a volume
//! (issue 8; spec: iscsi.md, "Active-active failover with persistent
//! reservations").
//!
//! A volume's `iscsi::pr::Reservations` live in the catalog's
//! `reservations` map under the volume's name, JSON-encoded (the catalog
//! knows nothing of SCSI). Every host's logical unit for the volume checks
//! commands against the newest copy its catalog replica has applied, and
//! changes it (PERSISTENT RESERVE OUT, RESERVE/RELEASE(6)) by
//! compare-and-set, so a reservation taken through one host is enforced by
//! all, and outlives the host it was taken through.
//!
//! A change is answered only once every other live target host has
//! applied it ([`method::SYNC`]: each reads the volume's entry
//! linearizably, which applies the log up to it), so an initiator that
//! learns its PERSISTENT RESERVE OUT succeeded finds it enforced on every
//! path.
//!
//! A host cut off from the cluster cannot apply changes, so it must not
//! go on enforcing what it last applied: every target host holds a
//! [`Lease`], renewed by a linearizable catalog read every
//! [`LEASE_RENEWAL`] and counted from when the read was sent; without it
//! its units refuse the commands reservations govern (NOT READY, in
//! transition). A change that a host did not confirm within
//! [`SYNC_TIMEOUT`] (or a target host not asked, being marked down) is
//! answered only after [`LEASE`] more: by then that host has either read
//! past the change or stopped serving.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

use futures::future::BoxFuture;
use iscsi::pr::{Attentions, Change, PrError, ReservationStore, Reservations};
use sharedlog::types::Position;

use crate::daemon::Node;

const UPDATE_ATTEMPTS_MAX: usize = 64;
/// How long a change waits for each other host to apply it.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a successful catalog read lets a host vouch for its copy of
/// the reservations, from when the read was sent.
pub const LEASE: Duration = Duration::from_secs(4);
/// How often a target host renews its lease.
pub const LEASE_RENEWAL: Duration = Duration::from_millis(500);

/// When this host last heard from the catalog: the send time of its
/// newest successful linearizable read.
pub struct Lease {
    base: Instant,
    /// Milliseconds from `base` to that send time, plus one (0: never).
    confirmed: AtomicU64,
}

impl Default for Lease {
    fn default() -> Lease {
        Lease { base: Instant::now(), confirmed: AtomicU64::new(0) }
    }
}

impl Lease {
    /// A read sent at `sent` succeeded.
    pub fn confirm(&self, sent: Instant) {
        let millis = sent.saturating_duration_since(self.base).as_millis() as u64 + 1;
        self.confirmed.fetch_max(millis, Ordering::AcqRel);
    }

    /// Whether a read sent within the last [`LEASE`] succeeded.
    pub fn held(&self) -> bool {
        match self.confirmed.load(Ordering::Acquire) {
            0 => false,
            millis => self.base + Duration::from_millis(millis - 1) + LEASE > Instant::now(),
        }
    }
}

/// Renews this host's [`Lease`] until the node stops.
pub async fn keep_lease(node: Arc<Node>) {
    let mut shutdown = node.shutdown_signal();
    let mut held = true;
    loop {
        // Each renewal on its own: one slow read holds up none after it.
        let renewing = node.clone();
        tokio::spawn(async move {
            let Some(services) = renewing.services() else { return };
            let sent = Instant::now();
            // The volume names are never empty: the read is only for the
            // point in the log it reaches.
            match tokio::time::timeout(LEASE, services.catalog.reservations.get(&String::new())).await {
                Ok(Ok(_)) => renewing.targets.lease.confirm(sent),
                Ok(Err(error)) => tracing::debug!(%error, "cannot renew the reservations lease"),
                Err(_) => tracing::debug!("renewing the reservations lease timed out"),
            }
        });
        if held != node.targets.lease.held() {
            held = !held;
            match held {
                true => tracing::info!("reservations lease held again: serving reserved units"),
                false => tracing::warn!(
                    "reservations lease lost (no catalog read for {LEASE:?}): refusing I/O to units with reservations"
                ),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(LEASE_RENEWAL) => {}
            _ = shutdown.changed() => return,
        }
    }
}

pub mod method {
    /// "Apply the reservations of this volume up to now" (the payload: the
    /// volume's name); answered once done.
    pub const SYNC: u32 = 0x0206;
}

/// One volume's reservations in the catalog.
pub struct CatalogReservations {
    node: Weak<Node>,
    volume: String,
    /// The decoded copy and the catalog version it came from.
    cached: Mutex<(Option<Position>, Arc<Reservations>)>,
}

impl CatalogReservations {
    pub fn new(node: &Arc<Node>, volume: &str) -> CatalogReservations {
        CatalogReservations {
            node: Arc::downgrade(node),
            volume: volume.to_string(),
            cached: Mutex::new((None, Arc::new(Reservations::default()))),
        }
    }

    fn remember(&self, version: Option<Position>, reservations: Reservations) -> Arc<Reservations> {
        let reservations = Arc::new(reservations);
        *self.cached.lock().expect("reservations cache") = (version, reservations.clone());
        reservations
    }
}

fn decode(bytes: &[u8]) -> Reservations {
    serde_json::from_slice(bytes).unwrap_or_else(|error| {
        tracing::error!(%error, "undecodable reservations in the catalog: treated as none");
        Reservations::default()
    })
}

impl ReservationStore for CatalogReservations {
    fn load(&self) -> Arc<Reservations> {
        let Some(node) = self.node.upgrade() else { return self.cached.lock().expect("cache").1.clone() };
        let Some(services) = node.services() else { return self.cached.lock().expect("cache").1.clone() };
        // Checked on every command: compare versions without copying the
        // entry; decode only when it changed.
        let map = &services.catalog.reservations;
        let version = map.read_local(|map| map.get(&self.volume).map(|(_, version)| *version));
        {
            let cached = self.cached.lock().expect("reservations cache");
            if cached.0 == version {
                return cached.1.clone();
            }
        }
        let current = map.get_local(&self.volume);
        let version = current.as_ref().map(|(_, version)| *version);
        self.remember(version, current.map(|(bytes, _)| decode(&bytes)).unwrap_or_default())
    }

    fn update<'a>(&'a self, change: &'a Change<'a>) -> BoxFuture<'a, Result<Result<Attentions, PrError>, String>> {
        Box::pin(async move {
            let node = self.node.upgrade().ok_or("the node is stopping")?;
            let services = node.services().ok_or("the catalog is not open yet")?;
            let map = &services.catalog.reservations;
            for _ in 0..UPDATE_ATTEMPTS_MAX {
                let current = map.get(&self.volume).await.map_err(|error| error.to_string())?;
                let expected = current.as_ref().map(|(_, version)| *version);
                let mut reservations = current.map(|(bytes, _)| decode(&bytes)).unwrap_or_default();
                let before = reservations.clone();
                let attentions = match change(&mut reservations) {
                    Ok(attentions) => attentions,
                    Err(error) => return Ok(Err(error)),
                };
                if reservations == before {
                    return Ok(Ok(attentions));
                }
                let bytes = serde_json::to_vec(&reservations).map_err(|error| error.to_string())?;
                match map.compare_and_set(self.volume.clone(), expected, Some(bytes)).await {
                    Ok(Ok(version)) => {
                        let committed = Instant::now();
                        self.remember(Some(version), reservations);
                        if !sync_others(&node, &self.volume).await {
                            // Every host that did not confirm has read past
                            // the change or lost its lease by then.
                            tracing::warn!(volume = self.volume, wait = ?LEASE, "waiting out the lease of hosts that did not confirm a reservation change");
                            tokio::time::sleep_until(committed + LEASE).await;
                        }
                        return Ok(Ok(attentions));
                    }
                    Ok(Err(_)) => continue,
                    Err(error) => return Err(error.to_string()),
                }
            }
            Err(format!("gave up after {UPDATE_ATTEMPTS_MAX} conflicting reservation updates"))
        })
    }

    fn current(&self) -> bool {
        self.node.upgrade().is_some_and(|node| node.targets.lease.held())
    }
}

/// Has every other live target host apply the volume's reservations up to
/// now (at once, each bounded by [`SYNC_TIMEOUT`]). False when some
/// target host did not confirm it (or, marked down, was not asked).
async fn sync_others(node: &Arc<Node>, volume: &str) -> bool {
    let others: Vec<catalog::HostRecord> = crate::storage::hosts_by_id(node)
        .into_values()
        .filter(|host| host.id != node.config.node_id && host.roles.target && host.iscsi_address.is_some())
        .collect();
    let calls = others.iter().filter(|host| crate::targets::serves_targets(host)).map(|host| async move {
        let answer: Result<(), _> =
            wire::call(&node.transport, &host.address, method::SYNC, &volume.to_string(), SYNC_TIMEOUT).await;
        if let Err(error) = &answer {
            tracing::warn!(host = host.id, volume, %error, "a host did not confirm it applied a reservation change");
        }
        answer.is_ok()
    });
    let confirmed = futures::future::join_all(calls).await;
    confirmed.len() == others.len() && confirmed.into_iter().all(|ok| ok)
}

/// Serves [`method::SYNC`]: a linearizable read of the volume's entry
/// applies the log up to it; then the commands this host admitted before
/// it finish (at most [`iscsi::scsi::SETTLE_LIMIT`]), so none the change
/// forbids lands after the change is answered.
pub async fn handle(node: Arc<Node>, request: &wire::Request) -> Result<bytes::Bytes, wire::RemoteError> {
    let volume: String = wire::decode_request(request)?;
    let services = node
        .services()
        .ok_or_else(|| wire::RemoteError::new(wire::ErrorCode::Unavailable, "the catalog is not open yet"))?;
    services
        .catalog
        .reservations
        .get(&volume)
        .await
        .map_err(|error| wire::RemoteError::new(wire::ErrorCode::Unavailable, error.to_string()))?;
    if let Some(unit) = node.targets.unit(&volume) {
        if !unit.settle_admitted(iscsi::scsi::SETTLE_LIMIT).await {
            return Err(wire::RemoteError::new(
                wire::ErrorCode::Unavailable,
                "commands admitted before the reservation change are still under way",
            ));
        }
    }
    Ok(wire::encode(&()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_lease_runs_from_when_the_read_was_sent() {
        let lease = Lease::default();
        assert!(!lease.held(), "never confirmed");
        let sent = Instant::now();
        tokio::time::advance(Duration::from_secs(1)).await;
        lease.confirm(sent);
        assert!(lease.held());
        // An older read's answer arriving late does not move it back.
        lease.confirm(sent - Duration::from_millis(1));
        tokio::time::advance(LEASE - Duration::from_millis(1001)).await;
        assert!(lease.held(), "held until LEASE after the send");
        tokio::time::advance(Duration::from_millis(2)).await;
        assert!(!lease.held(), "lost LEASE after the send, not after the answer");
        lease.confirm(Instant::now());
        assert!(lease.held());
    }
}
