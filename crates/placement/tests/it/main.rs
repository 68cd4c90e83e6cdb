//! Property tests: no placement violates a constraint or overcommits a
//! bucket, under random host arrivals, failures and returns.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use hierarchy::{HostId, HostInfo, Manager, ManagerConfig, Tree};
use placement::{
    check, choose, Bucket, BucketId, Candidate, Output, PlacementError, Request, Scheduler, SchedulerConfig,
    SchedulerMessage,
};
use proptest::prelude::*;

const CAPACITY: u64 = 1000;

struct Cluster {
    manager: Manager,
    schedulers: BTreeMap<HostId, Scheduler>,
    alive: BTreeSet<HostId>,
    /// Bytes granted per bucket, as the placements say.
    granted: BTreeMap<BucketId, u64>,
    now: u64,
    incarnations: u64,
}

fn site(host: HostId) -> Option<String> {
    Some(format!("site-{}", host % 2))
}

fn domain(host: HostId) -> Option<String> {
    Some(format!("rack-{}", host % 5))
}

fn buckets(host: HostId) -> Vec<Bucket> {
    (0..2)
        .map(|disk| Bucket {
            id: BucketId { host, disk },
            site: site(host),
            fault_domain: domain(host),
            capacity_bytes: CAPACITY,
            free_bytes: CAPACITY,
        })
        .collect()
}

impl Cluster {
    fn new(config: &SchedulerConfig) -> Cluster {
        let manager = Manager::new(ManagerConfig { fanout: 4 }, Tree::default(), BTreeMap::new(), Some(1));
        let mut cluster = Cluster {
            manager,
            schedulers: BTreeMap::new(),
            alive: BTreeSet::new(),
            granted: BTreeMap::new(),
            now: 0,
            incarnations: 0,
        };
        for host in 1..=6 {
            cluster.up(host, config);
        }
        cluster
    }

    fn publish(&mut self) {
        let tree = Arc::new(self.manager.tree().clone());
        for scheduler in self.schedulers.values_mut() {
            scheduler.set_tree(tree.clone());
        }
    }

    fn up(&mut self, host: HostId, config: &SchedulerConfig) {
        if self.alive.insert(host) {
            // A returning host reports its disks as they are (what was
            // granted on them before still counts).
            self.incarnations += 1;
            let mut scheduler = Scheduler::new(host, config.clone(), self.incarnations, 7);
            let mut local = buckets(host);
            for bucket in &mut local {
                bucket.free_bytes -= self.granted.get(&bucket.id).copied().unwrap_or(0);
            }
            scheduler.set_buckets(local);
            self.schedulers.insert(host, scheduler);
        }
        self.manager.host_up(host, HostInfo { site: site(host) });
        self.publish();
    }

    fn down(&mut self, host: HostId) {
        self.alive.remove(&host);
        self.schedulers.remove(&host);
        self.manager.host_down(host);
        self.publish();
    }

    /// Runs a request to completion on a loss-free, instant bus; a host
    /// that is down never answers, so its parent's deadline passes.
    fn place(&mut self, request: Request) -> Option<Result<Vec<Candidate>, PlacementError>> {
        let root = self.manager.tree().root?;
        let mut queue: VecDeque<(HostId, HostId, SchedulerMessage)> = VecDeque::new();
        let mut result = None;
        let mut out = Vec::new();
        self.schedulers.get_mut(&root)?.place(self.now, request.clone(), &mut out);
        drain(root, &mut out, &mut queue, &mut result);
        for _ in 0..100_000 {
            if result.is_some() {
                break;
            }
            match queue.pop_front() {
                Some((from, to, message)) => {
                    if let Some(scheduler) = self.schedulers.get_mut(&to) {
                        scheduler.handle(self.now, from, message, &mut out);
                        drain(to, &mut out, &mut queue, &mut result);
                    }
                }
                None => {
                    self.now += 1000;
                    for (host, scheduler) in self.schedulers.iter_mut() {
                        scheduler.tick(self.now, &mut out);
                        drain(*host, &mut out, &mut queue, &mut result);
                    }
                }
            }
        }
        // Let commits and acknowledgements settle.
        while let Some((from, to, message)) = queue.pop_front() {
            if let Some(scheduler) = self.schedulers.get_mut(&to) {
                scheduler.handle(self.now, from, message, &mut out);
                drain(to, &mut out, &mut queue, &mut result);
            }
        }
        result
    }

