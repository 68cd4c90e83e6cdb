//! Volumes and the iSCSI target service on a node.
//!
//! - Every host with the `target` role listens for iSCSI on its address and
//!   `iscsi_port` (node.toml) and serves every target in the catalog: each
//!   LUN is a volume, its I/O goes to the volume's objects (directly when
//!   this host owns the object, else through the block client API to the
//!   owner). SendTargets lists every live host's portal, with the host id
//!   as portal group tag and relative target port.
//! - Volumes: `ceil(size / object_size)` objects named `<volume>.<index>`,
//!   created before the volume's record (a failed create removes them).
//!   Growing creates the missing objects, then records the new size.
//! - The catalog is watched: targets, LUNs and sizes follow it; a logical
//!   unit keeps its reservations and unit attentions across refreshes.
//! - A SANITIZE OVERWRITE writes no faster than `sanitize_mib_per_second`
//!   (node.toml), so it leaves disks and links to other volumes.
//! - An I/O whose object no host answers for (its owner's host died and no
//!   other has taken it over yet), or whose owner has no copy available
//!   (every copy's host is away), ends with `VolumeError::Later`: the
//!   logical unit holds the command and tries it again for up to
//!   `io_hold_secs` (node.toml; `LogicalUnit::with_io_hold`) instead of
//!   answering NOT READY at once. A compare and write that may have reached
//!   a copy ends `Unavailable` instead.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use catalog::{ChapRecord, Policy, TargetRecord, VolumeRecord};
use futures::future::BoxFuture;
use iscsi::scsi::{BlockDevice, IoError, IoResult, LogicalUnit};
use iscsi::target::{Chap, Portal, Registry, Target};
use serde::{Deserialize, Serialize};
use volume::{Layout, ObjectIo, Volume, VolumeError};
use wire::tcp::TcpTransport;

use crate::balance;
use crate::daemon::Node;
use crate::storage::{self, ClientError, IoReply, IoRequest, ObjectClient, Ownership};

/// The default size of a volume's backend objects (the spec's 256 GiB).
pub const DEFAULT_OBJECT_SIZE: u64 = 256 << 30;
const REFRESH_INTERVAL: Duration = Duration::from_secs(2);
const REBALANCE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an I/O forwarded to an object's owner checks whether the
/// catalog names another owner (`serve`).
const OWNER_CHECK: Duration = Duration::from_millis(250);
/// How long a compare and write forwarded to an object's owner still waits
/// for its answer once the catalog names another owner (`serve`).
const COMPARE_GRACE: Duration = Duration::from_secs(2);

/// The target service of one host.
pub struct TargetService {
    pub registry: Arc<Registry>,
    /// What the discovery VIP serves while this host owns it: the same
    /// targets, the VIP as their portal, and each normal login redirected
    /// to the host that owns the target (`crate::vip`).
    pub vip_registry: Arc<Registry>,
    /// `ip:port` this host serves iSCSI on (none without the target role).
    pub address: Option<String>,
    /// Whether this host may vouch for its copy of the shared reservations.
    pub lease: crate::reservations::Lease,
    units: Mutex<HashMap<String, Unit>>,
}

/// A volume and the logical unit serving it (kept across refreshes: the
/// unit holds reservations and unit attentions).
type Unit = (Arc<Volume>, Arc<LogicalUnit>);

impl TargetService {
    pub fn new(node_id: u64, address: Option<String>) -> TargetService {
        TargetService {
            registry: Arc::new(Registry::new((node_id & 0xffff) as u16)),
            vip_registry: Arc::new(Registry::redirecting_only(crate::vip::VIP_PORTAL_GROUP)),
            address,
            lease: crate::reservations::Lease::default(),
            units: Mutex::new(HashMap::new()),
        }
    }

    /// The logical unit serving `volume` on this host, if any.
    pub fn unit(&self, volume: &str) -> Option<Arc<LogicalUnit>> {
        self.units.lock().expect("units").get(volume).map(|(_, unit)| unit.clone())
    }
}

/// Object I/O for volumes: local when this host owns the object.
struct NodeObjects {
    node: Weak<Node>,
    clients: Mutex<HashMap<String, Arc<Forwarder>>>,
}

/// Sends one object's I/O to its owner when another host owns it.
struct Forwarder {
    client: ObjectClient<TcpTransport>,
    /// The owner, and its ownership, this host's catalog named when the
    /// client was last aimed from it (none: never, or the client lost its
    /// way since). The client follows redirects on its own; it is aimed
    /// anew only when the catalog names another owner or epoch, so an owner
    /// cut off from the network is not asked again once it is replaced.
    /// Aimed under this lock, so the owner recorded is the one the client
    /// was aimed at last.
    aimed: Mutex<Option<(u64, Ownership)>>,
}

impl Forwarder {
    /// Aims the client at `owner` (not this host) at `ownership`, the
    /// catalog's, if it was not aimed there already.
    fn aim(&self, node: &Node, owner: u64, ownership: Ownership) {
        let mut aimed = self.aimed.lock().expect("aimed lock");
        if *aimed == Some((owner, ownership)) || owner == node.config.node_id {
            return;
        }
        // An owner whose address is not known yet: aimed once it is.
        if let Some(address) = storage::host_address(node, owner) {
            self.client.aim_at(Some((address, ownership)));
            *aimed = Some((owner, ownership));
        }
    }

    /// The client found no host serving the object and starts over from
    /// the first host next time: aimed from the catalog again, then.
    fn lost(&self) {
        *self.aimed.lock().expect("aimed lock") = None;
    }
}

