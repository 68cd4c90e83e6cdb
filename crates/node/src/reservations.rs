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
//! path. Not yet: a host that does not answer within [`SYNC_TIMEOUT`]
//! (cut off from the cluster) is not fenced; it goes on checking against
//! what it last applied.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::future::BoxFuture;
use iscsi::pr::{Attentions, Change, PrError, ReservationStore, Reservations};
use sharedlog::types::Position;

use crate::daemon::Node;

const UPDATE_ATTEMPTS_MAX: usize = 64;
/// How long a change waits for each other host to apply it.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(2);

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
                        self.remember(Some(version), reservations);
                        sync_others(&node, &self.volume).await;
                        return Ok(Ok(attentions));
                    }
                    Ok(Err(_)) => continue,
                    Err(error) => return Err(error.to_string()),
                }
            }
            Err(format!("gave up after {UPDATE_ATTEMPTS_MAX} conflicting reservation updates"))
        })
    }
}

/// Has every other live target host apply the volume's reservations up to
/// now (at once, each bounded by [`SYNC_TIMEOUT`]).
async fn sync_others(node: &Arc<Node>, volume: &str) {
    let others: Vec<(u64, String)> = crate::storage::hosts_by_id(node)
        .into_values()
        .filter(|host| host.id != node.config.node_id && crate::targets::serves_targets(host))
        .map(|host| (host.id, host.address))
        .collect();
    let calls = others.iter().map(|(id, address)| async move {
        let answer: Result<(), _> =
            wire::call(&node.transport, address, method::SYNC, &volume.to_string(), SYNC_TIMEOUT).await;
        if let Err(error) = answer {
            tracing::warn!(host = id, volume, %error, "a host did not confirm it applied a reservation change");
        }
    });
    futures::future::join_all(calls).await;
}

/// Serves [`method::SYNC`]: a linearizable read of the volume's entry
/// applies the log up to it.
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
    Ok(wire::encode(&()))
}