    /// Every bucket of a live host, with exactly what is free: what an
    /// all-knowing scheduler would see.
    fn omniscient(&self) -> Vec<Candidate> {
        self.alive
            .iter()
            .flat_map(|host| buckets(*host))
            .map(|bucket| {
                let mut candidate = Candidate::from_bucket(&bucket);
                candidate.free_bytes -= self.granted.get(&bucket.id).copied().unwrap_or(0);
                candidate
            })
            .collect()
    }
}

fn drain(
    from: HostId,
    out: &mut Vec<Output>,
    queue: &mut VecDeque<(HostId, HostId, SchedulerMessage)>,
    result: &mut Option<Result<Vec<Candidate>, PlacementError>>,
) {
    for output in out.drain(..) {
        match output {
            Output::Send { to, message } => queue.push_back((from, to, message)),
            Output::Placed { result: placed, .. } => *result = Some(placed),
        }
    }
}

fn request_strategy() -> impl Strategy<Value = Request> {
    (
        1usize..4,
        1u64..400,
        any::<bool>(),
        any::<bool>(),
        proptest::option::of(0u64..2),
        proptest::collection::btree_set(1u64..12, 0..3),
    )
        .prop_map(|(count, bytes, distinct_hosts, distinct_fault_domains, site, excluded_hosts)| Request {
            id: 0,
            count,
            bytes,
            distinct_hosts,
            distinct_fault_domains,
            site: site.map(|site| format!("site-{site}")),
            excluded_hosts,
        })
}

#[derive(Clone, Debug)]
enum Event {
    Place(Request),
    Up(u64),
    Down(u64),
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        6 => request_strategy().prop_map(Event::Place),
        1 => (1u64..12).prop_map(Event::Up),
        1 => (1u64..12).prop_map(Event::Down),
    ]
}