fn unavailable(object: &str, reason: impl ToString) -> VolumeError {
    VolumeError::Unavailable { object: object.to_string(), reason: reason.to_string() }
}

impl NodeObjects {
    fn call(&self, io: IoRequest, data: Bytes) -> BoxFuture<'static, Result<Bytes, VolumeError>> {
        let node = self.node.upgrade();
        let name = io.name().to_string();
        let client = node.as_ref().map(|node| {
            let mut clients = self.clients.lock().expect("clients");
            clients
                .entry(name.clone())
                .or_insert_with(|| {
                    let hosts: Vec<String> =
                        storage::hosts_by_id(node).values().map(|host| host.address.clone()).collect();
                    let client = ObjectClient::new(node.transport.clone(), hosts, name.clone());
                    Arc::new(Forwarder { client, aimed: Mutex::new(None) })
                })
                .clone()
        });
        Box::pin(async move {
            let node = node.ok_or_else(|| unavailable(&name, "the node is stopping"))?;
            let forwarder = client.expect("a client when the node is up");
            serve(&node, &forwarder, &io, &data).await
        })
    }
}

/// `io`, here when this host owns the object, else at its owner. When no
/// host serves the object now, or no copy of it is available, the error is
/// [`VolumeError::Later`] (the logical unit holds the command and tries it
/// again, `io_hold_secs`), unless the request may have been carried out in
/// part (a compare and write).
async fn serve(node: &Arc<Node>, forwarder: &Forwarder, io: &IoRequest, data: &Bytes) -> Result<Bytes, VolumeError> {
    let client = &forwarder.client;
    let name = io.name().to_string();
    let later = |reason: String| match io.compares() {
        true => unavailable(&name, reason),
        false => VolumeError::Later { object: name.clone(), reason },
    };
    // Owned here: served on this host, with no owner looked up.
    match storage::serve_here(node, io.clone(), data.clone()).await {
        Ok((IoReply::Done | IoReply::Data, out)) => return Ok(out),
        Ok((IoReply::Error(reason), _)) => return Err(unavailable(&name, reason)),
        Ok((IoReply::NoSpace(reason), _)) => return Err(VolumeError::NoSpace { object: name, reason }),
        Ok((IoReply::Unavailable(reason), _)) => return Err(later(reason)),
        // Owned elsewhere, or deposed meanwhile: to the owner.
        Ok((IoReply::NotOwner { .. } | IoReply::Unknown, _)) | Err(_) => {}
    }
    node.storage.note_forwarded(&name, io.compares());
    // The same request, to the owner the catalog names (the client follows
    // redirects from there); its answer as it comes, unless the catalog
    // names another owner meanwhile. An owner cut off from the network
    // answers nothing, and the call would wait out its whole I/O timeout
    // though a new owner serves within seconds: the I/O is then held and
    // tried again, at the new owner. The request is given up on only while
    // its attempt waits at an owner epoch before the new owner's (at a
    // replaced owner, or asking which host owns the object): one sent on to
    // the new owner could still be carried out there after the retry, and
    // over writes that came after it. Giving up on an attempt at a replaced
    // owner is safe: the new owner holds the I/O sent to it until it has
    // opened the object, which fences every component it reaches against
    // the replaced owner first, so a write that owner still carries out
    // lands on a component before that fence (the retry brings the same
    // data), or on one the new owner could not reach, which a resync brings
    // back to the new owner's writes when it returns. Should the attempt
    // reach that host even long after (queued on the connection to it), it
    // is carried out only at the epoch it was sent for, which that host no
    // longer holds. A compare and write, which may have written, is given
    // up on `COMPARE_GRACE` after the change at the earliest (a live former
    // owner answers it within moments: done, or deposed before it wrote,
    // and the client takes it to the new owner); it then ends with its
    // outcome unknown (`Unavailable`, as when its call times out) rather
    // than wait out the call's timeout.
    let asked = storage::catalog_owner_past_hand_over(node, &name).await;
    match asked {
        // Named here, yet not served here: being opened again after a
        // failed open, or deposed here and the catalog not yet caught up,
        // or handed over to a host that did not take it within the hold.
        // Held (a compare and write, which the logical unit does not hold,
        // ends NOT READY: sent on, it would go to the client's earlier
        // owner, perhaps one cut off, and wait out the I/O timeout there).
        Some((owner, _)) if owner == node.config.node_id => {
            return Err(later(format!("host {owner} (this host) is named its owner but does not serve it yet")))
        }
        Some((owner, ownership)) => forwarder.aim(node, owner, ownership),
        None => {}
    }
    // The owner epoch the request's attempt waits at now.
    let at = AtomicU64::new(0);
    let call = client.call_noting(io.clone(), data, Some(&at));
    let answer = match asked {
        Some((asked, _)) => {
            tokio::pin!(call);
            let mut check = tokio::time::interval(OWNER_CHECK);
            let mut changed_at = None;
            loop {
                tokio::select! {
                    answer = &mut call => break answer,
                    _ = check.tick() => match storage::catalog_owner(node, &name) {
                        Some((owner, ownership)) if owner != asked => {
                            forwarder.aim(node, owner, ownership);
                            let changed_at = *changed_at.get_or_insert_with(tokio::time::Instant::now);
                            // An attempt at the new owner's epoch (or a
                            // later one) is waited for.
                            if at.load(Ordering::Relaxed) >= ownership.epoch
                                || io.compares() && changed_at.elapsed() < COMPARE_GRACE
                            {
                                continue;
                            }
                            metrics::counter!("node_forwarded_io_abandoned_total").increment(1);
                            let reason = format!("its owner changed from host {asked} to host {owner} while it waited");
                            return Err(match io.compares() {
                                true => unavailable(&name, format!("{reason}; whether it wrote is unknown")),
                                false => VolumeError::Later { object: name.clone(), reason },
                            });
                        }
                        Some((owner, ownership)) => forwarder.aim(node, owner, ownership),
                        None => {}
                    },
                }
            }
        }
        _ => call.await,
    };
    answer.map_err(|error| match error {
        ClientError::NoSpace(reason) => VolumeError::NoSpace { object: name.clone(), reason },
        ClientError::Failed(reason) => unavailable(&name, reason),
        ClientError::Unavailable(reason) => later(reason),
        // No host serves the object: its owner is gone and no other has
        // taken it over yet. Nothing was carried out that a second try
        // could not repeat (a compare and write that may have been is
        // `Failed`).
        ClientError::Unreachable(reason) => {
            forwarder.lost();
            VolumeError::Later { object: name.clone(), reason }
        }
    })
}

