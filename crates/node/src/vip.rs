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
//!   owner adds the address and binds it at once, then announces it with
//!   gratuitous ARP (IPv4), so the network sends the VIP's traffic to it,
//!   as VRRP does. An old owner cut off from the catalog may still answer
//!   at the address until its [`LEASE`] runs out; that is harmless: the
//!   VIP only answers discovery and redirects logins, and every target
//!   host serves every target. Without an interface the address is bound
//!   on one machine's stack, where the kernel refuses a second bind (the
//!   new owner retries until the old one lets go).

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
    loop {
        step(&node, &configured, &threads, &mut bound, &mut last_read).await;
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
        bind(node, threads, bound, &record.address).await;
        return;
    }
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
            if let Some(interface) = &interface {
                announce(interface, address);
            }
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

/// Announces that `address`'s IPv4 address is now at `interface`: a few
/// gratuitous ARP requests, so neighbours' caches move to this machine (a
/// best effort: a failure is logged).
fn announce(interface: &str, address: &str) {
    let Ok(std::net::SocketAddr::V4(address)) = address.parse::<std::net::SocketAddr>() else { return };
    let interface = interface.to_string();
    tokio::task::spawn_blocking(move || {
        for round in 0..3 {
            if round > 0 {
                std::thread::sleep(Duration::from_millis(200));
            }
            match gratuitous_arp(&interface, *address.ip()) {
                Ok(()) => metrics::counter!("iscsi_vip_gratuitous_arps_total").increment(1),
                Err(error) => return tracing::warn!(%interface, %error, "cannot announce the VIP (gratuitous ARP)"),
            }
        }
        tracing::info!(%interface, ip = %address.ip(), "announced the VIP with gratuitous ARP");
    });
}

/// The Ethernet frame of a gratuitous ARP request for `ip` from `mac`:
/// broadcast, sender and target protocol addresses both `ip`.
pub fn gratuitous_arp_frame(mac: [u8; 6], ip: std::net::Ipv4Addr) -> [u8; 42] {
    let mut frame = [0u8; 42];
    frame[0..6].fill(0xff);
    frame[6..12].copy_from_slice(&mac);
    frame[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    // Ethernet, IPv4, 6-byte and 4-byte addresses, a request.
    frame[14..22].copy_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    frame[22..28].copy_from_slice(&mac);
    frame[28..32].copy_from_slice(&ip.octets());
    // Target hardware address unknown (zeros); target protocol address ip.
    frame[38..42].copy_from_slice(&ip.octets());
    frame
}

/// Sends one gratuitous ARP request for `ip` out of `interface` (a packet
/// socket: needs CAP_NET_RAW).
fn gratuitous_arp(interface: &str, ip: std::net::Ipv4Addr) -> Result<(), String> {
    let mac_text = std::fs::read_to_string(format!("/sys/class/net/{interface}/address"))
        .map_err(|error| format!("no address for {interface}: {error}"))?;
    let octets: Vec<u8> = mac_text.trim().split(':').filter_map(|octet| u8::from_str_radix(octet, 16).ok()).collect();
    let mac: [u8; 6] = octets.try_into().map_err(|_| format!("{interface} has no Ethernet address"))?;
    let name = std::ffi::CString::new(interface).map_err(|error| error.to_string())?;
    let frame = gratuitous_arp_frame(mac, ip);
    const ETH_P_ARP: u16 = 0x0806;
    // SAFETY: plain system calls on a socket this function owns and closes;
    // the address structure is zeroed, then filled, and outlives sendto.
    unsafe {
        let index = libc::if_nametoindex(name.as_ptr());
        if index == 0 {
            return Err(format!("no interface {interface}"));
        }
        let socket = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(ETH_P_ARP.to_be()));
        if socket < 0 {
            return Err(format!("cannot open a packet socket: {}", std::io::Error::last_os_error()));
        }
        let mut to: libc::sockaddr_ll = std::mem::zeroed();
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_protocol = ETH_P_ARP.to_be();
        to.sll_ifindex = index as i32;
        to.sll_halen = 6;
        to.sll_addr[..6].fill(0xff);
        let sent = libc::sendto(
            socket,
            frame.as_ptr() as *const libc::c_void,
            frame.len(),
            0,
            &to as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        );
        let error = std::io::Error::last_os_error();
        libc::close(socket);
        if sent != frame.len() as isize {
            return Err(format!("cannot send: {error}"));
        }
    }
    Ok(())
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

    #[test]
    fn a_gratuitous_arp_frame_is_a_broadcast_request_for_the_vip_from_this_machine() {
        let mac = [0x02, 0, 0, 0, 0, 0x01];
        let frame = gratuitous_arp_frame(mac, "10.254.0.1".parse().unwrap());
        assert_eq!(&frame[0..6], &[0xff; 6], "broadcast");
        assert_eq!(&frame[6..12], &mac);
        assert_eq!(&frame[12..14], &[0x08, 0x06], "ARP");
        assert_eq!(&frame[14..22], &[0, 1, 8, 0, 6, 4, 0, 1], "Ethernet/IPv4 request");
        assert_eq!(&frame[22..28], &mac, "sender hardware address");
        assert_eq!(&frame[28..32], &[10, 254, 0, 1], "sender protocol address");
        assert_eq!(&frame[32..38], &[0; 6]);
        assert_eq!(&frame[38..42], &[10, 254, 0, 1], "target protocol address: the same");
    }

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
