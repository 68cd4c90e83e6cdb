//! The cluster's discovery VIP (issue 8; spec: iscsi.md, "Target service").
//!
//! - The VIP's address is the bootstrap setting `vip` (`ip:port`). The
//!   catalog's VIP record holds it with the host that owns it and an epoch.
//! - Every host with the target role watches the record and the host table.
//!   The owner keeps the VIP while its host is up. When it is not (or there
//!   is no owner yet), the eligible host (up, target role) with the lowest
//!   id other than the old owner takes it: compare-and-set on the record's
//!   version, epoch + 1. Only the winner of that race binds.
//! - The owner binds the address (with `vip_interface` in node.toml it first
//!   adds it to that interface, so the VIP can move between machines) and
//!   serves discovery there: SendTargets lists the VIP as every target's
//!   portal, and a normal login is redirected ("target moved temporarily")
//!   to the host that owns the target.
//! - An owner that sees the record name another host, finds its own host
//!   marked down, or has not completed a read of the record sent within
//!   the last [`LEASE`] unbinds, so a deposed or cut-off owner stops
//!   answering at the address.
//! - With `vip_interface` (an address that moves between machines) a new
//!   owner that took the VIP from another host waits [`LEASE`] plus one
//!   check before adding and binding it: by then the old owner has read
//!   the record naming the new one, or its lease has run out; either way it
//!   has let go, so two machines never answer at the address. Without an
//!   interface the address is bound on one machine's stack, where the
//!   kernel refuses a second bind (the new owner retries until the old
//!   one lets go), so no wait is needed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use catalog::{HostRecord, HostState, VipRecord};
use iscsi::target::{ConnectionThreads, Registry};
use tokio::task::JoinHandle;

use crate::daemon::Node;
use crate::targets::serves_targets;

/// The bootstrap setting naming the VIP's `ip:port`.
pub const VIP_SETTING: &str = "vip";
/// How often the record is read when nothing changes.
const CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// How long an owner keeps the VIP after sending the last read of the
/// record that succeeded.
pub const LEASE: Duration = Duration::from_secs(2);
const READ_TIMEOUT: Duration = Duration::from_secs(1);
/// The portal group tag SendTargets gives the VIP (the same whichever host
/// holds it, so initiators' records of it stay valid).
pub const VIP_PORTAL_GROUP: u16 = 0xffff;

/// The VIP as this host holds it.
struct Bound {
    address: String,
    /// The interface the address was added to (removed on unbind).
    interface: Option<String>,
    accept: JoinHandle<()>,
}

/// Starts the VIP watch on a host with the target role, when the cluster
/// has a VIP.
pub fn start(node: Arc<Node>) {
    if node.targets.address.is_none() {
        return;
    }
    let Some(address) = node.bootstrap.settings.get(VIP_SETTING).cloned() else { return };
    if address.parse::<std::net::SocketAddr>().is_err() {
        tracing::error!(%address, "setting {VIP_SETTING} is not an ip:port; no discovery VIP");
        return;
    }
    tokio::spawn(run(node, address));
}

/// Who should own the VIP, given the record's owner: the owner while it is
/// eligible, else the lowest eligible id other than it.
pub fn next_owner(current: Option<u64>, hosts: &[HostRecord]) -> Option<u64> {
    if let Some(owner) = current {
        if hosts.iter().any(|host| host.id == owner && serves_targets(host)) {
            return Some(owner);
        }
    }
    hosts.iter().filter(|host| serves_targets(host) && Some(host.id) != current).map(|host| host.id).min()
}

async fn run(node: Arc<Node>, configured: String) {
    let Some(services) = node.services() else { return };
    let threads = match ConnectionThreads::start(1) {
        Ok(threads) => Arc::new(threads),
        Err(error) => return tracing::error!(%error, "cannot start the VIP's connection thread"),
    };
    let mut changes = services.catalog.vip.changes();
    let mut hosts = services.catalog.watch_hosts();
    let mut shutdown = node.shutdown_signal();
    let mut bound: Option<Bound> = None;
    let mut last_read = Instant::now();
    let mut bind_after: Option<Instant> = None;
    loop {
        step(&node, &configured, &threads, &mut bound, &mut last_read, &mut bind_after).await;
        tokio::select! {
            _ = changes.changed() => {}
            _ = hosts.changed() => {}
            _ = tokio::time::sleep(CHECK_INTERVAL) => {}
            _ = shutdown.changed() => break,
        }
    }
    unbind(&mut bound).await;
}