impl ObjectIo for NodeObjects {
    fn compare_and_write(
        &self,
        object: &str,
        offset: u64,
        expected: Bytes,
        new: Bytes,
    ) -> BoxFuture<'static, Result<Option<u64>, VolumeError>> {
        let request = IoRequest::CompareAndWrite { name: object.to_string(), offset, expected: expected.len() as u64 };
        let call = self.call(request, Bytes::from([&expected[..], &new[..]].concat()));
        let name = object.to_string();
        Box::pin(async move {
            let answer = call.await?;
            storage::compared(&answer).map_err(|reason| VolumeError::Failed { object: name, reason })
        })
    }

    fn read(&self, object: &str, offset: u64, length: u64) -> BoxFuture<'static, Result<Bytes, VolumeError>> {
        self.call(IoRequest::Read { name: object.to_string(), offset, length }, Bytes::new())
    }

    fn write(&self, object: &str, offset: u64, data: Bytes) -> BoxFuture<'static, Result<(), VolumeError>> {
        let call = self.call(IoRequest::Write { name: object.to_string(), offset }, data);
        Box::pin(async move { call.await.map(|_| ()) })
    }

    fn unmap(&self, object: &str, offset: u64, length: u64) -> BoxFuture<'static, Result<(), VolumeError>> {
        let call = self.call(IoRequest::Unmap { name: object.to_string(), offset, length }, Bytes::new());
        Box::pin(async move { call.await.map(|_| ()) })
    }

    fn flush(&self, object: &str) -> BoxFuture<'static, Result<(), VolumeError>> {
        let call = self.call(IoRequest::Flush { name: object.to_string() }, Bytes::new());
        Box::pin(async move { call.await.map(|_| ()) })
    }

    fn erase_key(&self, object: &str) -> BoxFuture<'static, Result<(), VolumeError>> {
        let call = self.call(IoRequest::EraseKey { name: object.to_string() }, Bytes::new());
        Box::pin(async move { call.await.map(|_| ()) })
    }

    fn provisioning(
        &self,
        object: &str,
        offset: u64,
        length: u64,
    ) -> BoxFuture<'static, Result<(bool, u64), VolumeError>> {
        let name = object.to_string();
        let call = self.call(IoRequest::Provisioning { name: name.clone(), offset, length }, Bytes::new());
        Box::pin(async move {
            let data = call.await?;
            let answer = storage::Provisioned::decode(&data)
                .ok_or_else(|| VolumeError::Failed { object: name, reason: "bad provisioning answer".into() })?;
            Ok((answer.mapped, answer.bytes))
        })
    }
}

/// A volume as a SCSI block device: 512-byte logical blocks over the
/// objects' 4 KiB blocks.
struct VolumeDevice {
    volume: Arc<Volume>,
    /// Logical blocks a write covers whole to cost no read-modify-write
    /// of more than itself: an erasure-coded volume's stripe (its data
    /// chunks), when stripes line up across objects; else a block.
    stripe: u32,
    /// Its objects are encrypted at rest (SANITIZE CRYPTO ERASE is offered).
    encrypted: bool,
}

impl VolumeDevice {
    fn new(volume: Arc<Volume>, record: &VolumeRecord) -> VolumeDevice {
        let block = volume::BLOCK / volume::SECTOR;
        let stripe = match storage::layout(record.policy) {
            Some(layout) => {
                let bytes = layout.stripe_blocks() * volume::BLOCK;
                if record.object_size.is_multiple_of(bytes) {
                    bytes / volume::SECTOR
                } else {
                    block
                }
            }
            None => block,
        };
        VolumeDevice { volume, stripe: stripe as u32, encrypted: record.encrypted }
    }
}

fn io_error(error: VolumeError) -> IoError {
    match &error {
        // Tried again (held) by the logical unit: one line per try would
        // flood the log.
        VolumeError::Later { .. } => tracing::debug!(%error, "volume I/O cannot be served yet"),
        _ => tracing::warn!(%error, "volume I/O failed"),
    }
    match error {
        VolumeError::Unavailable { .. } => IoError::Unavailable(error.to_string()),
        VolumeError::Later { .. } => IoError::Later(error.to_string()),
        VolumeError::NoSpace { .. } => IoError::NoSpace(error.to_string()),
        VolumeError::Invalid(_) | VolumeError::Failed { .. } => IoError::Medium(error.to_string()),
    }
}

impl BlockDevice for VolumeDevice {
    fn block_size(&self) -> u32 {
        volume::SECTOR as u32
    }

    fn blocks(&self) -> u64 {
        self.volume.size() / volume::SECTOR
    }

