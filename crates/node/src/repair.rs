//! Rebuilding components that stay away, and removing orphaned ones.
//!
//! - A component absent longer than the repair delay (`repair_delay_secs`
//!   in node.toml, like vSAN's 60 minutes) gets a `rebuild` task in the
//!   cluster's persistent task queue, put there by the object's owner.
//! - Each host runs the rebuild tasks of the objects it owns, one at a
//!   time, in queue order: place a new component on a host the object does
//!   not use yet, create it, and swap it into the object's record with the
//!   next owner epoch (by compare-and-set). The owner reopens the object at
//!   that epoch and resyncs the new component from scratch. The task leaves
//!   the queue once the swap is recorded, or when it no longer applies.
//! - Resyncs go through the same queue: an owner puts a `resync` task there
//!   for each resync it plans and copies once the task is among the first
//!   `resync_concurrency` of its own in queue order; the task leaves the
//!   queue when the resync ends. Tasks left behind by an owner that is no
//!   longer the object's owner at that epoch (it died, or was deposed) are
//!   removed by whichever host sees them.
//! - A component on this host that no object record names (its object was
//!   deleted, or it was rebuilt elsewhere, while this host was away) is
//!   deleted once it has been seen unnamed for `orphan_grace_secs`: long
//!   enough that a create in progress has recorded its object.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use catalog::{ComponentRecord, ComponentState, ObjectRecord};
use objects::component::{Client, Request as ComponentRequest};
use objects::object::{Admission, ResyncJob};
use sharedlog::queue::QueueId;

use crate::daemon::{Node, Task};
use crate::storage::{first_component_address, hosts_by_id, now_ms};

pub const TASK_KIND: &str = "rebuild";
pub const RESYNC_KIND: &str = "resync";
/// How often a queued resync looks whether its turn has come.
const TURN_POLL: Duration = Duration::from_millis(200);
/// How often tasks and orphans are looked at.
const INTERVAL: Duration = Duration::from_secs(2);

#[derive(Default)]
pub struct Repairs {
    /// The rebuild under way on this host (object name), if any.
    running: Mutex<Option<String>>,
    /// Components on this host no record names, and since when.
    unnamed: Mutex<HashMap<u64, Instant>>,
}

/// What a rebuild task names: the object, the component's index and id.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Job {
    object: String,
    index: usize,
    component: u64,
}

impl Job {
    fn detail(&self) -> String {
        format!("{} {} {:#x}", self.object, self.index, self.component)
    }

    fn parse(detail: &str) -> Option<Job> {
        let mut parts = detail.split_whitespace();
        let object = parts.next()?.to_string();
        let index = parts.next()?.parse().ok()?;
        let component = u64::from_str_radix(parts.next()?.trim_start_matches("0x"), 16).ok()?;
        Some(Job { object, index, component })
    }

    /// Whether the record still has the component at that index, absent.
    fn applies(&self, record: &ObjectRecord) -> bool {
        record.components.get(self.index).is_some_and(|component| component.id == self.component)
            && matches!(record.states.get(self.index), Some(ComponentState::Absent { .. }))
    }
}

/// What a resync task names: the object, the owner's epoch, the copy
/// being brought back and the resync plan.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Turn {
    object: String,
    epoch: u64,
    component: usize,
    plan: u64,
}

impl Turn {
    fn detail(&self) -> String {
        format!("{} epoch {} component {} plan {}", self.object, self.epoch, self.component, self.plan)
    }

    fn parse(detail: &str) -> Option<Turn> {
        let parts: Vec<&str> = detail.split_whitespace().collect();
        let [object, "epoch", epoch, "component", component, "plan", plan] = parts[..] else { return None };
        Some(Turn {
            object: object.to_string(),
            epoch: epoch.parse().ok()?,
            component: component.parse().ok()?,
            plan: plan.parse().ok()?,
        })
    }

    /// Whether the host that queued it still owns the object at its epoch.
    fn applies(&self, created_by: u64, records: &BTreeMap<String, ObjectRecord>) -> bool {
        records.get(&self.object).is_some_and(|record| record.owner == created_by && record.owner_epoch == self.epoch)
    }
}

/// A resync's task in the queue, removed when this is dropped.
struct Queued {
    node: Weak<Node>,
    id: QueueId,
    runtime: tokio::runtime::Handle,
}

impl Drop for Queued {
    fn drop(&mut self) {
        let (node, id) = (self.node.clone(), self.id);
        self.runtime.spawn(async move {
            let Some(node) = node.upgrade() else { return };
            let Some(services) = node.services() else { return };
            if let Err(error) = services.tasks.remove(id).await {
                tracing::warn!(%id, %error, "cannot remove a finished resync task (the repair loop will)");
            }
        });
    }
}

