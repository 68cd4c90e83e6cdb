//! The node: starts the roles the config and the bootstrap config give it.
//!
//! Start-up order matters: the wire server comes up first so the log
//! replicas can elect a leader; the admin API comes up next so operators and
//! `tessera up` can watch progress; the catalog and the task queue open once
//! the log has a leader (the node retries until then).

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use catalog::bootstrap::{BootstrapConfig, ConfigDir, SeedHost};
use catalog::{Catalog, HostRecord, HostState, Roles};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use sharedlog::client::{ClientConfig, LogClient};
use sharedlog::protocol::method as log_method;
use sharedlog::queue::{PersistentQueue, SystemClock};
use sharedlog::server::{LogServer, ServerConfig};
use sharedlog::smr::{Runtime, RuntimeConfig};
use sharedlog::types::StreamId;
use tokio::sync::watch;
use wire::tcp::TcpTransport;
use wire::{ErrorCode, RemoteError, Request, ServerStats, Transport};

use crate::config::NodeConfig;
use crate::status::*;

/// The node's own wire methods (0x0200..0x0300).
pub mod method {
    pub const PING: u32 = 0x0200;
}

pub const TASKS_STREAM: StreamId = StreamId::from_name("cluster/tasks");
/// How long start-up waits for the bootstrap config to appear.
const BOOTSTRAP_WAIT: Duration = Duration::from_secs(120);
const PING_TIMEOUT: Duration = Duration::from_millis(800);

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pong {
    pub node_id: u64,
    pub incarnation: u64,
    /// Whether the node has opened the catalog (it serves the admin API's
    /// cluster operations only then).
    pub ready: bool,
}

/// A job in the cluster's task queue (resync, rebalance, reclamation …).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Task {
    pub kind: String,
    pub detail: String,
    pub created_by: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("bootstrap config: {0}")]
    Bootstrap(String),
    #[error("cannot listen on {address}: {source}")]
    Listen { address: String, source: std::io::Error },
    #[error("shared log: {0}")]
    Log(String),
    #[error("storage: {0}")]
    Storage(String),
}

/// What opens once the log is available.
pub struct Services {
    pub catalog: Catalog<TcpTransport>,
    pub tasks: PersistentQueue<Task, TcpTransport>,
}

pub struct Node {
    pub config: NodeConfig,
    pub bootstrap: BootstrapConfig,
    pub me: SeedHost,
    pub incarnation: u64,
    pub transport: TcpTransport,
    pub log_server: Option<Arc<LogServer>>,
    pub client: LogClient<TcpTransport>,
    /// A client with short timeouts for status gathering.
    status_client: LogClient<TcpTransport>,
    pub runtime: Runtime<TcpTransport>,
    pub services: OnceLock<Services>,
    pub prometheus: Option<PrometheusHandle>,
    pub wire_stats: OnceLock<Arc<ServerStats>>,
    pub membership: crate::membership::Membership,
    pub storage: crate::storage::Storage,
    pub targets: crate::targets::TargetService,
    pub repairs: crate::repair::Repairs,
    shutdown: watch::Sender<bool>,
}

pub(crate) fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_micros() as u64)
        .unwrap_or(0)
}

/// The port of a "host:port" address.
fn port_of(address: &str) -> Option<u16> {
    address.rsplit_once(':').and_then(|(_, port)| port.parse().ok())
}

/// The kernel's ephemeral port range, from the text of
/// /proc/sys/net/ipv4/ip_local_port_range ("32768\t60999\n").
fn ephemeral_range(text: &str) -> Option<std::ops::RangeInclusive<u16>> {
    let mut bounds = text.split_whitespace().map(str::parse::<u16>);
    match (bounds.next(), bounds.next()) {
        (Some(Ok(low)), Some(Ok(high))) if low <= high => Some(low..=high),
        _ => None,
    }
}

/// The ports the kernel hands to sockets bound to port 0
/// (net.ipv4.ip_local_port_range), if it says. A fixed port chosen among
/// them may be taken before it is bound.
pub fn ephemeral_ports() -> Option<std::ops::RangeInclusive<u16>> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok().and_then(|text| ephemeral_range(&text))
}

/// Warns of a port this node listens on that lies in the kernel's ephemeral
/// range: any socket bound to port 0 (this node's component threads and
/// outgoing calls among them) can take it before the node binds it, and the
/// node then fails to start with "address in use", which is hard to trace.
fn warn_of_ephemeral_ports(ports: &[(&str, Option<u16>)]) {
    let Some(range) = ephemeral_ports() else { return };
    for (service, port) in ports {
        if let Some(port) = port.filter(|port| range.contains(port)) {
            tracing::warn!(
                service,
                port,
                "the port lies in the kernel's ephemeral range {}-{} (net.ipv4.ip_local_port_range), where another \
                 socket may take it first: choose a port below {}, or reserve it in net.ipv4.ip_local_reserved_ports",
                range.start(),
                range.end(),
                range.start()
            );
        }
    }
}

