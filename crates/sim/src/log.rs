//! The shared-log scenario: real replicas (openraft, Raft log, entry store)
//! on simulated disks and a simulated network, driven by concurrent clients
//! while a nemesis partitions hosts, drops messages and crashes the leader.
//! Everything runs on one current-thread runtime with paused time, and every
//! random choice comes from the seed, so a failing seed replays.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fsio::SimFs;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sharedlog::client::{ClientConfig, LogClient};
use sharedlog::raftlog::IoMode;
use sharedlog::server::{handler, LogServer, ServerConfig};
use sharedlog::types::{Entry, Position, ReadOutcome, StreamId};
use wire::sim::{Faults, SimNetwork, SimTransport};
use wire::{ServeHandle, Transport};

use crate::checker::{check, Event, Operation, Outcome, Violation};

#[derive(Clone, Debug)]
pub struct Scenario {
    pub replicas: u64,
    pub clients: u64,
    pub operations_per_client: u64,
    /// Background message loss (the nemesis adds bursts on top).
    pub loss_probability: f64,
    pub partitions: bool,
    pub leader_crashes: bool,
    /// Raft entries between checkpoints (small, to exercise snapshots).
    pub snapshot_every_logs: u64,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            replicas: 3,
            clients: 4,
            operations_per_client: 300,
            loss_probability: 0.01,
            partitions: true,
            leader_crashes: true,
            snapshot_every_logs: 100,
        }
    }
}

#[derive(Debug)]
pub struct Report {
    pub seed: u64,
    pub violations: Vec<Violation>,
    /// A digest of everything observable: equal for equal seeds.
    pub trace_hash: u64,
    pub acknowledged_appends: usize,
    pub failed_operations: usize,
    pub crashes: usize,
    pub partitions: usize,
    pub snapshot_installs: u64,
    pub final_length: usize,
    pub virtual_seconds: f64,
    pub messages: (u64, u64),
}

struct Replica {
    server: Option<Arc<LogServer>>,
    serve: Option<ServeHandle>,
    fs: SimFs,
    address: String,
}

struct Cluster {
    network: SimNetwork,
    replicas: BTreeMap<u64, Replica>,
    scenario: Scenario,
}

impl Cluster {
    fn config(&self, id: u64) -> ServerConfig {
        let mut config = ServerConfig::new(id, self.replicas[&id].address.clone(), "/node");
        config.io_mode = IoMode::Inline;
        config.heartbeat_interval_ms = 100;
        config.election_timeout_min_ms = 500;
        config.election_timeout_max_ms = 1000;
        config.snapshot_every_logs = self.scenario.snapshot_every_logs;
        config.logs_kept_after_checkpoint = 20;
        config
    }

    async fn start(&mut self, id: u64) {
        let config = self.config(id);
        let replica = &self.replicas[&id];
        let transport: SimTransport = self.network.transport(&replica.address);
        let server = LogServer::start(config, Arc::new(replica.fs.clone()), transport.clone())
            .await
            .unwrap_or_else(|error| panic!("replica {id} failed to start: {error}"));
        let serve =
            transport.serve(&replica.address, handler(server.clone())).await.expect("simulated serve never fails");
        let replica = self.replicas.get_mut(&id).expect("known replica");
        replica.server = Some(server);
        replica.serve = Some(serve);
    }

    /// Power loss: the process dies and unsynced data is lost (torn).
    async fn crash(&mut self, id: u64) {
        let replica = self.replicas.get_mut(&id).expect("known replica");
        if let Some(serve) = replica.serve.take() {
            serve.stop();
        }
        if let Some(server) = replica.server.take() {
            server.shutdown().await;
        }
        replica.fs.crash(true);
    }

    fn leader(&self) -> Option<u64> {
        self.replicas
            .values()
            .filter_map(|replica| replica.server.as_ref())
            .map(|server| server.status())
            .find(|status| status.role == "Leader")
            .map(|status| status.node_id)
    }

    fn addresses(&self) -> Vec<String> {
        self.replicas.values().map(|replica| replica.address.clone()).collect()
    }
}

fn micros_since(start: tokio::time::Instant) -> u64 {
    start.elapsed().as_micros() as u64
}

const STREAMS: [StreamId; 2] = [StreamId::from_name("sim/a"), StreamId::from_name("sim/b")];

