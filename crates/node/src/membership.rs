//! Membership on a node: the aggregation hierarchy and the placement
//! service, wired to the catalog and the network.
//!
//! Every node runs an [`Agent`] (heartbeats, watching, failure reports) and
//! a [`Scheduler`] (its leaf scheduler, and branch or root as the tree says),
//! fed by the catalog's tree. The node holding the shared log's leadership
//! also runs the [`Manager`]: it places registered hosts in the tree, marks
//! failed hosts down in the catalog (fenced by their epoch) and writes every
//! new tree with compare-and-set. A host that finds itself marked down while
//! alive registers again.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use catalog::{HostRecord, HostState};
use hierarchy::{Agent, AgentConfig, HostId, HostInfo, Input, Manager, ManagerConfig, Message, Millis, Output, Tree};
use placement::{Bucket, BucketId, Candidate, PlacementError, Request, Scheduler, SchedulerConfig, SchedulerMessage};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use wire::{RemoteError, Transport};

use crate::daemon::Node;

/// Wire methods (the node owns 0x0200..0x0300).
pub mod method {
    pub const HIERARCHY: u32 = 0x0201;
    pub const SCHEDULER: u32 = 0x0202;
    pub const PLACE: u32 = 0x0203;
}

/// Setting in the bootstrap config: hosts per branch.
pub const FANOUT_SETTING: &str = "hierarchy.fanout";
const SEND_TIMEOUT: Duration = Duration::from_millis(800);
const PLACE_TIMEOUT: Duration = Duration::from_secs(5);
/// Failure reports waiting for the manager.
const FAILURES_QUEUED_MAX: usize = 4096;

#[derive(Serialize, Deserialize)]
struct Envelope<M> {
    from: HostId,
    message: M,
}

/// A placement's answer, waited for by request id.
type PlacementReply = oneshot::Sender<Result<Vec<Candidate>, PlacementError>>;

pub struct Membership {
    me: HostId,
    started: std::time::Instant,
    fanout: usize,
    agent: Mutex<Agent>,
    scheduler: Mutex<Scheduler>,
    waiting: Mutex<HashMap<u64, PlacementReply>>,
    next_request: AtomicU64,
    failures: mpsc::Sender<HostId>,
    failures_queue: Mutex<Option<mpsc::Receiver<HostId>>>,
}

impl Membership {
    pub fn new(me: HostId, fanout: usize, incarnation: u64) -> Membership {
        let (failures, queue) = mpsc::channel(FAILURES_QUEUED_MAX);
        Membership {
            me,
            started: std::time::Instant::now(),
            fanout,
            agent: Mutex::new(Agent::new(me, AgentConfig::default())),
            scheduler: Mutex::new(Scheduler::new(me, SchedulerConfig::default(), incarnation, incarnation)),
            waiting: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
            failures,
            failures_queue: Mutex::new(Some(queue)),
        }
    }

    fn now(&self) -> Millis {
        self.started.elapsed().as_millis() as Millis
    }

    /// This host's place in the tree, as its agent knows it.
    pub fn role(&self) -> Option<hierarchy::Role> {
        self.agent.lock().expect("agent lock").role().cloned()
    }

    pub fn suspects(&self) -> Vec<HostId> {
        self.agent.lock().expect("agent lock").suspects()
    }
}

/// Where to reach a host: its catalog record, else the bootstrap config.
fn address_of(node: &Node, host: HostId) -> Option<String> {
    if let Some(services) = node.services() {
        if let Some((record, _)) = services.catalog.hosts.get_local(&host) {
            return Some(record.address);
        }
    }
    node.bootstrap.host(host).map(|seed| seed.address.clone())
}

fn send<M: Serialize>(node: &Arc<Node>, to: HostId, method: u32, message: M) {
    let Some(address) = address_of(node, to) else { return };
    let payload = wire::encode(&Envelope { from: node.config.node_id, message });
    let transport = node.transport.clone();
    // Fire and forget: heartbeats and scheduler messages tolerate loss.
    tokio::spawn(async move {
        let _ = transport.call(&address, method, payload, SEND_TIMEOUT).await;
    });
}

