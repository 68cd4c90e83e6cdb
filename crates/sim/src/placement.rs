//! The hierarchical scheduler at scale: one [`placement::Scheduler`] per
//! host on a seeded discrete-event clock. Every host is a single-threaded
//! server: handling a message costs a fixed time plus a little per
//! candidate it carries (the cost model), so queueing at the root and the
//! branches limits throughput as it would on real hosts.
//!
//! Measured: placements per second, placement latency, and quality: the
//! same request sequence placed by an all-knowing best fit (every bucket's
//! exact free space, greedy), compared by the fullest bucket's utilization
//! and the spread of utilization.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::Arc;

use hierarchy::{HostId, HostInfo, Manager, ManagerConfig, Tree};
use placement::{choose, Bucket, BucketId, Candidate, Output, Request, Scheduler, SchedulerConfig, SchedulerMessage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Virtual time in microseconds.
type Micros = u64;

#[derive(Clone, Debug)]
pub struct Scenario {
    pub hosts: u64,
    pub sites: u64,
    pub fault_domains_per_site: u64,
    pub disks_per_host: u32,
    pub fanout: usize,
    pub scheduler: SchedulerConfig,
    /// Requests kept outstanding at the root.
    pub concurrency: usize,
    pub requests: usize,
    /// Buckets per request (components of an object).
    pub count: usize,
    /// Share of requests with site affinity.
    pub site_affinity: f64,
    /// How full the requests leave the cluster (their sizes follow).
    pub fill: f64,
    pub network_delay_min: Micros,
    pub network_delay_max: Micros,
    /// Cost model: handling one message.
    pub cost_per_message: Micros,
    /// Cost model: per candidate in a message handled.
    pub cost_per_candidate_ns: u64,
}

impl Scenario {
    pub fn new(hosts: u64) -> Scenario {
        Scenario {
            hosts,
            sites: 4,
            fault_domains_per_site: 16,
            disks_per_host: 2,
            fanout: 32,
            scheduler: SchedulerConfig::default(),
            concurrency: 64,
            requests: 10_000,
            count: 3,
            site_affinity: 0.2,
            fill: 0.6,
            network_delay_min: 100,
            network_delay_max: 500,
            cost_per_message: 20,
            cost_per_candidate_ns: 500,
        }
    }
}

#[derive(Debug)]
pub struct Report {
    pub hosts: u64,
    pub placed: usize,
    pub failed: usize,
    pub placements_per_second: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub messages_per_placement: f64,
    /// Fullest bucket's utilization: hierarchical, all-knowing.
    pub max_utilization: (f64, f64),
    /// Standard deviation of bucket utilization: hierarchical, all-knowing.
    pub utilization_stddev: (f64, f64),
    /// Real time spent in scheduler code per message (what the cost model
    /// stands for, without the network stack).
    pub measured_ns_per_message: f64,
    pub violations: Vec<String>,
}

enum Event {
    Deliver { to: HostId, from: HostId, message: SchedulerMessage, candidates: usize },
    Tick(HostId),
    Submit,
}

struct Sim {
    scenario: Scenario,
    rng: StdRng,
    queue: BinaryHeap<Reverse<(Micros, u64, usize)>>,
    events: Vec<Option<Event>>,
    sequence: u64,
    now: Micros,
    schedulers: BTreeMap<HostId, Scheduler>,
    /// When each host is next free to handle a message.
    busy_until: BTreeMap<HostId, Micros>,
    root: HostId,
    requests: Vec<Request>,
    submitted: usize,
    started: BTreeMap<u64, Micros>,
    latencies: Vec<Micros>,
    results: BTreeMap<u64, Vec<Candidate>>,
    failed: usize,
    messages: u64,
    handle_nanos: u128,
    handles: u64,
}

fn candidates_in(message: &SchedulerMessage) -> usize {
    match message {
        SchedulerMessage::Answer { candidates, .. } => candidates.len(),
        _ => 0,
    }
}

impl Sim {
    fn schedule(&mut self, at: Micros, event: Event) {
        self.sequence += 1;
        self.events.push(Some(event));
        self.queue.push(Reverse((at, self.sequence, self.events.len() - 1)));
    }

    fn outputs(&mut self, from: HostId, ready_at: Micros, outputs: Vec<Output>) {
        for output in outputs {
            match output {
                Output::Send { to, message } => {
                    self.messages += 1;
                    let delay = self.rng.gen_range(self.scenario.network_delay_min..=self.scenario.network_delay_max);
                    let candidates = candidates_in(&message);
                    self.schedule(ready_at + delay, Event::Deliver { to, from, message, candidates });
                }
                Output::Placed { request_id, result } => {
                    let started = self.started.remove(&request_id).expect("a placed request was started");
                    self.latencies.push(ready_at - started);
                    match result {
                        Ok(chosen) => {
                            self.results.insert(request_id, chosen);
                        }
                        Err(_) => self.failed += 1,
                    }
                    self.schedule(ready_at, Event::Submit);
                }
            }
        }
    }

    /// Runs `work` on host `id` when it is free; the cost model says how long
    /// it keeps the host busy.
    fn on_host(&mut self, id: HostId, cost: Micros, work: impl FnOnce(&mut Scheduler, Micros, &mut Vec<Output>)) {
        let start = self.now.max(self.busy_until.get(&id).copied().unwrap_or(0));
        let done = start + cost;
        self.busy_until.insert(id, done);
        let mut out = Vec::new();
        let scheduler = self.schedulers.get_mut(&id).expect("known host");
        let began = std::time::Instant::now();
        work(scheduler, done / 1000, &mut out);
        self.handle_nanos += began.elapsed().as_nanos();
        self.handles += 1;
        let next = scheduler.tick(done / 1000, &mut out);
        self.outputs(id, done, out);
        if let Some(next) = next {
            self.schedule(next * 1000, Event::Tick(id));
        }
    }
}

fn utilization(buckets: &BTreeMap<BucketId, (u64, u64)>) -> (f64, f64) {
    let values: Vec<f64> = buckets.values().map(|(capacity, used)| *used as f64 / *capacity as f64).collect();
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    let variance = values.iter().map(|value| (value - mean).powi(2)).sum::<f64>() / values.len() as f64;
    (values.iter().copied().fold(0.0, f64::max), variance.sqrt())
}

pub fn run(seed: u64, scenario: &Scenario) -> Report {
    let mut rng = StdRng::seed_from_u64(seed);
    let site_of = |host: HostId| format!("site-{}", host % scenario.sites);
    let domain_of = |host: HostId| format!("rack-{}", host % (scenario.sites * scenario.fault_domains_per_site));
    let mut manager =
        Manager::new(ManagerConfig { fanout: scenario.fanout }, Tree::default(), BTreeMap::new(), Some(1));
    let mut buckets: BTreeMap<BucketId, Bucket> = BTreeMap::new();
    for host in 1..=scenario.hosts {
        manager.host_up(host, HostInfo { site: Some(site_of(host)) });
        for disk in 0..scenario.disks_per_host {
            // 1 to 4 TB, in GB.
            let capacity = rng.gen_range(1_000..=4_000);
            let id = BucketId { host, disk };
            buckets.insert(
                id,
                Bucket {
                    id,
                    site: Some(site_of(host)),
                    fault_domain: Some(domain_of(host)),
                    capacity_bytes: capacity,
                    free_bytes: capacity,
                },
            );
        }
    }
    let tree = Arc::new(manager.tree().clone());
    let mut schedulers = BTreeMap::new();
    for host in 1..=scenario.hosts {
        let mut scheduler = Scheduler::new(host, scenario.scheduler.clone(), 1, seed);
        scheduler.set_tree(tree.clone());
        scheduler.set_buckets(buckets.values().filter(|bucket| bucket.id.host == host).cloned().collect());
        schedulers.insert(host, scheduler);
    }
    // The request sequence: sized so the cluster ends `fill` full.
    let total_capacity: u64 = buckets.values().map(|bucket| bucket.capacity_bytes).sum();
    let mean_bytes = (total_capacity as f64 * scenario.fill / (scenario.requests * scenario.count) as f64).max(1.0);
    let requests: Vec<Request> = (0..scenario.requests)
        .map(|index| Request {
            id: index as u64 + 1,
            count: scenario.count,
            bytes: rng.gen_range(1..=(2.0 * mean_bytes) as u64),
            distinct_hosts: true,
            distinct_fault_domains: true,
            site: rng.gen_bool(scenario.site_affinity).then(|| format!("site-{}", rng.gen_range(0..scenario.sites))),
            excluded_hosts: Default::default(),
        })
        .collect();
    let mut sim = Sim {
        scenario: scenario.clone(),
        rng,
        queue: BinaryHeap::new(),
        events: Vec::new(),
        sequence: 0,
        now: 0,
        schedulers,
        busy_until: BTreeMap::new(),
        root: tree.root.expect("a tree with hosts has a root"),
        requests: requests.clone(),
        submitted: 0,
        started: BTreeMap::new(),
        latencies: Vec::new(),
        results: BTreeMap::new(),
        failed: 0,
        messages: 0,
        handle_nanos: 0,
        handles: 0,
    };
    for _ in 0..scenario.concurrency {
        sim.schedule(0, Event::Submit);
    }
    let mut last_completion = 0;
    while let Some(Reverse((at, _, index))) = sim.queue.pop() {
        sim.now = at;
        match sim.events[index].take().expect("each event runs once") {
            Event::Submit => {
                if sim.submitted < sim.requests.len() {
                    let request = sim.requests[sim.submitted].clone();
                    sim.submitted += 1;
                    sim.started.insert(request.id, sim.now);
                    let root = sim.root;
                    let cost = sim.scenario.cost_per_message;
                    sim.on_host(root, cost, |scheduler, now, out| scheduler.place(now, request, out));
                } else if sim.started.is_empty() && last_completion == 0 {
                    last_completion = sim.now;
                }
            }
            Event::Deliver { to, from, message, candidates } => {
                let cost =
                    sim.scenario.cost_per_message + (candidates as u64 * sim.scenario.cost_per_candidate_ns) / 1000;
                sim.on_host(to, cost, |scheduler, now, out| scheduler.handle(now, from, message, out));
            }
            Event::Tick(host) => {
                let now = sim.now / 1000;
                let mut out = Vec::new();
                let next = sim.schedulers.get_mut(&host).expect("known host").tick(now, &mut out);
                let ready = sim.now;
                sim.outputs(host, ready, out);
                if let Some(next) = next {
                    if next * 1000 > sim.now {
                        sim.schedule(next * 1000, Event::Tick(host));
                    }
                }
            }
        }
    }
    let elapsed = last_completion.max(sim.now).max(1);
    // Quality: hierarchical against an all-knowing best fit, same requests.
    let mut violations = Vec::new();
    let mut hierarchical: BTreeMap<BucketId, (u64, u64)> =
        buckets.iter().map(|(id, bucket)| (*id, (bucket.capacity_bytes, 0))).collect();
    for request in &requests {
        if let Some(chosen) = sim.results.get(&request.id) {
            if let Err(violation) = placement::check(request, chosen) {
                violations.push(format!("request {}: {violation}", request.id));
            }
            for candidate in chosen {
                let entry = hierarchical.get_mut(&candidate.bucket).expect("a known bucket");
                entry.1 += request.bytes;
                if entry.1 > entry.0 {
                    violations.push(format!("{:?} overcommitted", candidate.bucket));
                }
            }
        }
    }
    let mut all_knowing: BTreeMap<BucketId, (u64, u64)> =
        buckets.iter().map(|(id, bucket)| (*id, (bucket.capacity_bytes, 0))).collect();
    for request in &requests {
        let candidates: Vec<Candidate> = buckets
            .values()
            .map(|bucket| {
                let mut candidate = Candidate::from_bucket(bucket);
                candidate.free_bytes = bucket.capacity_bytes - all_knowing[&bucket.id].1;
                candidate
            })
            .collect();
        if let Ok(chosen) = choose(request, &candidates) {
            for candidate in chosen {
                all_knowing.get_mut(&candidate.bucket).expect("a known bucket").1 += request.bytes;
            }
        }
    }
    let (ours_max, ours_spread) = utilization(&hierarchical);
    let (best_max, best_spread) = utilization(&all_knowing);
    let mut latencies = sim.latencies.clone();
    latencies.sort_unstable();
    let percentile = |fraction: f64| {
        latencies.get(((latencies.len() as f64 - 1.0) * fraction) as usize).copied().unwrap_or(0) as f64 / 1000.0
    };
    Report {
        hosts: scenario.hosts,
        placed: sim.results.len(),
        failed: sim.failed,
        placements_per_second: sim.results.len() as f64 / (elapsed as f64 / 1e6),
        latency_p50_ms: percentile(0.5),
        latency_p99_ms: percentile(0.99),
        messages_per_placement: sim.messages as f64 / requests.len() as f64,
        max_utilization: (ours_max, best_max),
        utilization_stddev: (ours_spread, best_spread),
        measured_ns_per_message: sim.handle_nanos as f64 / sim.handles.max(1) as f64,
        violations,
    }
}