    fn read(&self, lba: u64, count: u32) -> BoxFuture<'_, IoResult<Bytes>> {
        Box::pin(async move {
            self.volume.read(lba * volume::SECTOR, u64::from(count) * volume::SECTOR).await.map_err(io_error)
        })
    }

    fn write(&self, lba: u64, data: Bytes) -> BoxFuture<'_, IoResult<()>> {
        Box::pin(async move { self.volume.write(lba * volume::SECTOR, data).await.map_err(io_error) })
    }

    fn unmap(&self, lba: u64, count: u64) -> BoxFuture<'_, IoResult<()>> {
        Box::pin(async move { self.volume.unmap(lba * volume::SECTOR, count * volume::SECTOR).await.map_err(io_error) })
    }

    fn flush(&self) -> BoxFuture<'_, IoResult<()>> {
        Box::pin(async move { self.volume.flush().await.map_err(io_error) })
    }

    fn granularity(&self) -> u32 {
        (volume::BLOCK / volume::SECTOR) as u32
    }

    fn stripe(&self) -> u32 {
        self.stripe
    }

    /// An erasure-coded stripe of a power-of-two size (raid5:2+1, 128 KiB;
    /// 4+1 and 4+2, 256 KiB) is the physical block: writing less of it
    /// costs a read-modify-write, as a 512e disk's 4 KiB sector does.
    /// Otherwise one logical block, though a volume's 4 KiB block is
    /// read-modify-write too: with 1 < LBPPB <= 128, libiscsi's
    /// GetLBAStatus.UnmapSingle wants the first LBA status descriptor at
    /// the next physical block instead of at the requested LBA, which
    /// SBC-4 (and QEMU's iSCSI driver) require.
    fn physical_block(&self) -> u32 {
        if self.stripe > self.granularity() && self.stripe.is_power_of_two() {
            self.stripe
        } else {
            1
        }
    }

    fn encrypted(&self) -> bool {
        self.encrypted
    }

    /// At each object's owner, which holds back the object's writes while
    /// it records the new key: whichever host the initiators use, each
    /// write is sealed under the old key or the new one.
    fn crypto_erase(&self) -> BoxFuture<'_, IoResult<()>> {
        Box::pin(async move {
            let started = std::time::Instant::now();
            let objects = self.volume.layout().objects.len();
            self.volume.erase_keys().await.map_err(io_error)?;
            tracing::info!(objects, elapsed_ms = started.elapsed().as_millis() as u64, "volume keys erased");
            Ok(())
        })
    }

    /// At each object's owner: atomic whichever host the initiators use.
    fn compare_and_write(&self, lba: u64, expected: Bytes, new: Bytes) -> BoxFuture<'_, IoResult<Option<u64>>> {
        Box::pin(
            async move { self.volume.compare_and_write(lba * volume::SECTOR, expected, new).await.map_err(io_error) },
        )
    }

    fn provisioning(&self, lba: u64) -> BoxFuture<'_, IoResult<(bool, u64)>> {
        Box::pin(async move {
            let (mapped, bytes) = self.volume.provisioning(lba * volume::SECTOR).await.map_err(io_error)?;
            Ok((mapped, bytes / volume::SECTOR))
        })
    }

    /// One object write is all-or-nothing: the largest power of two of
    /// sectors that divides the object size never straddles two objects.
    fn atomic_blocks(&self) -> u32 {
        let sectors = self.volume.layout().object_size / volume::SECTOR;
        1u64.checked_shl(sectors.trailing_zeros()).unwrap_or(u64::MAX).min(u64::from(u32::MAX)) as u32
    }
}

fn layout(record: &VolumeRecord) -> Layout {
    Layout { size: record.size_bytes, object_size: record.object_size, objects: record.objects.clone() }
}

/// Starts the listener and the catalog watch (hosts with the target role).
pub fn start(node: Arc<Node>) {
    let Some(address) = node.targets.address.clone() else { return };
    let registry = node.targets.registry.clone();
    let threads = node.config.iscsi_threads.unwrap_or_else(crate::storage::cores);
    tokio::spawn(async move {
        let threads = match iscsi::target::ConnectionThreads::start(threads) {
            Ok(threads) => threads,
            Err(error) => return tracing::error!(%error, "cannot start the iSCSI connection threads"),
        };
        match tokio::net::TcpListener::bind(&address).await {
            Ok(listener) => {
                tracing::info!(%address, "iSCSI target service listening");
                threads.serve(registry, listener).await;
            }
            Err(error) => tracing::error!(%address, %error, "cannot listen for iSCSI"),
        }
    });
    tokio::spawn(crate::reservations::keep_lease(node.clone()));
    tokio::spawn(watch(node));
}