async fn step(
    node: &Arc<Node>,
    configured: &str,
    threads: &Arc<ConnectionThreads>,
    bound: &mut Option<Bound>,
    last_read: &mut Instant,
    bind_after: &mut Option<Instant>,
) {
    let Some(services) = node.services() else { return };
    let me = node.config.node_id;
    // A linearizable read: an owner cut off from the log must not go on
    // answering at an address the cluster may have given to another host.
    // The lease counts from when the read was sent, and a bound owner's
    // read may not outlast the lease.
    let sent = Instant::now();
    let limit = match bound {
        Some(_) => READ_TIMEOUT.min(LEASE.saturating_sub(last_read.elapsed())).max(Duration::from_millis(10)),
        None => READ_TIMEOUT,
    };
    let record = match tokio::time::timeout(limit, services.catalog.vip.get()).await {
        Ok(Ok(record)) => {
            *last_read = sent;
            record
        }
        outcome => {
            if bound.is_some() && last_read.elapsed() >= LEASE {
                let error = match outcome {
                    Ok(Err(error)) => error.to_string(),
                    _ => "timed out".into(),
                };
                tracing::warn!(%error, "cannot read the catalog for the VIP's lease: giving the VIP up");
                unbind(bound).await;
            }
            return;
        }
    };
    let hosts: Vec<HostRecord> = crate::storage::hosts_by_id(node).into_values().collect();
    let me_up = hosts.iter().any(|host| host.id == me && host.state == HostState::Up);
    let current = record.as_ref().and_then(|(record, _)| record.owner);
    if current == Some(me) && me_up {
        let (record, version) = record.expect("an owner comes from a record");
        if record.address != configured {
            // The operator moved the VIP: the owner records the new address.
            // Unbound first: the update may take as long as the log does.
            unbind(bound).await;
            let moved = VipRecord { address: configured.to_string(), ..record.clone() };
            if let Ok(Ok(Ok(_))) =
                tokio::time::timeout(READ_TIMEOUT, services.catalog.vip.compare_and_set(Some(version), moved)).await
            {
                tracing::info!(from = %record.address, to = configured, "the VIP's address changed");
            }
            return;
        }
        if bind_after.is_some_and(|after| Instant::now() < after) {
            return;
        }
        *bind_after = None;
        bind(node, threads, bound, &record.address).await;
        return;
    }
    *bind_after = None;
    if bound.is_some() {
        tracing::info!(owner = ?current, "this host no longer owns the VIP: unbinding it");
        unbind(bound).await;
    }
    if !me_up || next_owner(current, &hosts) != Some(me) {
        return;
    }
    let (address, epoch, expected) = match &record {
        Some((record, version)) => (record.address.clone(), record.epoch + 1, Some(*version)),
        None => (configured.to_string(), 1, None),
    };
    let taken = VipRecord { address, owner: Some(me), epoch, since_ms: crate::storage::now_ms() };
    match services.catalog.vip.compare_and_set(expected, taken.clone()).await {
        Ok(Ok(_)) => {
            tracing::info!(address = %taken.address, epoch, previous = ?current, "took the discovery VIP");
            if current.is_some() && node.config.vip_interface.is_some() {
                // Wait out the old owner's lease (see the module's doc).
                *bind_after = Some(Instant::now() + LEASE + CHECK_INTERVAL);
                tracing::info!(wait = ?(LEASE + CHECK_INTERVAL), "waiting out the old owner's lease before binding");
                return;
            }
            bind(node, threads, bound, &taken.address).await;
        }
        Ok(Err(_)) => tracing::debug!("another host took the VIP first"),
        Err(error) => tracing::warn!(%error, "cannot take the VIP"),
    }
}