fn agent_outputs(node: &Arc<Node>, outputs: Vec<Output>) {
    for output in outputs {
        match output {
            Output::Send { to, message } => send(node, to, method::HIERARCHY, message),
            Output::Failed(host) => {
                tracing::warn!(host, "host failed (no heartbeat, no answer to probes)");
                metrics::counter!("hierarchy_failures_reported_total").increment(1);
                if node.membership.failures.try_send(host).is_err() {
                    tracing::warn!(host, "failure report dropped: the manager's queue is full");
                }
            }
            Output::Suspected(host) => {
                tracing::info!(host, "host suspected; probing");
                metrics::counter!("hierarchy_suspicions_total").increment(1);
            }
            Output::Cleared(host) => tracing::info!(host, "suspected host answered"),
        }
    }
}

fn scheduler_outputs(node: &Arc<Node>, outputs: Vec<placement::Output>) {
    for output in outputs {
        match output {
            placement::Output::Send { to, message } => send(node, to, method::SCHEDULER, message),
            placement::Output::Placed { request_id, result } => {
                let waiter = node.membership.waiting.lock().expect("waiting lock").remove(&request_id);
                if let Some(waiter) = waiter {
                    let _ = waiter.send(result);
                }
            }
        }
    }
}

/// Handles one of the membership wire methods.
pub async fn handle(node: Arc<Node>, method: u32, request: &wire::Request) -> Result<bytes::Bytes, RemoteError> {
    let membership = &node.membership;
    match method {
        method::HIERARCHY => {
            let envelope: Envelope<Message> = wire::decode_request(request)?;
            let mut out = Vec::new();
            {
                let mut agent = membership.agent.lock().expect("agent lock");
                agent.handle(
                    membership.now(),
                    Input::Received { from: envelope.from, message: envelope.message },
                    &mut out,
                );
            }
            agent_outputs(&node, out);
            Ok(wire::encode(&()))
        }
        method::SCHEDULER => {
            let envelope: Envelope<SchedulerMessage> = wire::decode_request(request)?;
            let mut out = Vec::new();
            {
                let mut scheduler = membership.scheduler.lock().expect("scheduler lock");
                scheduler.handle(membership.now(), envelope.from, envelope.message, &mut out);
            }
            scheduler_outputs(&node, out);
            Ok(wire::encode(&()))
        }
        method::PLACE => {
            let placement: Request = wire::decode_request(request)?;
            Ok(wire::encode(&place_here(&node, placement).await))
        }
        other => Err(RemoteError::new(wire::ErrorCode::UnknownMethod, format!("unknown method {other:#06x}"))),
    }
}

/// Runs a placement on this host, which must be the root.
async fn place_here(node: &Arc<Node>, mut request: Request) -> Result<Vec<Candidate>, PlacementError> {
    let membership = &node.membership;
    // Ids unique across the cluster: this host's id, then a counter.
    request.id = (membership.me << 40) | membership.next_request.fetch_add(1, Ordering::Relaxed);
    let (reply, result) = oneshot::channel();
    membership.waiting.lock().expect("waiting lock").insert(request.id, reply);
    let mut out = Vec::new();
    membership.scheduler.lock().expect("scheduler lock").place(membership.now(), request.clone(), &mut out);
    scheduler_outputs(node, out);
    let outcome = tokio::time::timeout(PLACE_TIMEOUT, result).await;
    membership.waiting.lock().expect("waiting lock").remove(&request.id);
    match outcome {
        Ok(Ok(result)) => result,
        _ => Err(PlacementError::NotEnough { wanted: request.count, found: 0 }),
    }
}

/// Places `request` wherever it is asked: at the root, directly, else by
/// asking the root.
pub async fn place(node: &Arc<Node>, request: Request) -> Result<Vec<Candidate>, String> {
    for _ in 0..3 {
        let root = node.services().map(|services| services.catalog.tree_local().0.root).unwrap_or(None);
        let Some(root) = root else { return Err("the hierarchy has no root yet".into()) };
        let result = if root == node.config.node_id {
            place_here(node, request.clone()).await
        } else {
            let address = address_of(node, root).ok_or("the root's address is unknown")?;
            let reply: Result<Result<Vec<Candidate>, PlacementError>, _> =
                wire::call(&node.transport, &address, method::PLACE, &request, PLACE_TIMEOUT + Duration::from_secs(1))
                    .await;
            reply.map_err(|error| error.to_string())?
        };
        match result {
            Err(PlacementError::NotRoot { .. }) => tokio::time::sleep(Duration::from_millis(200)).await,
            other => return other.map_err(|error| error.to_string()),
        }
    }
    Err("the root moved while placing; try again".into())
}