async fn watch(node: Arc<Node>) {
    let Some(services) = node.services() else { return };
    let mut volumes = services.catalog.volumes.changes();
    let mut targets = services.catalog.targets.changes();
    let mut hosts = services.catalog.watch_hosts();
    let mut vip = services.catalog.vip.changes();
    let mut shutdown = node.shutdown_signal();
    loop {
        refresh(&node);
        // Hand off the targets this host owns beyond its share, claim
        // those whose owner left (bounded: a slow log must not hold up
        // the refreshes).
        match tokio::time::timeout(REBALANCE_TIMEOUT, rebalance(&node, false)).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::warn!(%error, "cannot balance target owners"),
            Err(_) => tracing::warn!("balancing target owners timed out; trying again later"),
        }
        tokio::select! {
            _ = vip.changed() => {}
            _ = volumes.changed() => {}
            _ = targets.changed() => {}
            _ = hosts.changed() => {}
            _ = tokio::time::sleep(REFRESH_INTERVAL) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Brings the registry in line with the catalog.
pub fn refresh(node: &Arc<Node>) {
    let Some(services) = node.services() else { return };
    let volumes: BTreeMap<String, VolumeRecord> =
        services.catalog.volumes.entries_local().into_iter().map(|(name, record, _)| (name, record)).collect();
    let records: Vec<TargetRecord> =
        services.catalog.targets.entries_local().into_iter().map(|(_, record, _)| record).collect();
    let mut units = node.targets.units.lock().expect("units");
    units.retain(|name, _| volumes.contains_key(name));
    for (name, record) in &volumes {
        match units.get(name) {
            Some((volume, _)) => {
                if volume.layout() != layout(record) {
                    if let Err(error) = volume.set_layout(layout(record)) {
                        tracing::error!(volume = name, %error, "cannot take the volume's new layout");
                    }
                }
            }
            None => {
                let objects = Arc::new(NodeObjects { node: Arc::downgrade(node), clients: Mutex::new(HashMap::new()) });
                match Volume::new(layout(record), objects) {
                    Ok(volume) => {
                        let volume = Arc::new(volume);
                        let device = Arc::new(VolumeDevice::new(volume.clone(), record));
                        let sanitize_rate =
                            std::num::NonZeroU64::new(node.config.sanitize_mib_per_second.saturating_mul(1 << 20));
                        let reservations = crate::reservations::CatalogReservations::new(node, name);
                        let unit = LogicalUnit::new(device, record.id, format!("{:016x}", record.id))
                            .with_io_hold(Duration::from_secs(node.config.io_hold_secs))
                            .with_sanitize_rate(sanitize_rate)
                            .with_reservation_store(Arc::new(reservations));
                        let unit = Arc::new(unit);
                        units.insert(name.clone(), (volume, unit));
                    }
                    Err(error) => tracing::error!(volume = name, %error, "volume record is not usable"),
                }
            }
        }
    }
    let targets: Vec<Target> = records
        .iter()
        .map(|record| Target {
            name: record.name.clone(),
            alias: record.luns.first().map(|(_, volume)| volume.clone()).unwrap_or_default(),
            luns: record
                .luns
                .iter()
                .filter_map(|(lun, volume)| units.get(volume).map(|(_, unit)| (*lun, unit.clone())))
                .collect(),
            chap: record.chap.as_ref().map(|chap| Chap {
                user: chap.user.clone(),
                secret: chap.secret.clone(),
                mutual: chap.mutual_user.clone().zip(chap.mutual_secret.clone()),
            }),
            initiators: record.initiators.clone(),
        })
        .collect();
    drop(units);
    node.targets.registry.set_targets(targets.clone());
    let hosts = storage::hosts_by_id(node);
    let portals: BTreeMap<u64, Portal> = hosts
        .values()
        .filter(|host| host.state == catalog::HostState::Up)
        .filter_map(|host| {
            let portal = Portal { address: host.iscsi_address.clone()?, group: (host.id & 0xffff) as u16 };
            Some((host.id, portal))
        })
        .collect();
    node.targets.registry.set_portals(portals.values().cloned().collect());
    // The VIP: discovery lists it as the one portal; a login is sent on to
    // the target's host.
    let redirects = records
        .iter()
        .filter_map(|record| {
            let host = record
                .owner
                .filter(|owner| portals.contains_key(owner))
                .or_else(|| target_host(&record.name, portals.keys().copied()))?;
            Some((record.name.clone(), portals[&host].clone()))
        })
        .collect();
    // Redirects first: a target the VIP knows always has one (or is
    // refused as unavailable), never a session at the VIP.
    node.targets.vip_registry.set_redirects(redirects);
    node.targets.vip_registry.set_targets(targets);
    let vip = services.catalog.vip.get_local().map(|(vip, _)| vip.address);
    let group = node.targets.vip_registry.portal_group();
    node.targets.vip_registry.set_portals(vip.map(|address| Portal { address, group }).into_iter().collect());
}

/// Where a login through the VIP goes for a target whose recorded owner is
/// not up (until the balance gives it a new one): of the live target
/// hosts, the one that scores highest for the name (rendezvous hashing:
/// stable, spread across hosts).
pub fn target_host(target: &str, hosts: impl Iterator<Item = u64>) -> Option<u64> {
    fn mix(mut value: u64) -> u64 {
        // splitmix64's finalizer
        value = (value ^ (value >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        value = (value ^ (value >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        value ^ (value >> 31)
    }
    let name = target
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3));
    hosts.max_by_key(|host| (mix(name ^ mix(*host)), *host))
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NewVolume {
    pub name: String,
    pub size_bytes: u64,
    #[serde(default = "default_policy")]
    pub policy: String,
    #[serde(default)]
    pub object_size: Option<u64>,
    /// Encrypt its objects at rest, each with a key of its own (SANITIZE
    /// CRYPTO ERASE then replaces the keys).
    #[serde(default)]
    pub encrypted: bool,
}

fn default_policy() -> String {
    "none".into()
}

#[derive(Debug, thiserror::Error)]
pub enum VolumeOpError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Exists(String),
    #[error("{0}")]
    Unavailable(String),
}

fn catalog_error(error: impl ToString) -> VolumeOpError {
    VolumeOpError::Unavailable(error.to_string())
}

fn create_error(error: storage::CreateError) -> VolumeOpError {
    match error {
        storage::CreateError::Invalid(reason) => VolumeOpError::Invalid(reason),
        storage::CreateError::Exists(reason) => VolumeOpError::Exists(format!("object {reason} exists")),
        storage::CreateError::Unavailable(reason) => VolumeOpError::Unavailable(reason),
    }
}

/// Creates a volume: its objects, then its record.
pub async fn create_volume(node: &Arc<Node>, new: &NewVolume) -> Result<VolumeRecord, VolumeOpError> {
    storage::check_name(&new.name).map_err(VolumeOpError::Invalid)?;
    let policy = Policy::parse(&new.policy).map_err(VolumeOpError::Invalid)?;
    let object_size = new.object_size.unwrap_or(DEFAULT_OBJECT_SIZE).min(new.size_bytes.max(volume::BLOCK));
    let block = volume::BLOCK;
    if new.size_bytes == 0 || !new.size_bytes.is_multiple_of(block) || !object_size.is_multiple_of(block) {
        return Err(VolumeOpError::Invalid(format!(
            "size {} and object size {object_size} must be positive multiples of {block} bytes",
            new.size_bytes
        )));
    }
    let count = Layout::objects_for(new.size_bytes, object_size);
    if count > 100_000 {
        return Err(VolumeOpError::Invalid(format!("{count} objects is too many; use a larger object size")));
    }
    let services = node.services().ok_or_else(|| VolumeOpError::Unavailable("the catalog is not open yet".into()))?;
    if services.catalog.volumes.get_local(&new.name).is_some() {
        return Err(VolumeOpError::Exists(format!("volume {:?} exists", new.name)));
    }
    let mut objects: Vec<String> = Vec::new();
    for index in 0..count {
        let name = format!("{}.{index}", new.name);
        if let Err(error) = storage::create(node, &name, policy, object_size, new.encrypted).await {
            for created in &objects {
                let _ = storage::remove(node, created).await;
            }
            return Err(create_error(error));
        }
        objects.push(name);
    }
    let record = VolumeRecord {
        id: rand::random::<u64>() >> 8,
        name: new.name.clone(),
        size_bytes: new.size_bytes,
        object_size,
        policy,
        objects: objects.clone(),
        created_ms: storage::now_ms(),
        encrypted: new.encrypted,
    };
    let stored = services
        .catalog
        .update_volume(&new.name, |current| if current.is_some() { None } else { Some(Some(record.clone())) })
        .await
        .map_err(catalog_error)?;
    if stored.as_ref().map(|stored| stored.id) != Some(record.id) {
        for created in &objects {
            let _ = storage::remove(node, created).await;
        }
        return Err(VolumeOpError::Exists(format!("volume {:?} exists", new.name)));
    }
    tracing::info!(volume = new.name, size = new.size_bytes, objects = count, %policy, "volume created");
    refresh(node);
    Ok(record)
}

/// Grows a volume to `size_bytes` (never shrinks).
pub async fn grow_volume(node: &Arc<Node>, name: &str, size_bytes: u64) -> Result<VolumeRecord, VolumeOpError> {
    let services = node.services().ok_or_else(|| VolumeOpError::Unavailable("the catalog is not open yet".into()))?;
    let (current, _) = services
        .catalog
        .volumes
        .get(&name.to_string())
        .await
        .map_err(catalog_error)?
        .ok_or_else(|| VolumeOpError::NotFound(format!("no volume named {name:?}")))?;
    if size_bytes < current.size_bytes || !size_bytes.is_multiple_of(volume::BLOCK) {
        return Err(VolumeOpError::Invalid(format!(
            "a volume grows to a multiple of {} bytes no smaller than its {} bytes",
            volume::BLOCK,
            current.size_bytes
        )));
    }
    let count = Layout::objects_for(size_bytes, current.object_size) as usize;
    let mut objects = current.objects.clone();
    for index in objects.len()..count {
        let object = format!("{name}.{index}");
        match storage::create(node, &object, current.policy, current.object_size, current.encrypted).await {
            Ok(_) | Err(storage::CreateError::Exists(_)) => objects.push(object),
            Err(error) => return Err(create_error(error)),
        }
    }
    let updated = services
        .catalog
        .update_volume(name, |record| {
            let record = record?;
            let mut grown = record.clone();
            grown.size_bytes = size_bytes.max(record.size_bytes);
            if grown.objects.len() < objects.len() {
                grown.objects = objects.clone();
            }
            Some(Some(grown))
        })
        .await
        .map_err(catalog_error)?
        .ok_or_else(|| VolumeOpError::NotFound(format!("no volume named {name:?}")))?;
    tracing::info!(volume = name, size = size_bytes, "volume grown");
    refresh(node);
    Ok(updated)
}

/// Removes a volume no target uses, and its objects.
pub async fn remove_volume(node: &Arc<Node>, name: &str) -> Result<VolumeRecord, VolumeOpError> {
    let services = node.services().ok_or_else(|| VolumeOpError::Unavailable("the catalog is not open yet".into()))?;
    let users: Vec<String> = services
        .catalog
        .targets
        .entries_local()
        .into_iter()
        .filter(|(_, target, _)| target.luns.iter().any(|(_, volume)| volume == name))
        .map(|(target, _, _)| target)
        .collect();
    if !users.is_empty() {
        return Err(VolumeOpError::Invalid(format!(
            "volume {name:?} is a LUN of {}; remove those first",
            users.join(", ")
        )));
    }
    let mut removed = None;
    services
        .catalog
        .update_volume(name, |record| {
            removed = record.cloned();
            record.map(|_| None)
        })
        .await
        .map_err(catalog_error)?;
    let record = removed.ok_or_else(|| VolumeOpError::NotFound(format!("no volume named {name:?}")))?;
    for object in &record.objects {
        if let Err(error) = storage::remove(node, object).await {
            tracing::warn!(object, error, "object of a removed volume not deleted yet");
        }
    }
    // Its reservations go with it (a new volume of the name starts clean).
    if let Err(error) = services.catalog.reservations.delete(name.to_string()).await {
        tracing::warn!(volume = name, %error, "reservations of a removed volume not deleted");
    }
    refresh(node);
    Ok(record)
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NewTarget {
    pub name: String,
    /// LUN number and volume name.
    pub luns: Vec<(u64, String)>,
    #[serde(default)]
    pub chap: Option<ChapRecord>,
    #[serde(default)]
    pub initiators: Vec<String>,
    /// The site the target is affine to (owned by that site's hosts).
    #[serde(default)]
    pub site: Option<String>,
}

/// Checks an iSCSI name (RFC 7143 §4.2.7: iqn., eui. or naa. forms).
pub fn check_iscsi_name(name: &str) -> Result<(), String> {
    let ok = (name.starts_with("iqn.") || name.starts_with("eui.") || name.starts_with("naa."))
        && name.len() <= 223
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-.:".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not an iSCSI name: use iqn.YYYY-MM.reversed.domain[:name] in lowercase letters, digits, '-', '.', ':'"
        ))
    }
}

pub async fn create_target(node: &Arc<Node>, new: &NewTarget) -> Result<TargetRecord, VolumeOpError> {
    check_iscsi_name(&new.name).map_err(VolumeOpError::Invalid)?;
    let services = node.services().ok_or_else(|| VolumeOpError::Unavailable("the catalog is not open yet".into()))?;
    let mut numbers = std::collections::HashSet::new();
    for (lun, volume) in &new.luns {
        if *lun > 16383 || !numbers.insert(*lun) {
            return Err(VolumeOpError::Invalid(format!("LUN {lun} is out of range (0-16383) or given twice")));
        }
        if services.catalog.volumes.get_local(volume).is_none() {
            return Err(VolumeOpError::NotFound(format!("no volume named {volume:?}")));
        }
    }
    if let Some(chap) = &new.chap {
        if chap.secret.len() < 12 || chap.secret.len() > 16 * 1024 {
            return Err(VolumeOpError::Invalid("a CHAP secret must be 12 to 16384 characters".into()));
        }
    }
    if let Some(site) = &new.site {
        if services.catalog.sites.get_local(site).is_none()
            && !storage::hosts_by_id(node).values().any(|host| host.site.as_ref() == Some(site))
        {
            return Err(VolumeOpError::NotFound(format!("no site named {site:?} (no host is in it)")));
        }
    }
    let mut record = TargetRecord {
        name: new.name.clone(),
        luns: new.luns.clone(),
        chap: new.chap.clone(),
        initiators: new.initiators.clone(),
        created_ms: storage::now_ms(),
        owner: None,
        owner_epoch: 1,
        site: new.site.clone(),
    };
    // Its first owner: where the balance would put it now.
    let mut views = target_views(node);
    views.push(balance::Target { name: record.name.clone(), owner: None, site: record.site.clone() });
    record.owner = balance::plan(&owner_candidates(node), &views).get(&record.name).copied();
    let stored = services
        .catalog
        .update_target(&new.name, |current| if current.is_some() { None } else { Some(Some(record.clone())) })
        .await
        .map_err(catalog_error)?;
    if stored.as_ref().map(|stored| stored.created_ms) != Some(record.created_ms) || stored.as_ref() != Some(&record) {
        return Err(VolumeOpError::Exists(format!("target {:?} exists", new.name)));
    }
    refresh(node);
    Ok(record)
}

pub async fn remove_target(node: &Arc<Node>, name: &str) -> Result<TargetRecord, VolumeOpError> {
    let services = node.services().ok_or_else(|| VolumeOpError::Unavailable("the catalog is not open yet".into()))?;
    let mut removed = None;
    services
        .catalog
        .update_target(name, |record| {
            removed = record.cloned();
            record.map(|_| None)
        })
        .await
        .map_err(catalog_error)?;
    refresh(node);
    removed.ok_or_else(|| VolumeOpError::NotFound(format!("no target named {name:?}")))
}

/// A volume as `tessera volume ls` and `status` show it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub name: String,
    pub size_bytes: u64,
    pub policy: String,
    pub object_size: u64,
    pub objects: Vec<String>,
    /// The worst health of its objects.
    pub health: String,
    /// Its objects are encrypted at rest.
    #[serde(default)]
    pub encrypted: bool,
}

/// A target with the URLs initiators use.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TargetStatus {
    pub name: String,
    pub luns: Vec<(u64, String)>,
    pub chap: bool,
    pub portals: Vec<String>,
    /// `iscsi://<portal>/<name>/<lun>` for each portal and LUN.
    pub urls: Vec<String>,
    /// The host logins through the discovery VIP go to.
    #[serde(default)]
    pub owner: Option<u64>,
    #[serde(default)]
    pub owner_epoch: u64,
    /// The site the target is affine to.
    #[serde(default)]
    pub site: Option<String>,
}