async fn run_client(
    client: u64,
    seed: u64,
    log: LogClient<SimTransport>,
    operations: u64,
    start: tokio::time::Instant,
    history: Arc<Mutex<Vec<Event>>>,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ (client.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    let mut known_tail: Position = 0;
    for index in 0..operations {
        let pick = rng.gen_range(0..100);
        let stream = STREAMS[rng.gen_range(0..STREAMS.len())];
        let operation = match pick {
            0..=59 => Operation::Append { stream, payload: format!("client {client} op {index}").into_bytes() },
            60..=79 => Operation::Read { position: rng.gen_range(0..known_tail + 5) },
            80..=94 => Operation::Tail,
            _ => Operation::ReadStream { stream, to: known_tail },
        };
        let invoked = micros_since(start);
        let outcome = match &operation {
            Operation::Append { stream, payload } => match log.append(&[*stream], payload.clone()).await {
                Ok(position) => Outcome::Appended(position),
                Err(error) => Outcome::Failed(error.to_string()),
            },
            Operation::Read { position } => match log.read(*position).await {
                Ok(outcome) => Outcome::Read(outcome),
                Err(error) => Outcome::Failed(error.to_string()),
            },
            Operation::Tail => match log.tail().await {
                Ok(tail) => {
                    known_tail = known_tail.max(tail);
                    Outcome::Tail(tail)
                }
                Err(error) => Outcome::Failed(error.to_string()),
            },
            Operation::ReadStream { stream, to } => {
                match log.read_stream(*stream, 0, *to, None, Duration::ZERO).await {
                    Ok(chunk) => Outcome::Stream {
                        entries: chunk.entries.iter().map(|entry| (entry.position, entry.payload.to_vec())).collect(),
                        next: chunk.next,
                    },
                    Err(error) => Outcome::Failed(error.to_string()),
                }
            }
        };
        if let Outcome::Appended(position) = outcome {
            known_tail = known_tail.max(position + 1);
        }
        let completed = micros_since(start);
        history.lock().expect("history lock").push(Event { client, operation, invoked, completed, outcome });
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..20))).await;
    }
}

/// Runs the scenario for `seed` and checks it.
pub fn run(seed: u64, scenario: &Scenario) -> Report {
    sharedlog::raft::seed_thread_rng(seed);
    crate::runtime(seed).block_on(simulate(seed, scenario.clone()))
}