/// Starts the membership tasks once the catalog is open.
pub fn start(node: Arc<Node>) {
    tokio::spawn(tick_agent(node.clone()));
    tokio::spawn(tick_scheduler(node.clone()));
    tokio::spawn(follow_tree(node.clone()));
    tokio::spawn(refresh_buckets(node.clone()));
    tokio::spawn(stay_registered(node.clone()));
    if node.log_server.is_some() {
        let queue = node.membership.failures_queue.lock().expect("queue lock").take();
        if let Some(queue) = queue {
            tokio::spawn(manage(node, queue));
        }
    }
}

async fn tick_agent(node: Arc<Node>) {
    let mut shutdown = node.shutdown_signal();
    loop {
        let mut out = Vec::new();
        {
            let mut agent = node.membership.agent.lock().expect("agent lock");
            agent.tick(node.membership.now(), &mut out);
        }
        agent_outputs(&node, out);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn tick_scheduler(node: Arc<Node>) {
    let mut shutdown = node.shutdown_signal();
    loop {
        let mut out = Vec::new();
        {
            let mut scheduler = node.membership.scheduler.lock().expect("scheduler lock");
            scheduler.tick(node.membership.now(), &mut out);
        }
        scheduler_outputs(&node, out);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Feeds every new tree from the catalog to the agent and the scheduler.
async fn follow_tree(node: Arc<Node>) {
    let Some(services) = node.services() else { return };
    let mut changes = services.catalog.watch_tree();
    let mut shutdown = node.shutdown_signal();
    loop {
        let (tree, _) = services.catalog.tree_local();
        apply_tree(&node, Arc::new(tree));
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = shutdown.changed() => return,
        }
    }
}

fn apply_tree(node: &Arc<Node>, tree: Arc<Tree>) {
    let membership = &node.membership;
    let mut out = Vec::new();
    membership.agent.lock().expect("agent lock").handle(membership.now(), Input::Tree(tree.clone()), &mut out);
    membership.scheduler.lock().expect("scheduler lock").set_tree(tree.clone());
    metrics::gauge!("hierarchy_tree_epoch").set(tree.epoch as f64);
    agent_outputs(node, out);
}

/// One bucket per component disk, sized by its filesystem's free space.
async fn refresh_buckets(node: Arc<Node>) {
    let mut shutdown = node.shutdown_signal();
    let disks = if node.storage.service.is_some() { node.config.disk_paths() } else { Vec::new() };
    loop {
        let buckets = disks
            .iter()
            .enumerate()
            .filter_map(|(index, path)| {
                let (capacity, free) = fsio::filesystem_space(path).ok()?;
                Some(Bucket {
                    id: BucketId { host: node.config.node_id, disk: index as u32 },
                    site: node.me.site.clone(),
                    fault_domain: node.config.fault_domain.clone(),
                    capacity_bytes: capacity,
                    free_bytes: free,
                })
            })
            .collect();
        node.membership.scheduler.lock().expect("scheduler lock").set_buckets(buckets);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// A live host the catalog says is down registers again (after a false
/// alarm, or when it returns before its old record was cleared).
async fn stay_registered(node: Arc<Node>) {
    let Some(services) = node.services() else { return };
    let mut changes = services.catalog.watch_hosts();
    let mut shutdown = node.shutdown_signal();
    loop {
        let mine = services.catalog.hosts.get_local(&node.config.node_id);
        if let Some((record, _)) = mine.filter(|(record, _)| record.state == HostState::Down) {
            tracing::warn!(epoch = record.epoch, "this host is marked down but alive; registering again");
            let mut up = record.clone();
            up.state = HostState::Up;
            if let Err(error) = services.catalog.register_host(up).await {
                tracing::warn!(%error, "registering again failed; will retry");
            }
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

fn host_info(record: &HostRecord) -> HostInfo {
    HostInfo { site: record.site.clone() }
}

/// The manager, on the log's leader: keeps the tree in the catalog in line
/// with the registered hosts and the failures the root reports.
async fn manage(node: Arc<Node>, mut failures: mpsc::Receiver<HostId>) {
    let Some(services) = node.services() else { return };
    let mut shutdown = node.shutdown_signal();
    let mut hosts_changed = services.catalog.watch_hosts();
    let mut manager: Option<Manager> = None;
    loop {
        let leading = node.log_server.as_ref().is_some_and(|server| server.status().role == "Leader");
        if !leading {
            manager = None;
        } else if manager.is_none() {
            match take_over(&node).await {
                Ok(taken) => manager = Some(taken),
                Err(error) => tracing::warn!(%error, "taking over management failed; will retry"),
            }
        }
        if let Some(current) = manager.as_mut() {
            if let Err(error) = reconcile(&node, current).await {
                tracing::warn!(%error, "reconciling the tree with the catalog failed");
                manager = None;
            }
        }
        tokio::select! {
            failed = failures.recv() => {
                let Some(host) = failed else { return };
                if let Some(current) = manager.as_mut() {
                    if let Err(error) = mark_down(&node, current, host).await {
                        tracing::warn!(host, %error, "marking a failed host down failed");
                        manager = None;
                    }
                }
            }
            _ = hosts_changed.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Becomes the manager: builds the manager from the catalog's hosts and
/// tree, moves the root here, writes the tree, and has the local agent
/// probe the previous root at once.
async fn take_over(node: &Arc<Node>) -> Result<Manager, String> {
    let services = node.services().ok_or("catalog not open")?;
    let catalog = &services.catalog;
    let me = node.config.node_id;
    let hosts: BTreeMap<HostId, HostInfo> = catalog
        .hosts()
        .await
        .map_err(|error| error.to_string())?
        .into_iter()
        .filter(|(record, _)| record.state == HostState::Up)
        .map(|(record, _)| (record.id, host_info(&record)))
        .collect();
    let (tree, version) = match catalog.tree.get().await.map_err(|error| error.to_string())? {
        Some((tree, version)) => (tree, Some(version)),
        None => (Tree::default(), None),
    };
    let previous_root = tree.root;
    let mut manager = Manager::new(ManagerConfig { fanout: node.membership.fanout }, tree.clone(), hosts, Some(me));
    manager.take_over(me);
    if manager.tree() != &tree {
        write_tree(node, manager.tree().clone(), version).await?;
    }
    tracing::info!(epoch = manager.tree().epoch, ?previous_root, "managing the hierarchy");
    apply_tree(node, Arc::new(manager.tree().clone()));
    if let Some(previous) = previous_root.filter(|previous| *previous != me) {
        let mut out = Vec::new();
        node.membership.agent.lock().expect("agent lock").handle(
            node.membership.now(),
            Input::Suspect(previous),
            &mut out,
        );
        agent_outputs(node, out);
    }
    Ok(manager)
}

async fn write_tree(node: &Arc<Node>, tree: Tree, expected: Option<sharedlog::types::Position>) -> Result<(), String> {
    let services = node.services().ok_or("catalog not open")?;
    match services.catalog.tree.compare_and_set(expected, tree).await.map_err(|error| error.to_string())? {
        Ok(_) => Ok(()),
        Err(conflict) => Err(format!("the tree changed under the manager ({conflict})")),
    }
}

/// Brings the catalog's up hosts into the tree and down hosts out of it.
async fn reconcile(node: &Arc<Node>, manager: &mut Manager) -> Result<(), String> {
    let services = node.services().ok_or("catalog not open")?;
    let records = services.catalog.hosts.entries_local();
    let mut changed = false;
    for (id, record, _) in &records {
        let known = manager.hosts().contains_key(id);
        match record.state {
            HostState::Up if !known => changed |= manager.host_up(*id, host_info(record)),
            HostState::Down | HostState::Decommissioned if known => changed |= manager.host_down(*id),
            _ => {}
        }
    }
    if changed {
        let (_, version) = services.catalog.tree_local();
        write_tree(node, manager.tree().clone(), version).await?;
        tracing::info!(epoch = manager.tree().epoch, "hierarchy updated");
    }
    Ok(())
}

/// Marks a reported host down in the catalog, fenced by the epoch of its
/// record, then takes it out of the tree.
async fn mark_down(node: &Arc<Node>, manager: &mut Manager, host: HostId) -> Result<(), String> {
    let services = node.services().ok_or("catalog not open")?;
    let Some((record, _)) = services.catalog.hosts.get(&host).await.map_err(|error| error.to_string())? else {
        return Ok(());
    };
    if record.state != HostState::Up || host == node.config.node_id {
        return Ok(());
    }
    match services
        .catalog
        .set_host_state(host, HostState::Down, record.epoch)
        .await
        .map_err(|error| error.to_string())?
    {
        Ok(epoch) => tracing::warn!(host, epoch, "marked the host down"),
        // It re-registered meanwhile: it is alive.
        Err(_) => return Ok(()),
    }
    metrics::counter!("hierarchy_hosts_marked_down_total").increment(1);
    if manager.host_down(host) {
        let (_, version) = services.catalog.tree_local();
        write_tree(node, manager.tree().clone(), version).await?;
    }
    Ok(())
}