pub fn volume_statuses(node: &Node) -> Vec<VolumeStatus> {
    let Some(services) = node.services() else { return Vec::new() };
    services
        .catalog
        .volumes
        .entries_local()
        .into_iter()
        .map(|(_, record, _)| {
            let healths: Vec<&'static str> = record
                .objects
                .iter()
                .filter_map(|object| services.catalog.objects.get_local(object).map(|(object, _)| object.health()))
                .collect();
            let health = if healths.len() < record.objects.len() {
                "missing objects"
            } else if healths.contains(&"unavailable") {
                "unavailable"
            } else if healths.contains(&"degraded") {
                "degraded"
            } else if healths.contains(&"resyncing") {
                "resyncing"
            } else {
                "healthy"
            };
            VolumeStatus {
                name: record.name.clone(),
                size_bytes: record.size_bytes,
                policy: record.policy.to_string(),
                object_size: record.object_size,
                objects: record.objects.clone(),
                health: health.into(),
                encrypted: record.encrypted,
            }
        })
        .collect()
}

pub fn target_statuses(node: &Node) -> Vec<TargetStatus> {
    let Some(services) = node.services() else { return Vec::new() };
    let portals: Vec<String> = storage::hosts_by_id(node)
        .values()
        .filter(|host| host.state == catalog::HostState::Up)
        .filter_map(|host| host.iscsi_address.clone())
        .collect();
    services
        .catalog
        .targets
        .entries_local()
        .into_iter()
        .map(|(_, record, _)| TargetStatus {
            urls: portals
                .iter()
                .flat_map(|portal| record.luns.iter().map(move |(lun, _)| (portal, lun)))
                .map(|(portal, lun)| format!("iscsi://{portal}/{}/{lun}", record.name))
                .collect(),
            name: record.name.clone(),
            luns: record.luns.clone(),
            chap: record.chap.is_some(),
            portals: portals.clone(),
            owner: record.owner,
            owner_epoch: record.owner_epoch,
            site: record.site.clone(),
        })
        .collect()
}