/// Gives up the wait (and with it the task) when the owner does.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The owner's admission for object `name` at `epoch`: each resync queues a
/// `resync` task and copies once the task is among this host's first
/// `resync_concurrency` resync tasks in queue order. If the queue cannot be
/// written the resync runs anyway: healing is not held up by the log.
pub fn admission(node: &Arc<Node>, name: &str, epoch: u64) -> Admission {
    let node = Arc::downgrade(node);
    let name = name.to_string();
    let runtime = tokio::runtime::Handle::current();
    Arc::new(move |job: ResyncJob| {
        let turn = Turn { object: name.clone(), epoch, component: job.component, plan: job.plan };
        let waiting = AbortOnDrop(runtime.spawn(wait_turn(node.clone(), turn, runtime.clone())));
        Box::pin(async move {
            let mut waiting = waiting;
            match (&mut waiting.0).await {
                Ok(Some(queued)) => Box::new(queued) as Box<dyn Send>,
                _ => Box::new(()) as Box<dyn Send>,
            }
        })
    })
}

async fn wait_turn(node: Weak<Node>, turn: Turn, runtime: tokio::runtime::Handle) -> Option<Queued> {
    let strong = node.upgrade()?;
    let services = strong.services()?;
    let me = strong.config.node_id;
    let concurrency = strong.config.resync_concurrency.max(1);
    let task = crate::daemon::Task { kind: RESYNC_KIND.into(), detail: turn.detail(), created_by: me };
    let id = match services.tasks.enqueue(task).await {
        Ok((id, _)) => id,
        Err(error) => {
            tracing::warn!(detail = %turn.detail(), %error, "cannot queue the resync: running it now");
            return None;
        }
    };
    metrics::counter!("objects_resync_tasks_total").increment(1);
    let queued = Queued { node, id, runtime };
    let mut said = false;
    loop {
        match services.tasks.items().await {
            Ok(items) => {
                let mine: Vec<QueueId> = items
                    .iter()
                    .filter(|(_, _, task)| task.kind == RESYNC_KIND && task.created_by == me)
                    .map(|(id, _, _)| *id)
                    .collect();
                // Gone (removed as left behind by a lagging view): no wait.
                match mine.iter().position(|queued| *queued == id) {
                    Some(ahead) if ahead >= concurrency => {
                        if !said {
                            tracing::info!(detail = %turn.detail(), ahead, "resync queued behind others");
                            said = true;
                        }
                    }
                    _ => return Some(queued),
                }
            }
            Err(error) => tracing::debug!(%error, "reading the task queue"),
        }
        tokio::time::sleep(TURN_POLL).await;
    }
}

/// Starts the repair loop once the catalog is open.
pub fn start(node: Arc<Node>) {
    tokio::spawn(async move {
        let mut shutdown = node.shutdown_signal();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(INTERVAL) => {}
                _ = shutdown.changed() => return,
            }
            if let Err(reason) = tick(&node).await {
                tracing::debug!(%reason, "repair pass");
            }
            remove_orphans(&node).await;
        }
    });
}

async fn tick(node: &Arc<Node>) -> Result<(), String> {
    let services = node.services().ok_or("the catalog is not open")?;
    let me = node.config.node_id;
    let records: BTreeMap<String, ObjectRecord> =
        services.catalog.objects.entries_local().into_iter().map(|(name, record, _)| (name, record)).collect();
    let items = services.tasks.items().await.map_err(|error| error.to_string())?;
    for (id, _, task) in items.iter().filter(|(_, _, task)| task.kind == RESYNC_KIND) {
        if !Turn::parse(&task.detail).is_some_and(|turn| turn.applies(task.created_by, &records)) {
            tracing::info!(detail = %task.detail, owner = task.created_by, "removing a resync task its owner left behind");
            services.tasks.remove(*id).await.map_err(|error| error.to_string())?;
        }
    }
    let jobs: Vec<(QueueId, Job)> = items
        .into_iter()
        .filter(|(_, _, task)| task.kind == TASK_KIND)
        .filter_map(|(id, _, task)| Job::parse(&task.detail).map(|job| (id, job)))
        .collect();
    // Ask for the rebuilds that are due on the objects this host owns.
    let delay_ms = node.config.repair_delay_secs.saturating_mul(1000);
    let now = now_ms();
    for (name, record) in &records {
        if record.owner != me {
            continue;
        }
        for (index, state) in record.states.iter().enumerate() {
            let ComponentState::Absent { since_ms, .. } = state else { continue };
            if now.saturating_sub(*since_ms) < delay_ms {
                continue;
            }
            let job = Job { object: name.clone(), index, component: record.components[index].id };
            if jobs.iter().any(|(_, queued)| *queued == job) {
                continue;
            }
            let away_secs = now.saturating_sub(*since_ms) / 1000;
            tracing::warn!(object = %name, component = index, away_secs, "component absent past the repair delay: queueing a rebuild");
            let task = Task { kind: TASK_KIND.into(), detail: job.detail(), created_by: me };
            services.tasks.enqueue(task).await.map_err(|error| error.to_string())?;
        }
    }
    // Drop tasks that no longer apply; run the first one this host owns.
    for (id, job) in &jobs {
        match records.get(&job.object) {
            Some(record) if job.applies(record) => {
                if record.owner != me {
                    continue;
                }
                if node.repairs.running.lock().expect("running lock").is_some() {
                    return Ok(());
                }
                *node.repairs.running.lock().expect("running lock") = Some(job.object.clone());
                let result = rebuild(node, job, record).await;
                *node.repairs.running.lock().expect("running lock") = None;
                match result {
                    Ok(()) => {
                        services.tasks.remove(*id).await.map_err(|error| error.to_string())?;
                    }
                    Err(reason) => {
                        tracing::warn!(object = %job.object, component = job.index, %reason, "rebuild failed; will retry")
                    }
                }
                return Ok(());
            }
            Some(record) if record.owner != me => {}
            _ => {
                // Deleted, rebuilt, or back: nothing to do any more.
                services.tasks.remove(*id).await.map_err(|error| error.to_string())?;
            }
        }
    }
    Ok(())
}

