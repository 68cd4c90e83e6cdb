//! A log replica: openraft plus the entry store, serving the log's RPCs.
//!
//! Appends reach the leader in client batches; the leader's proposer groups
//! every batch waiting at that moment into one Raft entry (group commit on
//! top of the Raft log's own group commit), with a few proposals in flight.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fsio::{File, Fs};
use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, Config, ServerState, SnapshotPolicy};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use wire::{ErrorCode, RemoteError, Request, Transport};

use crate::machine::{Shared, SnapshotData, StateMachine};
use crate::network::Network;
use crate::protocol::*;
use crate::raft::{AppendBatch, Command, CommandResult, GcReport, NodeId, Raft};
use crate::raftlog::{IoMode, RaftLogStore};
use crate::types::{Position, ReadOutcome};

/// Bytes of client records grouped into one Raft entry.
pub const PROPOSAL_BYTES_MAX: usize = 1024 * 1024;
/// Client batches grouped into one Raft entry.
pub const PROPOSAL_BATCHES_MAX: usize = 1024;
/// The most Raft entries a leader may have proposed and not yet committed.
pub const PROPOSALS_IN_FLIGHT_MAX: usize = 16;
/// Client batches queued at the leader.
const PROPOSAL_QUEUE_MAX: usize = 16 * 1024;
/// The longest a stream read may wait for new entries.
const READ_WAIT_MS_MAX: u32 = 30_000;
/// Entries returned by one stream read, at most.
const READ_ENTRIES_MAX: u32 = 65_536;
const READ_BYTES_MAX: u32 = 8 * 1024 * 1024;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub node_id: NodeId,
    /// The address peers and clients use to reach this replica.
    pub address: String,
    pub dir: PathBuf,
    pub io_mode: IoMode,
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Checkpoint the entry store (and purge the Raft log) after this many
    /// Raft entries.
    pub snapshot_every_logs: u64,
    /// Raft entries kept behind a checkpoint for followers that lag a little
    /// (further behind, they get the checkpoint itself).
    pub logs_kept_after_checkpoint: u64,
    /// Raft entries the leader proposes before the first commits. Fewer
    /// means fuller entries (more group commit), more means lower latency
    /// at light load.
    pub proposals_in_flight: usize,
}