/// The target service's counters as metrics (iscsi_*).
pub fn record_metrics(node: &Node) {
    use std::sync::atomic::Ordering::Relaxed;
    let counters = &node.targets.registry.counters;
    metrics::gauge!("iscsi_sessions").set(counters.sessions.load(Relaxed) as f64);
    metrics::counter!("iscsi_logins_total").absolute(counters.logins.load(Relaxed));
    metrics::counter!("iscsi_login_failures_total").absolute(counters.login_failures.load(Relaxed));
    metrics::counter!("iscsi_commands_total").absolute(counters.commands.load(Relaxed));
    metrics::counter!("iscsi_rejects_total").absolute(counters.rejects.load(Relaxed));
    metrics::counter!("iscsi_read_bytes_total").absolute(counters.read_bytes.load(Relaxed));
    metrics::counter!("iscsi_write_bytes_total").absolute(counters.write_bytes.load(Relaxed));
    let vip = &node.targets.vip_registry.counters;
    metrics::counter!("iscsi_vip_logins_redirected_total").absolute(vip.redirects.load(Relaxed));
    metrics::counter!("iscsi_vip_discovery_sessions_total").absolute(vip.logins.load(Relaxed));
}

/// Whether `host` serves targets now: up, with the target role and a
/// portal. Such hosts own targets, hold the VIP and apply reservation
/// changes before they are answered.
pub(crate) fn serves_targets(host: &catalog::HostRecord) -> bool {
    host.state == catalog::HostState::Up && host.roles.target && host.iscsi_address.is_some()
}

