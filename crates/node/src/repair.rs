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
//! - A component on this host that no object record names (its object was
//!   deleted, or it was rebuilt elsewhere, while this host was away) is
//!   deleted once it has been seen unnamed for `orphan_grace_secs`: long
//!   enough that a create in progress has recorded its object.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use catalog::{ComponentRecord, ComponentState, ObjectRecord};
use objects::component::{Client, Request as ComponentRequest};

use crate::daemon::{Node, Task};
use crate::storage::{first_component_address, hosts_by_id, now_ms};

pub const TASK_KIND: &str = "rebuild";
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
    let jobs: Vec<(sharedlog::queue::QueueId, Job)> = items
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
        bytes: record.size_bytes,
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
    let blocks = record.size_bytes / blockstore::BLOCK_SIZE as u64;
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