/// Waits for the bootstrap config to exist (another host may be writing it).
async fn load_bootstrap(dir: &std::path::Path) -> Result<BootstrapConfig, NodeError> {
    let config_dir = ConfigDir::new(fsio::real(), dir.to_path_buf());
    let deadline = tokio::time::Instant::now() + BOOTSTRAP_WAIT;
    loop {
        match config_dir.latest() {
            Ok(Some((version, config))) => {
                config
                    .validate()
                    .map_err(|reason| NodeError::Bootstrap(format!("{}/v{version}: {reason}", dir.display())))?;
                tracing::info!(version, cluster = %config.cluster_id, "loaded the bootstrap config");
                return Ok(config);
            }
            Ok(None) if tokio::time::Instant::now() < deadline => {
                tracing::info!(dir = %dir.display(), "waiting for the bootstrap config");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Ok(None) => {
                return Err(NodeError::Bootstrap(format!("no config in {} after {BOOTSTRAP_WAIT:?}", dir.display())))
            }
            Err(error) => return Err(NodeError::Bootstrap(error.to_string())),
        }
    }
}

impl Node {
    /// Starts the node and returns once its servers listen. The catalog
    /// opens in the background.
    pub async fn start(config: NodeConfig, prometheus: Option<PrometheusHandle>) -> Result<Arc<Node>, NodeError> {
        let bootstrap = load_bootstrap(&config.cluster_config_dir).await?;
        let me = bootstrap.host(config.node_id).cloned().ok_or_else(|| {
            NodeError::Bootstrap(format!("node_id {} is not among the cluster's hosts", config.node_id))
        })?;
        let ip = me.address.rsplit_once(':').map(|(ip, _)| ip.trim_matches(['[', ']'])).unwrap_or("127.0.0.1");
        let target_role = config.roles.iter().any(|role| role == "target");
        warn_of_ephemeral_ports(&[
            ("node-to-node", port_of(&me.address)),
            ("admin API", port_of(&me.admin_address)),
            ("iSCSI", target_role.then_some(config.iscsi_port)),
        ]);
        // Calls to peers leave from the address they know this host by.
        let transport = TcpTransport::new().bound_to(ip.parse().ok());
        let replicas = bootstrap.log_replica_addresses();
        let log_server = if replicas.contains_key(&config.node_id) {
            let server_config = ServerConfig::new(config.node_id, me.address.clone(), config.data_dir.join("log"));
            let server = LogServer::start(server_config, fsio::real(), transport.clone())
                .await
                .map_err(|error| NodeError::Log(error.to_string()))?;
            Some(server)
        } else {
            None
        };
        let incarnation = now_micros();
        // The session id must be new for every process: it keys append
        // deduplication, and a restarted process starts its sequence over.
        let session_id = (config.node_id << 48) ^ (rand::random::<u64>() >> 16);
        let mut client_config = ClientConfig::new(replicas.values().cloned().collect(), session_id);
        if let Some(server) = &log_server {
            client_config.read_replica = Some(me.address.clone());
            client_config.leader_hint = Some(server.leader_hint());
        }
        let client = LogClient::new(transport.clone(), client_config.clone());
        let mut status_config = client_config;
        status_config.client_id = session_id ^ 1;
        status_config.call_timeout = Duration::from_millis(1000);
        status_config.operation_deadline = Duration::from_millis(1500);
        let status_client = LogClient::new(transport.clone(), status_config);
        let mut runtime_config = RuntimeConfig::new(format!("{}/catalog", me.name));
        runtime_config.gc_interval = Duration::from_millis(config.gc_interval_ms);
        // Stable across restarts, so a returning host keeps its GC progress.
        runtime_config.gc_client_id = Some(0x7e55_0000_0000_0000 | config.node_id);
        let runtime = Runtime::new(client.clone(), runtime_config);
        let (shutdown, _) = watch::channel(false);
        let fanout = match bootstrap.settings.get(crate::membership::FANOUT_SETTING) {
            Some(value) => value.parse::<usize>().ok().filter(|fanout| *fanout >= 2).ok_or_else(|| {
                NodeError::Bootstrap(format!(
                    "setting {} = {value:?} is not a number of at least 2",
                    crate::membership::FANOUT_SETTING
                ))
            })?,
            None => 32,
        };
        let membership = crate::membership::Membership::new(config.node_id, fanout, incarnation);
        let storage_role = config.roles.iter().any(|role| role == "storage");
        let storage = crate::storage::Storage::start(&config, ip, storage_role).map_err(NodeError::Storage)?;
        let iscsi_address = target_role.then(|| {
            if ip.contains(':') {
                format!("[{ip}]:{}", config.iscsi_port)
            } else {
                format!("{ip}:{}", config.iscsi_port)
            }
        });
        let targets = crate::targets::TargetService::new(config.node_id, iscsi_address);
        let node = Arc::new(Node {
            config,
            bootstrap,
            me,
            incarnation,
            transport,
            log_server,
            client,
            status_client,
            runtime,
            services: OnceLock::new(),
            prometheus,
            wire_stats: OnceLock::new(),
            membership,
            storage,
            targets,
            repairs: crate::repair::Repairs::default(),
            shutdown,
        });
        node.serve_wire().await?;
        if let Some(server) = &node.log_server {
            server.initialize(&replicas).await.map_err(NodeError::Log)?;
        }
        tokio::spawn(open_services(node.clone()));
        Ok(node)
    }

    async fn serve_wire(self: &Arc<Self>) -> Result<(), NodeError> {
        let node = Arc::downgrade(self);
        let handler = move |request: Request| {
            let node = node.upgrade();
            async move {
                let Some(node) = node else {
                    return Err(RemoteError::new(ErrorCode::Unavailable, "node is shutting down"));
                };
                node.handle(request).await
            }
        };
        let serve = self
            .transport
            .serve(&self.me.address, Arc::new(handler))
            .await
            .map_err(|source| NodeError::Listen { address: self.me.address.clone(), source })?;
        tracing::info!(address = %serve.local_address, "serving node-to-node traffic");
        let _ = self.wire_stats.set(serve.stats.clone());
        let mut shutdown = self.shutdown.subscribe();
        tokio::spawn(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
            serve.stop();
        });
        Ok(())
    }

    async fn handle(self: Arc<Self>, request: Request) -> Result<bytes::Bytes, RemoteError> {
        if log_method::is_log_method(request.method) {
            return match &self.log_server {
                Some(server) => server.clone().handle(request).await,
                None => Err(RemoteError::new(
                    ErrorCode::Unavailable,
                    format!("host {} holds no log replica", self.config.node_id),
                )),
            };
        }
        match request.method {
            method::PING => Ok(wire::encode(&Pong {
                node_id: self.config.node_id,
                incarnation: self.incarnation,
                ready: self.services().is_some(),
            })),
            crate::membership::method::HIERARCHY
            | crate::membership::method::SCHEDULER
            | crate::membership::method::PLACE => {
                let method = request.method;
                crate::membership::handle(self, method, &request).await
            }
            crate::storage::method::OBJECT_IO
            | crate::storage::method::OBJECT_STATS
            | crate::storage::method::OBJECT_HAND_OVER => crate::storage::handle(self, &request).await,
            crate::reservations::method::SYNC => crate::reservations::handle(self, &request).await,
            other => Err(RemoteError::new(ErrorCode::UnknownMethod, format!("unknown method {other:#06x}"))),
        }
    }

    pub fn services(&self) -> Option<&Services> {
        self.services.get()
    }

    /// Asks the node to stop; [`Node::stopped`] resolves when it has.
    pub fn request_shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Stops the log replica cleanly.
    pub async fn stop(&self) {
        self.request_shutdown();
        if let Some(server) = &self.log_server {
            server.shutdown().await;
        }
    }

    async fn ping(&self, address: &str) -> Option<Pong> {
        wire::call(&self.transport, address, method::PING, &(), PING_TIMEOUT).await.ok()
    }

    /// Gathers the whole cluster's status: pings every host, asks every log
    /// replica, reads the catalog.
    pub async fn cluster_status(&self) -> ClusterStatus {
        let hosts = self.bootstrap.hosts.clone();
        let pings = futures::future::join_all(hosts.iter().map(|host| self.ping(&host.address))).await;
        let replica_addresses = self.bootstrap.log_replica_addresses();
        let replica_statuses =
            futures::future::join_all(replica_addresses.values().map(|address| self.status_client.status(address)))
                .await;
        let replica_statuses: BTreeMap<u64, Option<sharedlog::protocol::LogStatus>> =
            replica_addresses.keys().copied().zip(replica_statuses.into_iter().map(Result::ok)).collect();
        let catalog_hosts: BTreeMap<u64, HostRecord> = match self.services() {
            Some(services) => {
                services.catalog.hosts.entries_local().into_iter().map(|(id, record, _)| (id, record)).collect()
            }
            None => BTreeMap::new(),
        };
        let leader_status = replica_statuses.values().flatten().find(|status| status.role == "Leader").cloned();
        let tree = self.services().map(|services| services.catalog.tree_local().0).unwrap_or_default();
        let mut problems = Vec::new();
        let mut host_statuses = Vec::new();
        for (host, pong) in hosts.iter().zip(pings) {
            let reachable = pong.is_some();
            let record = catalog_hosts.get(&host.id);
            let log_role = replica_statuses.get(&host.id).map(|status| {
                status.as_ref().map(|status| status.role.to_lowercase()).unwrap_or_else(|| "unreachable".into())
            });
            let state = match (reachable, record.map(|record| record.state)) {
                (false, _) => "unreachable",
                (true, Some(HostState::Up)) => "up",
                (true, Some(HostState::Down)) => "down",
                (true, Some(HostState::Decommissioned)) => "decommissioned",
                (true, None) => "unregistered",
            };
            let role = tree.role(host.id);
            if state != "up" {
                problems.push(format!("host {} ({}) is {state}", host.name, host.id));
            } else if pong.is_some_and(|pong| !pong.ready) {
                problems.push(format!("host {} ({}) has not opened the catalog yet", host.name, host.id));
            } else if role.is_none() && self.services().is_some() {
                problems.push(format!("host {} ({}) has no place in the hierarchy yet", host.name, host.id));
            }
            let roles = match record {
                Some(record) => record.roles.names().into_iter().map(String::from).collect(),
                None => {
                    let mut roles = Vec::new();
                    if replica_addresses.contains_key(&host.id) {
                        roles.push("log".to_string());
                    }
                    roles
                }
            };
            host_statuses.push(HostStatus {
                id: host.id,
                name: host.name.clone(),
                address: host.address.clone(),
                admin_address: host.admin_address.clone(),
                roles,
                site: host.site.clone(),
                state: state.into(),
                catalog_state: record.map(|record| record.state.as_str().to_string()),
                reachable,
                log_role,
                epoch: record.map(|record| record.epoch),
                tree_role: role.as_ref().map(|role| role.describe().to_string()),
                parent: role.and_then(|role| role.parent),
            });
        }
        let mut log = LogSummary::default();
        match &leader_status {
            Some(leader) => {
                log.leader = Some(leader.node_id);
                log.leader_name = self.bootstrap.host(leader.node_id).map(|host| host.name.clone());
                log.term = leader.term;
                log.commit_index = leader.commit_index;
                log.tail = leader.tail;
                log.snapshot_mark = leader.snapshot_mark;
                log.live_entries = leader.live_entries;
                log.live_bytes = leader.live_bytes;
                log.disk_bytes = leader.disk_bytes;
                log.gc_clients = leader
                    .gc_clients
                    .iter()
                    .map(|(id, client)| GcClientStatus {
                        id: *id,
                        name: client.name.clone(),
                        progress: client.progress,
                        lag: leader.tail.saturating_sub(client.progress),
                    })
                    .collect();
            }
            None => problems.push("the shared log has no leader".into()),
        }
        for (id, status) in &replica_statuses {
            let address = replica_addresses[id].clone();
            match status {
                Some(status) => {
                    if let (Some(leader), Some(applied)) = (&leader_status, status.applied_index) {
                        let behind = leader.applied_index.unwrap_or(0).saturating_sub(applied);
                        if behind > 1000 {
                            problems.push(format!("log replica {id} is {behind} entries behind"));
                        }
                    }
                    log.replicas.push(ReplicaStatus {
                        id: *id,
                        address,
                        reachable: true,
                        role: Some(status.role.to_lowercase()),
                        applied_index: status.applied_index,
                        tail: Some(status.tail),
                    });
                }
                None => {
                    problems.push(format!("log replica {id} does not answer"));
                    log.replicas.push(ReplicaStatus { id: *id, address, reachable: false, ..Default::default() });
                }
            }
        }
        if self.services().is_none() {
            problems.push(format!("host {} has not opened the catalog yet", self.config.node_id));
        }
        let objects = crate::storage::object_statuses(self).await;
        for object in &objects {
            if object.health != "healthy" {
                problems.push(format!("object {} is {}", object.name, object.health));
            }
        }
        problems.dedup();
        ClusterStatus {
            tree_epoch: tree.epoch,
            cluster_id: self.bootstrap.cluster_id.clone(),
            healthy: problems.is_empty(),
            problems,
            served_by: self.config.node_id,
            hosts: host_statuses,
            log,
            objects,
            volumes: crate::targets::volume_statuses(self),
            targets: crate::targets::target_statuses(self),
            vip: self.services().and_then(|services| services.catalog.vip.get_local()).map(|(vip, _)| VipStatus {
                owner_name: vip.owner.and_then(|id| self.bootstrap.host(id)).map(|host| host.name.clone()),
                address: vip.address,
                owner: vip.owner,
                epoch: vip.epoch,
                since_ms: vip.since_ms,
            }),
        }
    }

    /// Refreshes gauges that are read rather than pushed, then renders.
    pub fn render_metrics(&self) -> String {
        if let Some(stats) = self.wire_stats.get() {
            use std::sync::atomic::Ordering::Relaxed;
            metrics::gauge!("wire_connections_accepted").set(stats.connections_accepted.load(Relaxed) as f64);
            metrics::gauge!("wire_connections_rejected").set(stats.connections_rejected.load(Relaxed) as f64);
            metrics::gauge!("wire_connections_open").set(stats.connections_open.load(Relaxed) as f64);
            metrics::gauge!("wire_bad_frames").set(stats.bad_frames.load(Relaxed) as f64);
            metrics::gauge!("wire_requests").set(stats.requests.load(Relaxed) as f64);
        }
        if let Some(server) = &self.log_server {
            let status = server.status();
            metrics::gauge!("sharedlog_live_entries").set(status.live_entries as f64);
            metrics::gauge!("sharedlog_live_bytes").set(status.live_bytes as f64);
            metrics::gauge!("sharedlog_disk_bytes").set(status.disk_bytes as f64);
            metrics::gauge!("sharedlog_is_leader").set(if status.role == "Leader" { 1.0 } else { 0.0 });
            metrics::gauge!("sharedlog_term").set(status.term as f64);
        }
        self.storage.record_metrics();
        crate::targets::record_metrics(self);
        metrics::gauge!("tessera_node_catalog_ready").set(if self.services().is_some() { 1.0 } else { 0.0 });
        self.prometheus.as_ref().map(|handle| handle.render()).unwrap_or_default()
    }
}