/// Live hosts that may own targets.
fn owner_candidates(node: &Node) -> Vec<balance::Host> {
    storage::hosts_by_id(node)
        .into_values()
        .filter(serves_targets)
        .map(|host| balance::Host { id: host.id, site: host.site })
        .collect()
}

fn target_views(node: &Node) -> Vec<balance::Target> {
    let Some(services) = node.services() else { return Vec::new() };
    services
        .catalog
        .targets
        .entries_local()
        .into_iter()
        .map(|(_, record, _)| balance::Target { name: record.name, owner: record.owner, site: record.site })
        .collect()
}

/// A change of a target's owner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerMove {
    pub target: String,
    pub from: Option<u64>,
    pub to: u64,
    pub epoch: u64,
}

/// Moves target owners to where the balance puts them. `all`: every move
/// (`tessera target balance`); otherwise only what this host decides: it
/// hands off targets it owns, and claims those whose owner is gone. Each
/// move is a compare-and-set with the owner epoch + 1, made only if the
/// record still has the owner the plan saw; I/O is not interrupted
/// (every target host serves every target), only where the VIP sends new
/// logins changes.
pub async fn rebalance(node: &Arc<Node>, all: bool) -> Result<Vec<OwnerMove>, VolumeOpError> {
    let services = node.services().ok_or_else(|| VolumeOpError::Unavailable("the catalog is not open yet".into()))?;
    let hosts = owner_candidates(node);
    let live: std::collections::BTreeSet<u64> = hosts.iter().map(|host| host.id).collect();
    let me = node.config.node_id;
    let views = target_views(node);
    let plan = balance::plan(&hosts, &views);
    let mut moves = Vec::new();
    for view in views {
        let Some(&to) = plan.get(&view.name) else { continue };
        let orphan = view.owner.is_none_or(|owner| !live.contains(&owner));
        if view.owner == Some(to) || !(all || view.owner == Some(me) || (orphan && to == me)) {
            continue;
        }
        let mut made = None;
        services
            .catalog
            .update_target(&view.name, |current| {
                made = None;
                let current = current?;
                if current.owner != view.owner {
                    return None;
                }
                let moved = TargetRecord { owner: Some(to), owner_epoch: current.owner_epoch + 1, ..current.clone() };
                made = Some(OwnerMove { target: view.name.clone(), from: view.owner, to, epoch: moved.owner_epoch });
                Some(Some(moved))
            })
            .await
            .map_err(catalog_error)?;
        if let Some(made) = made {
            tracing::info!(target = %made.target, from = ?made.from, to = made.to, epoch = made.epoch, "target owner moved");
            moves.push(made);
        }
    }
    if !moves.is_empty() {
        refresh(node);
    }
    Ok(moves)
}