/// Places and creates a new component and swaps it into the record.
async fn rebuild(node: &Arc<Node>, job: &Job, record: &ObjectRecord) -> Result<(), String> {
    let services = node.services().ok_or("the catalog is not open")?;
    let request = placement::Request {
        id: record.id,
        count: 1,
        bytes: crate::storage::component_blocks(record.policy, record.size_bytes) * blockstore::BLOCK_SIZE as u64,
        distinct_hosts: true,
        distinct_fault_domains: false,
        site: None,
        excluded_hosts: record.components.iter().map(|component| component.host).collect::<BTreeSet<_>>(),
    };
    let placed = crate::membership::place(node, request).await.map_err(|reason| format!("placing: {reason}"))?;
    let bucket = placed.first().ok_or("placement offered nothing")?.bucket;
    let address = first_component_address(&hosts_by_id(node), bucket.host)
        .ok_or_else(|| format!("host {} serves no components", bucket.host))?;
    // A fresh id: the old one may still exist on the host that is away.
    let id = (rand::random::<u64>() >> 16) << 8 | job.index as u64;
    let client = Client::new(node.transport.clone(), address);
    let blocks = crate::storage::component_blocks(record.policy, record.size_bytes);
    client
        .call(0, ComponentRequest::Create { component: id, disk: bucket.disk, blocks }, &[])
        .await
        .map_err(|error| format!("creating component {id:#x} on host {}: {error}", bucket.host))?;
    let me = node.config.node_id;
    let now = now_ms();
    let swapped = services
        .catalog
        .update_object(&job.object, |current| {
            if current.owner != me || current.owner_epoch != record.owner_epoch || !job.applies(current) {
                return None;
            }
            let mut updated = current.clone();
            updated.components[job.index] = ComponentRecord { id, host: bucket.host, disk: bucket.disk };
            // Nothing on it yet: resynced from the start.
            updated.states[job.index] = ComponentState::Absent { stale: 0, since_ms: now };
            // The open object still has the old component: it is deposed
            // and reopened at the next epoch with the new one.
            updated.owner_epoch += 1;
            Some(updated)
        })
        .await
        .map_err(|error| error.to_string())?;
    if swapped.is_none() {
        let _ = client.call(0, ComponentRequest::Delete { component: id }, &[]).await;
        return Err("the object changed meanwhile".into());
    }
    metrics::counter!("objects_rebuilds_total").increment(1);
    tracing::warn!(
        object = %job.object,
        component = job.index,
        old = format_args!("{:#x}", job.component),
        new = format_args!("{id:#x}"),
        host = bucket.host,
        "component rebuilt elsewhere: resyncing it from the start"
    );
    Ok(())
}

/// Deletes components on this host that no record names, once they have
/// been unnamed for the grace period.
async fn remove_orphans(node: &Arc<Node>) {
    let (Some(services), Some(service)) = (node.services(), node.storage.service.clone()) else { return };
    let me = node.config.node_id;
    let named: BTreeSet<u64> = services
        .catalog
        .objects
        .entries_local()
        .into_iter()
        .flat_map(|(_, record, _)| record.components.into_iter().filter(|component| component.host == me))
        .map(|component| component.id)
        .collect();
    let local: Vec<u64> = service.disks().iter().flat_map(|disk| disk.components()).map(|info| info.id).collect();
    let grace = Duration::from_secs(node.config.orphan_grace_secs);
    let due: Vec<u64> = {
        let mut unnamed = node.repairs.unnamed.lock().expect("unnamed lock");
        unnamed.retain(|id, _| local.contains(id) && !named.contains(id));
        for id in local.iter().filter(|id| !named.contains(id)) {
            unnamed.entry(*id).or_insert_with(Instant::now);
        }
        unnamed.iter().filter(|(_, since)| since.elapsed() >= grace).map(|(id, _)| *id).collect()
    };
    for id in due {
        match service.remove(id).await {
            Ok(()) => {
                metrics::counter!("objects_orphans_removed_total").increment(1);
                tracing::warn!(component = format_args!("{id:#x}"), "deleted a component no object names");
                node.repairs.unnamed.lock().expect("unnamed lock").remove(&id);
            }
            Err(error) => {
                tracing::warn!(component = format_args!("{id:#x}"), %error, "cannot delete an orphaned component")
            }
        }
    }
}