fn run(events: Vec<Event>, config: SchedulerConfig, exact: bool) -> Result<(), TestCaseError> {
    let mut cluster = Cluster::new(&config);
    let mut next_id = 1;
    for event in events {
        match event {
            Event::Up(host) => cluster.up(host, &config),
            Event::Down(host) => cluster.down(host),
            Event::Place(mut request) => {
                request.id = next_id;
                next_id += 1;
                let all_knowing = choose(&request, &cluster.omniscient());
                let Some(result) = cluster.place(request.clone()) else { continue };
                match result {
                    Ok(chosen) => {
                        prop_assert!(check(&request, &chosen).is_ok(), "{:?}", check(&request, &chosen));
                        for candidate in &chosen {
                            prop_assert!(cluster.alive.contains(&candidate.bucket.host), "placed on a failed host");
                            let granted = cluster.granted.entry(candidate.bucket).or_insert(0);
                            *granted += request.bytes;
                            prop_assert!(*granted <= CAPACITY, "{:?} overcommitted: {granted}", candidate.bucket);
                        }
                    }
                    Err(PlacementError::NotEnough { .. }) => {
                        if exact {
                            prop_assert!(
                                all_knowing.is_err(),
                                "asking everyone, it failed where an all-knowing choice succeeds: {all_knowing:?}"
                            );
                        }
                    }
                    Err(other) => prop_assert!(false, "{other:?}"),
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #[test]
    fn asking_everyone_places_exactly_what_can_be_placed(events in proptest::collection::vec(event(), 1..80)) {
        run(events, SchedulerConfig::default(), true)?;
    }

    #[test]
    fn sampling_places_exactly_what_can_be_placed_too(events in proptest::collection::vec(event(), 1..80)) {
        // A sample that finds too little is retried asking everyone.
        let config = SchedulerConfig { sample_branches: Some(1), sample_leaves: Some(2), ..SchedulerConfig::default() };
        run(events, config, true)?;
    }
}

/// Many requests in flight at once, every message delivered in a random
/// order: a leaf's answer may be measured before a grant reaches it and
/// arrive at the root after the grant was acknowledged. No bucket may be
/// granted more than it holds.
fn run_concurrent(
    requests: Vec<Request>,
    submit_every: Vec<u8>,
    seed: u64,
    config: SchedulerConfig,
) -> Result<(), TestCaseError> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut cluster = Cluster::new(&config);
    let root = cluster.manager.tree().root.expect("a root");
    let mut queue: Vec<(HostId, HostId, SchedulerMessage)> = Vec::new();
    let mut placed: BTreeMap<u64, Request> = BTreeMap::new();
    let mut results: Vec<(u64, Result<Vec<Candidate>, PlacementError>)> = Vec::new();
    let mut pending = requests.into_iter().enumerate().map(|(index, mut request)| {
        request.id = index as u64 + 1;
        request
    });
    let mut gaps = submit_every.into_iter().cycle();
    let mut until_next = 0u8;
    let mut out = Vec::new();
    let mut exhausted = false;
    for _ in 0..200_000 {
        if until_next == 0 && !exhausted {
            match pending.next() {
                Some(request) => {
                    placed.insert(request.id, request.clone());
                    cluster.schedulers.get_mut(&root).expect("root").place(cluster.now, request, &mut out);
                    until_next = gaps.next().unwrap_or(0);
                }
                None => exhausted = true,
            }
        } else {
            until_next = until_next.saturating_sub(1);
        }
        for output in out.drain(..) {
            match output {
                Output::Send { to, message } => queue.push((root, to, message)),
                Output::Placed { request_id, result } => results.push((request_id, result)),
            }
        }
        if queue.is_empty() {
            if exhausted && results.len() == placed.len() {
                break;
            }
            cluster.now += 10;
            for (host, scheduler) in cluster.schedulers.iter_mut() {
                let mut local = Vec::new();
                scheduler.tick(cluster.now, &mut local);
                for output in local {
                    match output {
                        Output::Send { to, message } => queue.push((*host, to, message)),
                        Output::Placed { request_id, result } => results.push((request_id, result)),
                    }
                }
            }
            continue;
        }
        let (from, to, message) = queue.swap_remove(rng.gen_range(0..queue.len()));
        if rng.gen_bool(0.05) {
            cluster.now += 1;
        }
        let Some(scheduler) = cluster.schedulers.get_mut(&to) else { continue };
        let mut local = Vec::new();
        scheduler.handle(cluster.now, from, message, &mut local);
        for output in local {
            match output {
                Output::Send { to: next, message } => queue.push((to, next, message)),
                Output::Placed { request_id, result } => results.push((request_id, result)),
            }
        }
    }
    prop_assert_eq!(results.len(), placed.len(), "every request was answered");
    let mut granted: BTreeMap<BucketId, u64> = BTreeMap::new();
    for (id, result) in results {
        let request = &placed[&id];
        if let Ok(chosen) = result {
            prop_assert!(check(request, &chosen).is_ok(), "{:?}", check(request, &chosen));
            for candidate in chosen {
                let total = granted.entry(candidate.bucket).or_insert(0);
                *total += request.bytes;
                prop_assert!(*total <= CAPACITY, "{:?} overcommitted: {} of {}", candidate.bucket, total, CAPACITY);
            }
        }
    }
    Ok(())
}

proptest! {
    #[test]
    fn concurrent_requests_on_a_reordering_network_never_overcommit(
        requests in proptest::collection::vec(request_strategy(), 1..40),
        submit_every in proptest::collection::vec(0u8..20, 1..8),
        seed in any::<u64>(),
    ) {
        run_concurrent(requests.clone(), submit_every.clone(), seed, SchedulerConfig::default())?;
        let sampled = SchedulerConfig { sample_branches: Some(1), sample_leaves: Some(2), ..SchedulerConfig::default() };
        run_concurrent(requests, submit_every, seed, sampled)?;
    }
}