impl ServerConfig {
    pub fn new(node_id: NodeId, address: impl Into<String>, dir: impl Into<PathBuf>) -> ServerConfig {
        ServerConfig {
            node_id,
            address: address.into(),
            dir: dir.into(),
            io_mode: IoMode::Thread,
            heartbeat_interval_ms: 100,
            // Several node processes share two cores in tests; a longer
            // timeout keeps a busy machine from flapping leadership.
            election_timeout_min_ms: 700,
            election_timeout_max_ms: 1400,
            snapshot_every_logs: 5000,
            logs_kept_after_checkpoint: 500,
            // Measured (bench/RESULTS.md): 2 beats 1, 4, 8 and 16 at 256
            // clients, and costs nothing at one client.
            proposals_in_flight: 2,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("opening the Raft log: {0}")]
    RaftLog(std::io::Error),
    #[error("opening the entry store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("Raft configuration: {0}")]
    Config(#[from] openraft::ConfigError),
    #[error("starting Raft: {0}")]
    Raft(String),
}

struct Proposal {
    batch: AppendBatch,
    reply: oneshot::Sender<LogResult<Position>>,
}

struct Receiving {
    snapshot_id: String,
    path: PathBuf,
    file: Arc<dyn File>,
    offset: u64,
}

/// One replica of the shared log.
pub struct LogServer {
    config: ServerConfig,
    raft: Raft,
    shared: Arc<Shared>,
    proposals: mpsc::Sender<Proposal>,
    receiving: tokio::sync::Mutex<Option<Receiving>>,
    fs: Arc<dyn Fs>,
}

/// The address of the leader `metrics` name, if they know one.
fn leader_address(metrics: &openraft::RaftMetrics<NodeId, BasicNode>) -> Option<String> {
    let leader = metrics.current_leader?;
    metrics.membership_config.membership().get_node(&leader).map(|node| node.addr.clone())
}

fn not_leader_from(error: &RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> LogError {
    match error {
        RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => LogError::NotLeader {
            leader: forward.leader_id.zip(forward.leader_node.as_ref().map(|node| node.addr.clone())),
        },
        other => LogError::Unavailable(other.to_string()),
    }
}

impl LogServer {
    /// Opens the replica's storage and starts Raft. Serving RPCs is the
    /// caller's job: route log methods to [`LogServer::handle`].
    pub async fn start<T: Transport>(
        config: ServerConfig,
        fs: Arc<dyn Fs>,
        transport: T,
    ) -> Result<Arc<LogServer>, StartError> {
        // The state machine first: it may finish a snapshot install a crash
        // interrupted, which the Raft log's purge point relies on.
        let state_machine = StateMachine::open(fs.clone(), &config.dir.join("state"))?;
        let log_store =
            RaftLogStore::open(fs.clone(), &config.dir.join("raft"), config.io_mode).map_err(StartError::RaftLog)?;
        let shared = state_machine.shared();
        let raft_config = Config {
            cluster_name: "tessera".into(),
            heartbeat_interval: config.heartbeat_interval_ms,
            election_timeout_min: config.election_timeout_min_ms,
            election_timeout_max: config.election_timeout_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_every_logs),
            max_in_snapshot_log_to_keep: config.logs_kept_after_checkpoint,
            max_payload_entries: 256,
            install_snapshot_timeout: 30_000,
            ..Default::default()
        }
        .validate()?;
        let raft = Raft::new(config.node_id, Arc::new(raft_config), Network::new(transport), log_store, state_machine)
            .await
            .map_err(|error| StartError::Raft(error.to_string()))?;
        let (proposals, queue) = mpsc::channel(PROPOSAL_QUEUE_MAX);
        tokio::spawn(propose(raft.clone(), queue, config.proposals_in_flight));
        Ok(Arc::new(LogServer { config, raft, shared, proposals, receiving: tokio::sync::Mutex::new(None), fs }))
    }

    pub fn node_id(&self) -> NodeId {
        self.config.node_id
    }

    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Forms the cluster if it has never been formed. Safe to call on every
    /// replica with the same members: a replica with any Raft state ignores it.
    pub async fn initialize(&self, members: &BTreeMap<NodeId, String>) -> Result<(), String> {
        let nodes: BTreeMap<NodeId, BasicNode> =
            members.iter().map(|(id, address)| (*id, BasicNode { addr: address.clone() })).collect();
        match self.raft.initialize(nodes).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(error) => Err(error.to_string()),
        }
    }

    pub async fn shutdown(&self) {
        if let Err(error) = self.raft.shutdown().await {
            tracing::warn!(%error, "Raft shutdown");
        }
    }

    /// The address of the leader this replica knows, as it changes: a log
    /// client on the same host follows it ([`ClientConfig::leader_hint`]),
    /// rather than wait on a former leader that no longer answers.
    ///
    /// [`ClientConfig::leader_hint`]: crate::client::ClientConfig::leader_hint
    pub fn leader_hint(&self) -> watch::Receiver<Option<String>> {
        let mut metrics = self.raft.metrics();
        let (mut known, first) = {
            let metrics = metrics.borrow_and_update();
            (metrics.current_leader, leader_address(&metrics))
        };
        let (sender, receiver) = watch::channel(first);
        tokio::spawn(async move {
            // Metrics change with every applied entry; the leader seldom.
            while metrics.changed().await.is_ok() && !sender.is_closed() {
                let address = {
                    let metrics = metrics.borrow_and_update();
                    // Looked up again while the membership lacks the
                    // leader's address.
                    if metrics.current_leader == known && sender.borrow().is_some() {
                        continue;
                    }
                    known = metrics.current_leader;
                    leader_address(&metrics)
                };
                sender.send_if_modified(|hint| {
                    let changed = *hint != address;
                    *hint = address;
                    changed
                });
            }
            // Raft stopped: no leader to name any more.
            sender.send_replace(None);
        });
        receiver
    }

    fn leader(&self) -> Option<(NodeId, String)> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        Some((metrics.current_leader?, leader_address(&metrics)?))
    }

    fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().current_leader == Some(self.config.node_id)
    }

    fn not_leader(&self) -> LogError {
        LogError::NotLeader { leader: self.leader().filter(|(id, _)| *id != self.config.node_id) }
    }

    /// Waits until this replica has applied everything committed before the
    /// call (Raft read-index). Only a leader can.
    async fn linearize(&self) -> LogResult<()> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        match self.raft.ensure_linearizable().await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(forward))) => {
                Err(LogError::NotLeader { leader: forward.leader_id.zip(forward.leader_node.map(|node| node.addr)) })
            }
            Err(error) => Err(LogError::Unavailable(error.to_string())),
        }
    }

    pub fn tail_local(&self) -> Position {
        *self.shared.tail.borrow()
    }

    pub async fn append(&self, batch: AppendBatch) -> LogResult<Position> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        let (reply, done) = oneshot::channel();
        self.proposals
            .send(Proposal { batch, reply })
            .await
            .map_err(|_| LogError::Unavailable("the log server is shutting down".into()))?;
        done.await.map_err(|_| LogError::Unavailable("the proposal was dropped".into()))?
    }

    pub async fn read(&self, position: Position) -> LogResult<ReadOutcome> {
        // Entries below the local tail are committed and never change
        // (except to Trimmed), so any replica may answer; beyond it only
        // the leader knows.
        if position >= self.tail_local() {
            self.linearize().await?;
        }
        self.shared.read().store.read(position).map_err(|error| LogError::Storage(error.to_string()))
    }

    pub async fn read_stream(&self, request: ReadStreamRequest) -> LogResult<StreamChunk> {
        let to = request.as_of.map_or(request.to, |version| request.to.min(version));
        let max_entries = request.max_entries.clamp(1, READ_ENTRIES_MAX) as usize;
        let max_bytes = request.max_bytes.clamp(1, READ_BYTES_MAX) as usize;
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(request.wait_ms.min(READ_WAIT_MS_MAX) as u64);
        let mut tail_watch = self.shared.tail.subscribe();
        loop {
            let chunk = {
                let inner = self.shared.read();
                // Checked under the same lock as the read: GC may raise the
                // mark while a long poll waits.
                if let Some(version) = request.as_of {
                    if version < inner.gc.snapshot_mark {
                        return Err(LogError::SnapshotBelowMark { requested: version, mark: inner.gc.snapshot_mark });
                    }
                }
                let tail = inner.store.next_position();
                let upto = to.min(tail);
                let positions = inner.store.stream_positions(request.stream, request.from, upto, max_entries);
                let mut entries = Vec::with_capacity(positions.len());
                let mut bytes = 0usize;
                let mut next = upto.max(request.from);
                for position in positions {
                    if bytes >= max_bytes {
                        next = position;
                        break;
                    }
                    // Listed as live under the same read lock, so it is an entry.
                    if let ReadOutcome::Entry(entry) =
                        inner.store.read(position).map_err(|error| LogError::Storage(error.to_string()))?
                    {
                        bytes += entry.payload.len() + 64;
                        entries.push(entry);
                    }
                }
                if entries.len() == max_entries {
                    next = entries.last().map(|entry| entry.position + 1).unwrap_or(next);
                }
                StreamChunk { entries, next, tail }
            };
            let done = !chunk.entries.is_empty() || chunk.next >= to;
            if done || tokio::time::Instant::now() >= deadline {
                return Ok(chunk);
            }
            if tokio::time::timeout_at(deadline, tail_watch.changed()).await.is_err() {
                continue; // one last look, then return at the deadline
            }
        }
    }

    /// Every live checkpoint of `stream`, after a read-index round (so a
    /// checkpoint acknowledged before the call is among them).
    pub async fn checkpoints(&self, stream: crate::types::StreamId) -> LogResult<Vec<crate::types::Entry>> {
        self.linearize().await?;
        let inner = self.shared.read();
        inner
            .store
            .checkpoints(stream)
            .into_iter()
            .map(|position| match inner.store.read(position) {
                Ok(ReadOutcome::Entry(entry)) => Ok(entry),
                Ok(other) => Err(LogError::Storage(format!("checkpoint at {position} reads as {other:?}"))),
                Err(error) => Err(LogError::Storage(error.to_string())),
            })
            .collect()
    }

    pub async fn tail(&self) -> LogResult<Position> {
        self.linearize().await?;
        Ok(self.tail_local())
    }

    async fn write_command(&self, command: Command) -> LogResult<CommandResult> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        match self.raft.client_write(command).await {
            Ok(response) => Ok(response.data),
            Err(error) => Err(not_leader_from(&error)),
        }
    }

    pub async fn gc_report(&self, report: GcReport) -> LogResult<GcOutcome> {
        match self.write_command(Command::Gc(report)).await? {
            CommandResult::Collected { deleted, snapshot_mark, accepted } => {
                Ok(GcOutcome { deleted, snapshot_mark, accepted })
            }
            other => Err(LogError::Storage(format!("unexpected result {other:?}"))),
        }
    }

    pub fn status(&self) -> LogStatus {
        let metrics = self.raft.metrics().borrow().clone();
        let members: Vec<(NodeId, String)> =
            metrics.membership_config.membership().nodes().map(|(id, node)| (*id, node.addr.clone())).collect();
        let leader_address = metrics
            .current_leader
            .and_then(|leader| members.iter().find(|(id, _)| *id == leader).map(|(_, a)| a.clone()));
        let replication = metrics
            .replication
            .as_ref()
            .map(|replication| {
                replication.iter().map(|(id, log_id)| (*id, log_id.map(|log_id| log_id.index))).collect()
            })
            .unwrap_or_default();
        let inner = self.shared.read();
        let stats = inner.store.stats();
        LogStatus {
            node_id: self.config.node_id,
            address: self.config.address.clone(),
            role: match metrics.state {
                ServerState::Leader => "Leader",
                ServerState::Follower => "Follower",
                ServerState::Candidate => "Candidate",
                ServerState::Learner => "Learner",
                ServerState::Shutdown => "Shutdown",
            }
            .into(),
            term: metrics.current_term,
            leader: metrics.current_leader,
            leader_address,
            members,
            last_log_index: metrics.last_log_index,
            commit_index: metrics.last_applied.map(|log_id| log_id.index),
            applied_index: metrics.last_applied.map(|log_id| log_id.index),
            tail: stats.next_position,
            snapshot_mark: inner.gc.snapshot_mark,
            live_entries: stats.live_entries,
            live_bytes: stats.live_bytes,
            disk_bytes: stats.disk_bytes,
            gc_pending_entries: inner.gc.pending_entries() as u64,
            gc_deleted_entries: inner.gc.deleted_entries,
            gc_clients: inner.gc.clients.iter().map(|(id, client)| (*id, client.clone())).collect(),
            replication,
            checkpoint_index: metrics.snapshot.map(|log_id| log_id.index),
            purged_index: metrics.purged.map(|log_id| log_id.index),
            snapshots_installed: self.shared.snapshots_installed.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    async fn receive_snapshot_chunk(
        &self,
        chunk: SnapshotChunk,
    ) -> Result<Option<openraft::raft::SnapshotResponse<NodeId>>, String> {
        let mut receiving = self.receiving.lock().await;
        if chunk.offset == 0 {
            // A new transfer (perhaps a retry): its own spool file, so an
            // install already queued keeps reading the file it was given.
            if let Some(abandoned) = receiving.take() {
                let _ = self.fs.remove_file(&abandoned.path);
            }
            let path = self.shared.spool_path();
            let file = self.fs.open(&path, true).map_err(|error| error.to_string())?;
            *receiving = Some(Receiving { snapshot_id: chunk.meta.snapshot_id.clone(), path, file, offset: 0 });
        }
        let Some(state) = receiving
            .as_mut()
            .filter(|state| state.snapshot_id == chunk.meta.snapshot_id && state.offset == chunk.offset)
        else {
            return Err(format!("unexpected snapshot chunk at offset {} of {}", chunk.offset, chunk.meta.snapshot_id));
        };
        state.file.write_at(&chunk.data, state.offset).map_err(|error| error.to_string())?;
        state.offset += chunk.data.len() as u64;
        if !chunk.done {
            return Ok(None);
        }
        // Durable before openraft hears of it: openraft purges its log right
        // after, and a crash must find the snapshot here to finish installing.
        state.file.sync_data().map_err(|error| error.to_string())?;
        self.fs.sync_dir(&self.config.dir.join("state")).map_err(|error| error.to_string())?;
        let path = state.path.clone();
        *receiving = None;
        drop(receiving);
        let snapshot = openraft::Snapshot { meta: chunk.meta, snapshot: Box::new(SnapshotData::Received { path }) };
        self.raft.install_full_snapshot(chunk.vote, snapshot).await.map(Some).map_err(|error| error.to_string())
    }

    /// Serves one of the log's methods ([`method::is_log_method`]).
    pub async fn handle(self: Arc<Self>, request: Request) -> Result<Bytes, RemoteError> {
        use wire::{decode_request, encode};
        let reply = match request.method {
            method::RAFT_APPEND => {
                let rpc = decode_request(&request)?;
                let started = std::time::Instant::now();
                let reply = self.raft.append_entries(rpc).await;
                metrics::histogram!("sharedlog_append_entries_handle_seconds").record(started.elapsed().as_secs_f64());
                encode(&reply)
            }
            method::RAFT_VOTE => {
                let rpc = decode_request(&request)?;
                encode(&self.raft.vote(rpc).await)
            }
            method::RAFT_SNAPSHOT => {
                let chunk: SnapshotChunk = decode_request(&request)?;
                encode(&self.receive_snapshot_chunk(chunk).await)
            }
            method::APPEND => {
                let append: AppendRequest = decode_request(&request)?;
                encode(&self.append(append.batch).await)
            }
            method::READ => {
                let read: ReadRequest = decode_request(&request)?;
                encode(&self.read(read.position).await)
            }
            method::READ_STREAM => {
                let read: ReadStreamRequest = decode_request(&request)?;
                encode(&self.read_stream(read).await)
            }
            method::TAIL => encode(&self.tail().await),
            method::GC_REPORT => {
                let report: GcReport = decode_request(&request)?;
                encode(&self.gc_report(report).await)
            }
            method::REGISTER => {
                let register: RegisterRequest = decode_request(&request)?;
                let command =
                    Command::RegisterClient { client: register.client, name: register.name, streams: register.streams };
                encode(&self.write_command(command).await.map(|_| ()))
            }
            method::UNREGISTER => {
                let client: u64 = decode_request(&request)?;
                encode(&self.write_command(Command::UnregisterClient { client }).await.map(|_| ()))
            }
            method::STATUS => encode(&LogResult::Ok(self.status())),
            method::CHECKPOINTS => {
                let request: CheckpointsRequest = decode_request(&request)?;
                encode(&self.checkpoints(request.stream).await)
            }
            method::CHECKPOINT_NOW => {
                let outcome: LogResult<()> =
                    self.raft.trigger().snapshot().await.map_err(|error| LogError::Unavailable(error.to_string()));
                encode(&outcome)
            }
            other => {
                return Err(RemoteError::new(
                    ErrorCode::UnknownMethod,
                    format!("method {other:#06x} is not a log method"),
                ));
            }
        };
        Ok(reply)
    }

    /// The directory this replica keeps its data in.
    pub fn dir(&self) -> &Path {
        &self.config.dir
    }
}

/// The leader's proposer: groups queued client batches into Raft entries.
async fn propose(raft: Raft, mut queue: mpsc::Receiver<Proposal>, proposals_in_flight: usize) {
    let in_flight = Arc::new(Semaphore::new(proposals_in_flight.clamp(1, PROPOSALS_IN_FLIGHT_MAX)));
    loop {
        let permit = in_flight.clone().acquire_owned().await.expect("semaphore never closed");
        let Some(first) = queue.recv().await else {
            return;
        };
        let mut bytes = batch_bytes(&first.batch);
        let mut proposals = vec![first];
        while bytes < PROPOSAL_BYTES_MAX && proposals.len() < PROPOSAL_BATCHES_MAX {
            match queue.try_recv() {
                Ok(proposal) => {
                    bytes += batch_bytes(&proposal.batch);
                    proposals.push(proposal);
                }
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            let (batches, replies): (Vec<AppendBatch>, Vec<_>) =
                proposals.into_iter().map(|proposal| (proposal.batch, proposal.reply)).unzip();
            metrics::histogram!("sharedlog_proposal_batches").record(batches.len() as f64);
            let started = std::time::Instant::now();
            let outcome = raft.client_write(Command::Append(batches)).await;
            metrics::histogram!("sharedlog_proposal_seconds").record(started.elapsed().as_secs_f64());
            match outcome {
                Ok(response) => match response.data {
                    CommandResult::Appended(results) => {
                        for (reply, result) in replies.into_iter().zip(results) {
                            let _ = reply.send(result.map_err(LogError::Rejected));
                        }
                    }
                    other => {
                        for reply in replies {
                            let _ = reply.send(Err(LogError::Storage(format!("unexpected result {other:?}"))));
                        }
                    }
                },
                Err(error) => {
                    let error = not_leader_from(&error);
                    for reply in replies {
                        let _ = reply.send(Err(error.clone()));
                    }
                }
            }
            drop(permit);
        });
    }
}

fn batch_bytes(batch: &AppendBatch) -> usize {
    batch.records.iter().map(|record| record.payload.len() + 16 + record.streams.len() * 8).sum()
}

/// A `wire` handler serving only the log's methods (a node composes this
/// with its other services).
pub fn handler(server: Arc<LogServer>) -> Arc<dyn wire::Handler> {
    Arc::new(move |request: Request| {
        let server = server.clone();
        async move { server.handle(request).await }
    })
}
