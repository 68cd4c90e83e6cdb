//! The aggregation hierarchy at scale: thousands of [`hierarchy::Agent`]s and
//! a [`hierarchy::Manager`] on a seeded discrete-event clock, with message
//! loss, delay, stalled hosts, and killed leaves, branches and roots.
//!
//! Measured: failure detection time, messages per host per second, time to
//! repair the tree after a branch or root failure, and false positives
//! (hosts declared failed that were alive) per 1,000 host-hours.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::Arc;

use hierarchy::{Agent, AgentConfig, HostId, HostInfo, Input, Manager, ManagerConfig, Message, Millis, Output, Tree};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Clone, Debug)]
pub struct Scenario {
    pub hosts: u64,
    pub sites: u64,
    pub fanout: usize,
    pub loss_probability: f64,
    pub delay_min: Millis,
    pub delay_max: Millis,
    /// How long a tree change takes to reach a host (catalog commit + watch).
    pub catalog_delay_max: Millis,
    /// How long a new manager takes to appear after the old one dies (a new
    /// log leader's election).
    pub election_delay: Millis,
    pub duration: Millis,
    /// Kills, spaced through the run: leaves, branches and roots in turn.
    pub kills: usize,
    /// Short stalls (a host stops processing for 0.5 to 2 s, as in a long
    /// GC pause): they must not get a host declared failed.
    pub stalls: usize,
    /// Long stalls (5 to 10 s): the host is unresponsive and may be
    /// declared failed; it registers again when it resumes.
    pub long_stalls: usize,
    pub agent: AgentConfig,
}