async fn simulate(seed: u64, scenario: Scenario) -> Report {
    let start = tokio::time::Instant::now();
    let faults = Faults {
        loss_probability: scenario.loss_probability,
        delay_min: Duration::from_micros(200),
        delay_max: Duration::from_millis(3),
    };
    let network = SimNetwork::new(seed, faults.clone());
    let mut cluster = Cluster { network: network.clone(), replicas: BTreeMap::new(), scenario: scenario.clone() };
    for id in 1..=scenario.replicas {
        cluster.replicas.insert(
            id,
            Replica {
                server: None,
                serve: None,
                fs: SimFs::new(seed.wrapping_add(id)),
                address: format!("10.0.0.{id}:7400"),
            },
        );
    }
    for id in 1..=scenario.replicas {
        cluster.start(id).await;
    }
    let members: BTreeMap<u64, String> =
        cluster.replicas.iter().map(|(id, replica)| (*id, replica.address.clone())).collect();
    cluster.replicas[&1].server.as_ref().expect("started").initialize(&members).await.expect("initialize");

    let history = Arc::new(Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    for client in 0..scenario.clients {
        let transport = network.transport(&format!("10.0.1.{client}:9000"));
        let mut config = ClientConfig::new(cluster.addresses(), 1000 + client);
        config.call_timeout = Duration::from_millis(700);
        config.operation_deadline = Duration::from_secs(20);
        config.batches_in_flight_max = 2;
        let log = LogClient::new(transport, config);
        clients.push(tokio::spawn(run_client(
            client,
            seed,
            log,
            scenario.operations_per_client,
            start,
            history.clone(),
        )));
    }

    // The nemesis.
    let mut rng = StdRng::seed_from_u64(seed ^ 0xDEAD_BEEF);
    let (mut crashes, mut partitions) = (0, 0);
    let mut snapshot_installs = 0;
    while !clients.iter().all(|client| client.is_finished()) {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(500..2500))).await;
        match rng.gen_range(0..4) {
            0 if scenario.leader_crashes => {
                // Mostly the leader; sometimes any replica (a follower may be
                // in the middle of installing a snapshot).
                let victim = match cluster.leader() {
                    Some(leader) if rng.gen_bool(0.7) => Some(leader),
                    _ => Some(rng.gen_range(1..=scenario.replicas)),
                };
                if let Some(victim) = victim {
                    crashes += 1;
                    snapshot_installs += cluster.replicas[&victim]
                        .server
                        .as_ref()
                        .map_or(0, |server| server.status().snapshots_installed);
                    cluster.crash(victim).await;
                    tokio::time::sleep(Duration::from_millis(rng.gen_range(300..3000))).await;
                    cluster.start(victim).await;
                }
            }
            3 if scenario.partitions => {
                // A long isolation of one follower: the others checkpoint and
                // purge, so it catches up through a snapshot.
                partitions += 1;
                let followers: Vec<u64> =
                    cluster.replicas.keys().copied().filter(|id| Some(*id) != cluster.leader()).collect();
                let victim = followers[rng.gen_range(0..followers.len())];
                let victim_address = cluster.replicas[&victim].address.clone();
                network.isolate(&victim_address, &cluster.addresses());
                tokio::time::sleep(Duration::from_millis(rng.gen_range(4000..9000))).await;
                network.heal_all();
            }
            1 if scenario.partitions => {
                partitions += 1;
                let ids: Vec<u64> = cluster.replicas.keys().copied().collect();
                // Cut off the leader half the time, else any replica.
                let victim = match cluster.leader() {
                    Some(leader) if rng.gen_bool(0.5) => leader,
                    _ => ids[rng.gen_range(0..ids.len())],
                };
                let victim_address = cluster.replicas[&victim].address.clone();
                let mut others: Vec<String> = cluster.addresses();
                others.extend(
                    (0..scenario.clients).map(|client| format!("10.0.1.{client}:9000")).filter(|_| rng.gen_bool(0.5)),
                );
                network.isolate(&victim_address, &others);
                tokio::time::sleep(Duration::from_millis(rng.gen_range(500..4000))).await;
                network.heal_all();
            }
            _ => {
                network.set_faults(Faults { loss_probability: 0.05, ..faults.clone() });
                tokio::time::sleep(Duration::from_millis(rng.gen_range(500..2000))).await;
                network.set_faults(faults.clone());
            }
        }
    }
    for client in clients {
        client.await.expect("client task panicked");
    }
    network.heal_all();
    network.set_faults(faults);

    // Let every replica converge, then read what each holds.
    let mut lengths = Vec::new();
    for _ in 0..600 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        lengths = cluster
            .replicas
            .values()
            .filter_map(|replica| replica.server.as_ref())
            .map(|server| server.tail_local())
            .collect();
        let applied: Vec<Option<u64>> = cluster
            .replicas
            .values()
            .filter_map(|replica| replica.server.as_ref())
            .map(|server| server.status().applied_index)
            .collect();
        if lengths.windows(2).all(|pair| pair[0] == pair[1])
            && applied.windows(2).all(|pair| pair[0] == pair[1])
            && cluster.leader().is_some()
        {
            break;
        }
    }
    let finals: Vec<Vec<Option<Entry>>> = cluster
        .replicas
        .values()
        .filter_map(|replica| replica.server.as_ref())
        .map(|server| {
            let inner = server.shared().read();
            (0..inner.store.next_position())
                .map(|position| match inner.store.read(position).expect("final read of the simulated store") {
                    ReadOutcome::Entry(entry) => Some(entry),
                    _ => None,
                })
                .collect()
        })
        .collect();
    let history = std::mem::take(&mut *history.lock().expect("history lock"));
    let violations = check(&history, &finals);
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for event in &history {
        format!("{event:?}").hash(&mut hasher);
    }
    lengths.hash(&mut hasher);
    for id in cluster.replicas.keys().copied().collect::<Vec<_>>() {
        snapshot_installs +=
            cluster.replicas[&id].server.as_ref().map_or(0, |server| server.status().snapshots_installed);
        cluster.crash(id).await;
    }
    Report {
        seed,
        violations,
        trace_hash: hasher.finish(),
        acknowledged_appends: history.iter().filter(|event| matches!(event.outcome, Outcome::Appended(_))).count(),
        failed_operations: history.iter().filter(|event| matches!(event.outcome, Outcome::Failed(_))).count(),
        crashes,
        partitions,
        snapshot_installs,
        final_length: finals.first().map(Vec::len).unwrap_or(0),
        virtual_seconds: start.elapsed().as_secs_f64(),
        messages: network.message_counts(),
    }
}