/// Opens the catalog and task queue once the log answers, then registers
/// this host. Retries until it succeeds or the node stops.
async fn open_services(node: Arc<Node>) {
    let mut shutdown = node.shutdown_signal();
    let mut attempt = 0u32;
    loop {
        if *shutdown.borrow() {
            return;
        }
        attempt += 1;
        match try_open_services(&node).await {
            Ok(services) => {
                let _ = node.services.set(services);
                tracing::info!("catalog open; host registered");
                crate::membership::start(node.clone());
                crate::storage::start(node.clone());
                crate::repair::start(node.clone());
                crate::targets::start(node.clone());
                crate::vip::start(node.clone());
                return;
            }
            Err(error) => {
                if attempt % 5 == 1 {
                    tracing::warn!(%error, attempt, "catalog not available yet; retrying");
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    }
}

async fn try_open_services(node: &Node) -> Result<Services, String> {
    let catalog = Catalog::open(&node.runtime).await.map_err(|error| error.to_string())?;
    // Open everything before registering: a host registered as up is ready.
    let tasks = PersistentQueue::open(&node.runtime, TASKS_STREAM, node.config.node_id as u32, Arc::new(SystemClock))
        .await
        .map_err(|error| error.to_string())?;
    let mut roles = Roles::parse(&node.config.roles).map_err(|error| error.to_string())?;
    roles.log = node.log_server.is_some();
    let record = HostRecord {
        id: node.config.node_id,
        name: node.me.name.clone(),
        address: node.me.address.clone(),
        admin_address: node.me.admin_address.clone(),
        roles,
        site: node.me.site.clone(),
        fault_domain: node.config.fault_domain.clone(),
        state: HostState::Up,
        epoch: 0,
        incarnation: node.incarnation,
        component_addresses: node.storage.component_addresses(),
        iscsi_address: node.targets.address.clone(),
    };
    catalog.register_host(record).await.map_err(|error| error.to_string())?;
    Ok(Services { catalog, tasks })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ephemeral_range_is_read_from_the_kernels_text() {
        assert_eq!(ephemeral_range("32768\t60999\n"), Some(32768..=60999));
        assert_eq!(ephemeral_range("1024 65535"), Some(1024..=65535));
        assert_eq!(ephemeral_range("60999 32768"), None);
        assert_eq!(ephemeral_range("32768"), None);
        assert_eq!(ephemeral_range(""), None);
        assert_eq!(port_of("127.0.0.1:3260"), Some(3260));
        assert_eq!(port_of("[::1]:42779"), Some(42779));
        assert_eq!(port_of("host"), None);
    }
}