impl Scenario {
    pub fn new(hosts: u64) -> Scenario {
        Scenario {
            hosts,
            sites: 4,
            fanout: 32,
            loss_probability: 0.01,
            delay_min: 1,
            delay_max: 5,
            catalog_delay_max: 150,
            election_delay: 1500,
            duration: 120_000,
            kills: 6,
            stalls: 20,
            long_stalls: 2,
            agent: AgentConfig::default(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Victim {
    Leaf,
    Branch,
    Root,
}

#[derive(Clone, Debug)]
pub struct Detection {
    pub victim: Victim,
    pub host: HostId,
    pub detected_after: Option<Millis>,
    /// Until every host the victim watched has a live place again.
    pub repaired_after: Option<Millis>,
}

#[derive(Debug)]
pub struct Report {
    pub seed: u64,
    pub hosts: u64,
    pub detections: Vec<Detection>,
    pub false_positives: usize,
    /// Hosts in a long stall that were declared failed (correctly).
    pub stall_detections: usize,
    pub host_hours: f64,
    pub messages_per_host_per_second: f64,
    pub messages_sent: u64,
    /// Heartbeats, summaries, probes, probe replies.
    pub messages_by_kind: [u64; 4],
    pub tree_changes: u64,
    /// Messages per second arriving at the busiest host (the root's home,
    /// usually): what a central monitor would take for every host.
    pub busiest_inbound_per_second: f64,
    pub invariant_violations: Vec<String>,
}

impl Report {
    pub fn false_positives_per_1000_host_hours(&self) -> f64 {
        self.false_positives as f64 * 1000.0 / self.host_hours.max(f64::MIN_POSITIVE)
    }

    pub fn worst_detection(&self) -> Option<Millis> {
        self.detections.iter().filter_map(|detection| detection.detected_after).max()
    }
}

#[derive(Debug)]
enum Event {
    Wake(HostId),
    Deliver {
        to: HostId,
        from: HostId,
        message: Message,
    },
    Tree {
        to: HostId,
        tree: Arc<Tree>,
    },
    /// The manager's home learns of a failure the root found.
    Failed {
        host: HostId,
    },
    Kill(HostId, Victim),
    Stall(HostId, Millis),
    NewManager,
    Rejoin(HostId),
}

struct Host {
    agent: Agent,
    alive: bool,
    stalled_until: Millis,
    long_stall: bool,
    killed_at: Option<Millis>,
    /// The wake-up this host has scheduled (others in the queue are stale).
    next_wake: Millis,
}

struct Sim {
    scenario: Scenario,
    rng: StdRng,
    now: Millis,
    queue: BinaryHeap<Reverse<(Millis, u64, usize)>>,
    events: Vec<Option<Event>>,
    sequence: u64,
    hosts: BTreeMap<HostId, Host>,
    manager: Option<Manager>,
    manager_home: HostId,
    messages: u64,
    /// Heartbeats, summaries, probes, probe replies.
    by_kind: [u64; 4],
    inbound: BTreeMap<HostId, u64>,
    tree_changes: u64,
    detections: Vec<Detection>,
    /// Hosts each pending detection waits to see re-placed.
    repairs: Vec<(usize, Vec<HostId>)>,
    false_positives: usize,
    stall_detections: usize,
    violations: Vec<String>,
    alive_host_millis: u128,
    last_accounting: Millis,
    /// The tree as the catalog holds it (what a new manager starts from).
    last_tree: Tree,
    /// (when, new root, previous root): the hand-over hint to deliver.
    hints: Vec<(Millis, HostId, HostId)>,
}

impl Sim {
    fn schedule(&mut self, at: Millis, event: Event) {
        self.sequence += 1;
        self.events.push(Some(event));
        self.queue.push(Reverse((at, self.sequence, self.events.len() - 1)));
    }

    fn site(&self, host: HostId) -> Option<String> {
        Some(format!("site-{}", host % self.scenario.sites.max(1)))
    }

    fn account(&mut self) {
        let alive = self.hosts.values().filter(|host| host.alive).count() as u128;
        self.alive_host_millis += alive * (self.now - self.last_accounting) as u128;
        self.last_accounting = self.now;
    }

    fn broadcast_tree(&mut self) {
        let Some(manager) = &self.manager else { return };
        if let Err(violation) = manager.check() {
            self.violations.push(format!("at {} ms: {violation}", self.now));
        }
        self.tree_changes += 1;
        let tree = Arc::new(manager.tree().clone());
        let ids: Vec<HostId> = self.hosts.keys().copied().collect();
        for id in ids {
            let delay = self.rng.gen_range(1..=self.scenario.catalog_delay_max.max(1));
            self.schedule(self.now + delay, Event::Tree { to: id, tree: tree.clone() });
        }
    }

    fn send(&mut self, from: HostId, to: HostId, message: Message) {
        self.messages += 1;
        let kind = match &message {
            Message::Heartbeat { .. } => 0,
            Message::Summary { .. } => 1,
            Message::Probe { .. } => 2,
            Message::ProbeReply { .. } => 3,
        };
        self.by_kind[kind] += 1;
        *self.inbound.entry(to).or_default() += 1;
        if self.rng.gen_bool(self.scenario.loss_probability.clamp(0.0, 1.0)) {
            return;
        }
        let delay = self.rng.gen_range(self.scenario.delay_min..=self.scenario.delay_max.max(self.scenario.delay_min));
        self.schedule(self.now + delay, Event::Deliver { to, from, message });
    }

    fn outputs(&mut self, from: HostId, outputs: Vec<Output>) {
        for output in outputs {
            match output {
                Output::Send { to, message } => self.send(from, to, message),
                // The root runs on the manager's home: reports are local.
                Output::Failed(host) if from == self.manager_home => {
                    self.schedule(self.now + 1, Event::Failed { host })
                }
                _ => {}
            }
        }
    }

    /// Runs a host's agent for one input (or just a tick), unless it is
    /// dead; a stalled host handles it when the stall ends.
    fn run_host(&mut self, id: HostId, input: Option<Input>) {
        let now = self.now;
        let Some(host) = self.hosts.get_mut(&id) else { return };
        if !host.alive {
            return;
        }
        if host.stalled_until > now {
            let at = host.stalled_until;
            match input {
                Some(Input::Received { from, message }) => self.schedule(at, Event::Deliver { to: id, from, message }),
                Some(Input::Tree(tree)) => self.schedule(at, Event::Tree { to: id, tree }),
                Some(Input::Suspect(_)) | None => self.schedule(at, Event::Wake(id)),
            }
            return;
        }
        let mut out = Vec::new();
        if let Some(input) = input {
            host.agent.handle(now, input, &mut out);
        }
        let next = host.agent.tick(now, &mut out);
        let reschedule = next < host.next_wake || host.next_wake <= now;
        if reschedule {
            host.next_wake = next;
        }
        self.outputs(id, out);
        if reschedule {
            self.schedule(next, Event::Wake(id));
        }
    }

    fn pick_victim(&mut self, victim: Victim) -> Option<HostId> {
        let manager = self.manager.as_ref()?;
        let tree = manager.tree();
        let candidates: Vec<HostId> = match victim {
            Victim::Root => tree.root.into_iter().collect(),
            Victim::Branch => tree.branches.keys().copied().filter(|branch| Some(*branch) != tree.root).collect(),
            Victim::Leaf => tree.branches.values().flat_map(|branch| branch.children.iter().copied()).collect(),
        };
        let alive: Vec<HostId> = candidates.into_iter().filter(|id| self.hosts[id].alive).collect();
        (!alive.is_empty()).then(|| alive[self.rng.gen_range(0..alive.len())])
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Wake(id) => {
                if self.hosts.get(&id).is_some_and(|host| host.next_wake == self.now) {
                    self.run_host(id, None);
                }
            }
            Event::Deliver { to, from, message } => self.run_host(to, Some(Input::Received { from, message })),
            Event::Tree { to, tree } => {
                self.run_host(to, Some(Input::Tree(tree.clone())));
                self.check_repairs(to, &tree);
            }
            Event::Failed { host } => self.manager_failed(host),
            Event::Kill(id, victim) => {
                let Some(id) = (if id == 0 { self.pick_victim(victim) } else { Some(id) }) else { return };
                self.account();
                let watched = self
                    .manager
                    .as_ref()
                    .and_then(|manager| manager.tree().role(id))
                    .map(|role| role.watches)
                    .unwrap_or_default();
                let host = self.hosts.get_mut(&id).expect("known host");
                host.alive = false;
                host.killed_at = Some(self.now);
                self.detections.push(Detection { victim, host: id, detected_after: None, repaired_after: None });
                let index = self.detections.len() - 1;
                let orphans: Vec<HostId> = watched.into_iter().filter(|other| self.hosts[other].alive).collect();
                self.repairs.push((index, orphans));
                if id == self.manager_home {
                    self.manager = None;
                    self.schedule(self.now + self.scenario.election_delay, Event::NewManager);
                }
            }
            Event::Stall(id, duration) => {
                if let Some(host) = self.hosts.get_mut(&id) {
                    host.stalled_until = self.now + duration;
                    host.long_stall = duration >= 5000;
                }
            }
            Event::NewManager => {
                // A new log leader among the first hosts takes over, from the
                // tree the catalog holds, with every host not known dead.
                let previous = self.manager_home;
                let Some(home) = self.hosts.iter().find(|(_, host)| host.alive).map(|(id, _)| *id) else { return };
                self.manager_home = home;
                let tree = self.last_tree.clone();
                let infos: BTreeMap<HostId, HostInfo> =
                    tree.hosts().into_iter().map(|id| (id, HostInfo { site: self.site(id) })).collect();
                let mut manager = Manager::new(ManagerConfig { fanout: self.scenario.fanout }, tree, infos, Some(home));
                manager.take_over(home);
                self.manager = Some(manager);
                self.broadcast_tree();
                // Tell the new root to look at the old one first.
                let delay = self.scenario.catalog_delay_max + 1;
                self.schedule_hint(home, previous, delay);
            }
            Event::Rejoin(id) => {
                if let Some(manager) = self.manager.as_mut() {
                    if self.hosts[&id].alive
                        && manager
                            .host_up(id, HostInfo { site: Some(format!("site-{}", id % self.scenario.sites.max(1))) })
                    {
                        self.broadcast_tree();
                        self.remember_tree();
                    }
                }
            }
        }
    }

    fn schedule_hint(&mut self, home: HostId, previous: HostId, delay: Millis) {
        self.hints.push((self.now + delay, home, previous));
    }

    fn manager_failed(&mut self, host: HostId) {
        let role_before = self.last_tree.role(host);
        let Some(manager) = self.manager.as_mut() else { return };
        if !manager.host_down(host) {
            return;
        }
        self.remember_tree();
        self.broadcast_tree();
        let now = self.now;
        let state = &self.hosts[&host];
        match state.killed_at {
            Some(killed_at) => {
                if let Some(detection) = self
                    .detections
                    .iter_mut()
                    .find(|detection| detection.host == host && detection.detected_after.is_none())
                {
                    detection.detected_after = Some(now - killed_at);
                }
            }
            None if state.stalled_until > now && state.long_stall => {
                // Unresponsive for seconds: declaring it failed is right.
                self.stall_detections += 1;
                self.schedule(state.stalled_until + 1000, Event::Rejoin(host));
            }
            None => {
                self.false_positives += 1;
                if std::env::var_os("TESSERA_SIM_DEBUG").is_some() {
                    eprintln!(
                        "false positive at {now}: host {host} (stalled until {}, role before {:?})",
                        state.stalled_until, role_before
                    );
                }
                // A live host that finds itself out of the tree registers
                // again (the node re-registers when the catalog says down).
                self.schedule(now + 1000, Event::Rejoin(host));
            }
        }
    }

    fn remember_tree(&mut self) {
        if let Some(manager) = &self.manager {
            self.last_tree = manager.tree().clone();
        }
    }

    /// A repair is complete when every orphan of a failed branch or root has
    /// received a tree that gives it a live parent (or makes it the root).
    fn check_repairs(&mut self, host: HostId, tree: &Tree) {
        let parents = tree.parents();
        let now = self.now;
        for (index, orphans) in self.repairs.iter_mut() {
            let detection = &mut self.detections[*index];
            if detection.repaired_after.is_some() || detection.detected_after.is_none() {
                continue;
            }
            if orphans.contains(&host) {
                let placed =
                    tree.root == Some(host) || parents.get(&host).is_some_and(|parent| *parent != detection.host);
                if placed {
                    orphans.retain(|orphan| *orphan != host);
                }
            }
            if orphans.is_empty() {
                let killed_at = self.hosts[&detection.host].killed_at.expect("a repair follows a kill");
                detection.repaired_after = Some(now - killed_at);
            }
        }
    }
}

// Fields used by the manager hand-over, kept apart for clarity.
impl Sim {
    fn pending_hints(&mut self) {
        let now = self.now;
        let due: Vec<(Millis, HostId, HostId)> = self.hints.iter().copied().filter(|(at, _, _)| *at <= now).collect();
        self.hints.retain(|(at, _, _)| *at > now);
        for (_, home, previous) in due {
            self.run_host(home, Some(Input::Suspect(previous)));
        }
    }
}

/// Runs the scenario for `seed`.
pub fn run(seed: u64, scenario: &Scenario) -> Report {
    let mut sim = Sim {
        scenario: scenario.clone(),
        rng: StdRng::seed_from_u64(seed),
        now: 0,
        queue: BinaryHeap::new(),
        events: Vec::new(),
        sequence: 0,
        hosts: BTreeMap::new(),
        manager: None,
        manager_home: 1,
        messages: 0,
        by_kind: [0; 4],
        inbound: BTreeMap::new(),
        tree_changes: 0,
        detections: Vec::new(),
        repairs: Vec::new(),
        false_positives: 0,
        stall_detections: 0,
        violations: Vec::new(),
        alive_host_millis: 0,
        last_accounting: 0,
        last_tree: Tree::default(),
        hints: Vec::new(),
    };
    let mut manager =
        Manager::new(ManagerConfig { fanout: scenario.fanout }, Tree::default(), BTreeMap::new(), Some(1));
    for id in 1..=scenario.hosts {
        manager.host_up(id, HostInfo { site: sim.site(id) });
        sim.hosts.insert(
            id,
            Host {
                agent: Agent::new(id, scenario.agent.clone()),
                alive: true,
                stalled_until: 0,
                long_stall: false,
                killed_at: None,
                next_wake: 0,
            },
        );
    }
    sim.manager = Some(manager);
    sim.remember_tree();
    sim.broadcast_tree();
    for id in 1..=scenario.hosts {
        let start = sim.rng.gen_range(0..scenario.agent.heartbeat_interval);
        sim.hosts.get_mut(&id).expect("inserted").next_wake = start;
        sim.schedule(start, Event::Wake(id));
    }
    // Faults spaced through the run (after a warm-up, before the end), in
    // the order leaf, branch, root, leaf, …
    let warm_up = 10_000;
    let span = scenario.duration.saturating_sub(warm_up + 20_000).max(1);
    for kill in 0..scenario.kills {
        let at = warm_up + span * kill as u64 / scenario.kills.max(1) as u64;
        let victim = [Victim::Leaf, Victim::Branch, Victim::Root][kill % 3];
        sim.schedule(at, Event::Kill(0, victim));
    }
    for (count, durations) in [(scenario.stalls, 500..2000), (scenario.long_stalls, 5000..10_000)] {
        for _ in 0..count {
            let at = sim.rng.gen_range(warm_up..warm_up + span);
            let host = sim.rng.gen_range(1..=scenario.hosts);
            let duration = sim.rng.gen_range(durations.clone());
            sim.schedule(at, Event::Stall(host, duration));
        }
    }
    while let Some(Reverse((at, _, index))) = sim.queue.pop() {
        if at > scenario.duration {
            break;
        }
        sim.now = at;
        sim.pending_hints();
        let event = sim.events[index].take().expect("each event runs once");
        sim.handle(event);
    }
    sim.now = scenario.duration;
    sim.account();
    let host_seconds = sim.alive_host_millis as f64 / 1000.0;
    Report {
        seed,
        hosts: scenario.hosts,
        detections: sim.detections,
        false_positives: sim.false_positives,
        stall_detections: sim.stall_detections,
        host_hours: host_seconds / 3600.0,
        messages_per_host_per_second: sim.messages as f64 / host_seconds.max(f64::MIN_POSITIVE),
        messages_sent: sim.messages,
        messages_by_kind: sim.by_kind,
        tree_changes: sim.tree_changes,
        busiest_inbound_per_second: sim.inbound.values().copied().max().unwrap_or(0) as f64
            / (scenario.duration as f64 / 1000.0).max(f64::MIN_POSITIVE),
        invariant_violations: sim.violations,
    }
}

/// The reference the hierarchy is measured against: a flat monitor. Every
/// host heartbeats one central monitor (host 1, never faulted) at the same
/// interval, over the same lossy network, with the same stalls and kills;
/// the monitor declares a host failed after the same `fail_after` of
/// silence, with no suspicion and no probing. Detection and messages per
/// host are comparable; the monitor's inbound load grows with the cluster.
pub fn run_flat(seed: u64, scenario: &Scenario) -> Report {
    enum Flat {
        Beat(HostId),
        Deadline(HostId, Millis),
        Rejoin(HostId),
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let config = &scenario.agent;
    struct Queue {
        heap: BinaryHeap<Reverse<(Millis, u64, usize)>>,
        events: Vec<Option<Flat>>,
    }
    impl Queue {
        fn schedule(&mut self, at: Millis, event: Flat) {
            self.events.push(Some(event));
            let index = self.events.len() - 1;
            self.heap.push(Reverse((at, index as u64, index)));
        }
        fn pop(&mut self) -> Option<(Millis, Flat)> {
            let Reverse((at, _, index)) = self.heap.pop()?;
            Some((at, self.events[index].take().expect("each event runs once")))
        }
    }
    let mut queue = Queue { heap: BinaryHeap::new(), events: Vec::new() };
    struct State {
        alive: bool,
        killed_at: Option<Millis>,
        stalled_until: Millis,
        long_stall: bool,
        last_heard: Millis,
        failed: bool,
    }
    let mut hosts: BTreeMap<HostId, State> = (1..=scenario.hosts)
        .map(|id| {
            let state = State {
                alive: true,
                killed_at: None,
                stalled_until: 0,
                long_stall: false,
                last_heard: 0,
                failed: false,
            };
            (id, state)
        })
        .collect();
    for id in 2..=scenario.hosts {
        let start = rng.gen_range(0..config.heartbeat_interval);
        queue.schedule(start, Flat::Beat(id));
        queue.schedule(config.fail_after, Flat::Deadline(id, 0));
    }
    let warm_up = 10_000;
    let span = scenario.duration.saturating_sub(warm_up + 20_000).max(1);
    let mut kills: Vec<(Millis, HostId)> = (0..scenario.kills)
        .map(|kill| (warm_up + span * kill as u64 / scenario.kills.max(1) as u64, rng.gen_range(2..=scenario.hosts)))
        .collect();
    let mut stalls: Vec<(Millis, HostId, Millis)> = Vec::new();
    for (count, durations) in [(scenario.stalls, 500..2000), (scenario.long_stalls, 5000..10_000)] {
        for _ in 0..count {
            let at = rng.gen_range(warm_up..warm_up + span);
            stalls.push((at, rng.gen_range(2..=scenario.hosts), rng.gen_range(durations.clone())));
        }
    }
    kills.sort();
    stalls.sort();
    let (mut messages, mut inbound, mut alive_host_millis, mut last_accounting) = (0u64, 0u64, 0u128, 0);
    let (mut detections, mut false_positives, mut stall_detections) = (Vec::new(), 0, 0);
    while let Some((now, event)) = queue.pop() {
        if now > scenario.duration {
            break;
        }
        let alive = hosts.values().filter(|host| host.alive).count() as u128;
        alive_host_millis += alive * (now - last_accounting) as u128;
        last_accounting = now;
        while kills.first().is_some_and(|(at, _)| *at <= now) {
            let (at, id) = kills.remove(0);
            let host = hosts.get_mut(&id).expect("known host");
            if host.alive {
                host.alive = false;
                host.killed_at = Some(at);
                detections.push(Detection {
                    victim: Victim::Leaf,
                    host: id,
                    detected_after: None,
                    repaired_after: None,
                });
            }
        }
        while stalls.first().is_some_and(|(at, _, _)| *at <= now) {
            let (at, id, duration) = stalls.remove(0);
            let host = hosts.get_mut(&id).expect("known host");
            host.stalled_until = at + duration;
            host.long_stall = duration >= 5000;
        }
        match event {
            Flat::Beat(id) => {
                let host = &hosts[&id];
                if !host.alive {
                    continue;
                }
                if host.stalled_until > now {
                    queue.schedule(host.stalled_until, Flat::Beat(id));
                    continue;
                }
                queue.schedule(now + config.heartbeat_interval, Flat::Beat(id));
                messages += 1;
                inbound += 1;
                if rng.gen_bool(scenario.loss_probability.clamp(0.0, 1.0)) {
                    continue;
                }
                let delay = rng.gen_range(scenario.delay_min..=scenario.delay_max.max(scenario.delay_min));
                let host = hosts.get_mut(&id).expect("known host");
                if !host.failed {
                    host.last_heard = host.last_heard.max(now + delay);
                    queue.schedule(host.last_heard + config.fail_after, Flat::Deadline(id, host.last_heard));
                }
            }
            Flat::Deadline(id, heard) => {
                let host = hosts.get_mut(&id).expect("known host");
                if host.failed || host.last_heard != heard {
                    continue;
                }
                host.failed = true;
                match host.killed_at {
                    Some(killed_at) => {
                        if let Some(detection) = detections.iter_mut().find(|d: &&mut Detection| d.host == id) {
                            detection.detected_after = Some(now - killed_at);
                        }
                    }
                    None if host.stalled_until > now && host.long_stall => {
                        stall_detections += 1;
                        let at = host.stalled_until + 1000;
                        queue.schedule(at, Flat::Rejoin(id));
                    }
                    None => {
                        false_positives += 1;
                        queue.schedule(now + 1000, Flat::Rejoin(id));
                    }
                }
            }
            Flat::Rejoin(id) => {
                let host = hosts.get_mut(&id).expect("known host");
                host.failed = false;
                host.last_heard = now;
                queue.schedule(now + config.fail_after, Flat::Deadline(id, now));
            }
        }
    }
    let alive = hosts.values().filter(|host| host.alive).count() as u128;
    alive_host_millis += alive * (scenario.duration - last_accounting.min(scenario.duration)) as u128;
    let host_seconds = alive_host_millis as f64 / 1000.0;
    Report {
        seed,
        hosts: scenario.hosts,
        detections,
        false_positives,
        stall_detections,
        host_hours: host_seconds / 3600.0,
        messages_per_host_per_second: messages as f64 / host_seconds.max(f64::MIN_POSITIVE),
        messages_sent: messages,
        messages_by_kind: [messages, 0, 0, 0],
        tree_changes: 0,
        busiest_inbound_per_second: inbound as f64 / (scenario.duration as f64 / 1000.0).max(f64::MIN_POSITIVE),
        invariant_violations: Vec::new(),
    }
}