/// Binds `address` (once; a failed bind is retried on the next check).
async fn bind(node: &Arc<Node>, threads: &Arc<ConnectionThreads>, bound: &mut Option<Bound>, address: &str) {
    if bound.as_ref().is_some_and(|bound| bound.address == address) {
        return;
    }
    unbind(bound).await;
    let interface = node.config.vip_interface.clone();
    if let Some(interface) = &interface {
        if let Err(error) = interface_address(interface, address, true).await {
            return tracing::warn!(%address, interface, %error, "cannot add the VIP to the interface; retrying");
        }
    }
    match tokio::net::TcpListener::bind(address).await {
        Ok(listener) => {
            tracing::info!(%address, "discovery VIP bound");
            metrics::gauge!("iscsi_vip_bound").set(1.0);
            let registry: Arc<Registry> = node.targets.vip_registry.clone();
            let threads = threads.clone();
            let accept = tokio::spawn(async move { threads.serve(registry, listener).await });
            *bound = Some(Bound { address: address.to_string(), interface, accept });
        }
        Err(error) => {
            tracing::warn!(%address, %error, "cannot bind the VIP yet (its old owner may still hold it); retrying");
            if let Some(interface) = &interface {
                let _ = interface_address(interface, address, false).await;
            }
        }
    }
}

async fn unbind(bound: &mut Option<Bound>) {
    let Some(old) = bound.take() else { return };
    old.accept.abort();
    let _ = old.accept.await;
    if let Some(interface) = &old.interface {
        if let Err(error) = interface_address(interface, &old.address, false).await {
            tracing::warn!(address = %old.address, interface, %error, "cannot remove the VIP from the interface");
        }
    }
    metrics::gauge!("iscsi_vip_bound").set(0.0);
    tracing::info!(address = %old.address, "discovery VIP unbound");
}

/// Adds (or removes) the VIP's ip on `interface` with iproute2. Adding an
/// address already there, or removing one that is gone, succeeds.
async fn interface_address(interface: &str, address: &str, add: bool) -> Result<(), String> {
    let ip = address.parse::<std::net::SocketAddr>().map_err(|error| error.to_string())?.ip();
    let prefix = if ip.is_ipv4() { 32 } else { 128 };
    let output = tokio::process::Command::new("ip")
        .args(["addr", if add { "add" } else { "del" }, &format!("{ip}/{prefix}"), "dev", interface])
        .output()
        .await
        .map_err(|error| format!("cannot run ip: {error}"))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let already = if add { stderr.contains("File exists") } else { stderr.contains("Cannot assign") };
    if output.status.success() || already {
        Ok(())
    } else {
        Err(stderr.trim().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use catalog::Roles;

    fn host(id: u64, state: HostState, target: bool) -> HostRecord {
        HostRecord {
            id,
            name: format!("host-{id}"),
            address: String::new(),
            admin_address: String::new(),
            roles: Roles { target, ..Roles::default() },
            site: None,
            fault_domain: None,
            state,
            epoch: 1,
            incarnation: 1,
            component_addresses: Vec::new(),
            iscsi_address: target.then(|| format!("127.0.0.{id}:3260")),
        }
    }

    #[test]
    fn the_owner_keeps_the_vip_while_it_is_up_and_the_lowest_other_host_takes_it_after() {
        let hosts = vec![host(1, HostState::Up, true), host(2, HostState::Up, true), host(3, HostState::Up, true)];
        assert_eq!(next_owner(None, &hosts), Some(1), "the first owner is the lowest id");
        assert_eq!(next_owner(Some(3), &hosts), Some(3), "a live owner keeps it");
        let hosts = vec![host(1, HostState::Up, true), host(2, HostState::Up, true), host(3, HostState::Down, true)];
        assert_eq!(next_owner(Some(3), &hosts), Some(1));
        let hosts = vec![host(1, HostState::Down, true), host(2, HostState::Up, false), host(3, HostState::Up, true)];
        assert_eq!(next_owner(Some(1), &hosts), Some(3), "only a host with the target role is eligible");
        let hosts = vec![host(1, HostState::Down, true), host(2, HostState::Up, false)];
        assert_eq!(next_owner(Some(1), &hosts), None, "no eligible host: nobody takes it");
    }
}
