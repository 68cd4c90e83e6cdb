//! The log client: finds the leader, batches appends, retries safely.
//!
//! Concurrent `append` calls on one client are grouped into batches; each
//! batch carries `(client id, sequence)`, so a retry after an ambiguous
//! failure (timeout, lost connection, leader change) is deduplicated by the
//! state machine and every append lands exactly once.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use wire::Transport;

use crate::protocol::*;
use crate::raft::{AppendBatch, GcReport};
use crate::types::{ClientId, Entry, EntryKind, Position, ReadOutcome, Record, StreamId};

#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Addresses of the log replicas.
    pub replicas: Vec<String>,
    pub client_id: ClientId,
    /// Stream reads go here first (the local replica, on a log host).
    pub read_replica: Option<String>,
    /// One RPC's timeout.
    pub call_timeout: Duration,
    /// How long an operation keeps retrying before it fails.
    pub operation_deadline: Duration,
    /// The leader the local replica knows, on a log host
    /// ([`crate::server::LogServer::leader_hint`]). A call to a former
    /// leader cut off from the network would wait out `call_timeout`; once
    /// the hint names another leader the call goes there at once, and so
    /// does the next call. Safe as a retry after a timeout is: appends are
    /// deduplicated, and the other calls to the leader (reads, GC
    /// registrations and reports) may be repeated.
    pub leader_hint: Option<watch::Receiver<Option<String>>>,
    pub batch_records_max: usize,
    pub batch_bytes_max: usize,
    pub batches_in_flight_max: usize,
}

impl ClientConfig {
    pub fn new(replicas: Vec<String>, client_id: ClientId) -> ClientConfig {
        ClientConfig {
            replicas,
            client_id,
            read_replica: None,
            call_timeout: Duration::from_secs(3),
            operation_deadline: Duration::from_secs(30),
            leader_hint: None,
            batch_records_max: 4096,
            batch_bytes_max: 512 * 1024,
            batches_in_flight_max: 16,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("no log replica could serve the request in time: {0}")]
    Unavailable(String),
    #[error("the client is closed")]
    Closed,
}

struct Caller<T: Transport> {
    transport: T,
    config: ClientConfig,
    leader: Mutex<Option<String>>,
    /// `config.leader_hint`, as far as calls have looked at it.
    hint: Option<Mutex<watch::Receiver<Option<String>>>>,
    next_replica: AtomicUsize,
}

/// A leader hint as a call saw it when it chose where to go.
type HintWatch = watch::Receiver<Option<String>>;

impl<T: Transport> Caller<T> {
    /// The replica to call: the leader the hint names if it named a new
    /// one since the last call, else the leader known, else each replica
    /// in turn. With a hint, a watch on it from before the choice, so the
    /// call sees every change after it.
    fn pick(&self) -> (String, Option<HintWatch>) {
        let watch = self.hint.as_ref().map(|hint| {
            let mut hint = hint.lock().expect("hint lock");
            let seen = hint.clone();
            if hint.has_changed().unwrap_or(false) {
                if let Some(leader) = hint.borrow_and_update().clone() {
                    *self.leader.lock().expect("leader lock") = Some(leader);
                }
            }
            seen
        });
        if let Some(leader) = self.leader.lock().expect("leader lock").clone() {
            return (leader, watch);
        }
        let index = self.next_replica.fetch_add(1, Ordering::Relaxed);
        (self.config.replicas[index % self.config.replicas.len()].clone(), watch)
    }

    fn forget_leader(&self, address: &str) {
        let mut leader = self.leader.lock().expect("leader lock");
        if leader.as_deref() == Some(address) {
            *leader = None;
        }
    }

    /// Calls the leader, following redirects and retrying until the deadline.
    async fn call_leader<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        method: u32,
        request: &Req,
    ) -> Result<Resp, ClientError> {
        let deadline = tokio::time::Instant::now() + self.config.operation_deadline;
        let mut backoff = Duration::from_millis(20);
        let mut last_error;
        loop {
            let (address, hint) = self.pick();
            let pause = match self.call_unless_leader_moves::<Req, Resp>(&address, method, request, hint).await {
                None => {
                    last_error = format!("{address} is no longer the leader");
                    false
                }
                Some(Ok(Ok(response))) => {
                    *self.leader.lock().expect("leader lock") = Some(address);
                    return Ok(response);
                }
                Some(Ok(Err(LogError::NotLeader { leader: Some((_, leader)) }))) if leader != address => {
                    *self.leader.lock().expect("leader lock") = Some(leader);
                    last_error = format!("{address} is not the leader");
                    false
                }
                Some(Ok(Err(LogError::NotLeader { .. })) | Ok(Err(LogError::Unavailable(_)))) => {
                    self.forget_leader(&address);
                    last_error = format!("{address} knows no leader");
                    true
                }
                Some(Ok(Err(error))) => return Err(ClientError::Log(error)),
                Some(Err(error)) => {
                    self.forget_leader(&address);
                    last_error = error.to_string();
                    true
                }
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(ClientError::Unavailable(last_error));
            }
            if pause {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
    }

    /// Calls `address`, as the leader; `None` when the leader hint names
    /// another leader before it answers (the hint is then the leader).
    async fn call_unless_leader_moves<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        address: &str,
        method: u32,
        request: &Req,
        hint: Option<HintWatch>,
    ) -> Option<Result<LogResult<Resp>, wire::CallError>> {
        let call = wire::call(&self.transport, address, method, request, self.config.call_timeout);
        let Some(mut hint) = hint else { return Some(call.await) };
        tokio::pin!(call);
        loop {
            tokio::select! {
                reply = &mut call => return Some(reply),
                changed = hint.changed() => {
                    if changed.is_err() {
                        // The replica is gone: no more hints.
                        return Some(call.await);
                    }
                    let leader = hint.borrow_and_update().clone();
                    if let Some(leader) = leader.filter(|leader| leader != address) {
                        *self.leader.lock().expect("leader lock") = Some(leader);
                        return None;
                    }
                }
            }
        }
    }

    /// Calls one given replica once.
    async fn call_replica<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        address: &str,
        method: u32,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, ClientError> {
        let reply: LogResult<Resp> = wire::call(&self.transport, address, method, request, timeout)
            .await
            .map_err(|error| ClientError::Unavailable(error.to_string()))?;
        reply.map_err(ClientError::Log)
    }
}

/// Hands out batch sequences and remembers which are still unanswered.
#[derive(Default)]
struct Sequencer {
    next: u64,
    unanswered: std::collections::BTreeSet<u64>,
}

impl Sequencer {
    /// A new sequence and the lowest one still unanswered (itself included).
    fn begin(sequencer: &Mutex<Sequencer>) -> (u64, u64) {
        let mut sequencer = sequencer.lock().expect("sequencer lock");
        sequencer.next += 1;
        let sequence = sequencer.next;
        sequencer.unanswered.insert(sequence);
        let first = *sequencer.unanswered.first().expect("just inserted");
        (sequence, first)
    }

    fn end(sequencer: &Mutex<Sequencer>, sequence: u64) {
        sequencer.lock().expect("sequencer lock").unanswered.remove(&sequence);
    }
}

struct PendingAppend {
    record: Record,
    reply: oneshot::Sender<Result<Position, ClientError>>,
}

/// A handle to the shared log. Cheap to clone; clones share one batcher.
#[derive(Clone)]
pub struct LogClient<T: Transport> {
    caller: Arc<Caller<T>>,
    appends: mpsc::Sender<PendingAppend>,
    sequencer: Arc<Mutex<Sequencer>>,
}

impl<T: Transport> LogClient<T> {
    pub fn new(transport: T, config: ClientConfig) -> LogClient<T> {
        assert!(!config.replicas.is_empty(), "a log client needs at least one replica address");
        let caller = Arc::new(Caller {
            transport,
            hint: config.leader_hint.clone().map(Mutex::new),
            config,
            leader: Mutex::new(None),
            next_replica: AtomicUsize::new(0),
        });
        let (appends, queue) = mpsc::channel(64 * 1024);
        let sequencer = Arc::new(Mutex::new(Sequencer::default()));
        tokio::spawn(run_appender(caller.clone(), queue, sequencer.clone()));
        LogClient { caller, appends, sequencer }
    }

    pub fn client_id(&self) -> ClientId {
        self.caller.config.client_id
    }

    pub fn config(&self) -> &ClientConfig {
        &self.caller.config
    }

    /// Appends one record; returns its position once it is durable on a
    /// majority of replicas and applied.
    pub async fn append_record(&self, record: Record) -> Result<Position, ClientError> {
        if let Err(invalid) = crate::store::validate(&record) {
            return Err(ClientError::Log(LogError::Rejected(crate::raft::AppendRejected::Invalid(
                invalid.to_string(),
            ))));
        }
        let (reply, done) = oneshot::channel();
        self.appends.send(PendingAppend { record, reply }).await.map_err(|_| ClientError::Closed)?;
        done.await.map_err(|_| ClientError::Closed)?
    }

    pub async fn append(&self, streams: &[StreamId], payload: impl Into<Bytes>) -> Result<Position, ClientError> {
        self.append_record(Record { streams: streams.to_vec(), kind: EntryKind::Data, payload: payload.into() }).await
    }

    /// Appends several records as one batch at consecutive positions.
    pub async fn append_batch(&self, records: Vec<Record>) -> Result<Position, ClientError> {
        let (sequence, first_unanswered) = Sequencer::begin(&self.sequencer);
        let batch = AppendBatch { client: self.client_id(), sequence, first_unanswered, records };
        let result = self.caller.call_leader(method::APPEND, &AppendRequest { batch }).await;
        Sequencer::end(&self.sequencer, sequence);
        result
    }

    pub async fn read(&self, position: Position) -> Result<ReadOutcome, ClientError> {
        self.caller.call_leader(method::READ, &ReadRequest { position }).await
    }

    /// Reads one position from a given replica (no leader involved).
    pub async fn read_at_replica(&self, address: &str, position: Position) -> Result<ReadOutcome, ClientError> {
        self.caller
            .call_replica(address, method::READ, &ReadRequest { position }, self.caller.config.call_timeout)
            .await
    }

    /// The linearizable tail: every append acknowledged before this call
    /// has a position below it.
    pub async fn tail(&self) -> Result<Position, ClientError> {
        self.caller.call_leader(method::TAIL, &()).await
    }

    /// Reads a stream chunk from the preferred replica (falling back to the
    /// leader); `wait` makes it a long poll.
    pub async fn read_stream(
        &self,
        stream: StreamId,
        from: Position,
        to: Position,
        as_of: Option<Position>,
        wait: Duration,
    ) -> Result<StreamChunk, ClientError> {
        let request = ReadStreamRequest {
            stream,
            from,
            to,
            as_of,
            max_entries: 16 * 1024,
            max_bytes: 4 * 1024 * 1024,
            wait_ms: wait.as_millis().min(u32::MAX as u128) as u32,
        };
        if let Some(address) = &self.caller.config.read_replica {
            let timeout = self.caller.config.call_timeout + wait;
            match self.caller.call_replica(address, method::READ_STREAM, &request, timeout).await {
                Ok(chunk) => return Ok(chunk),
                Err(ClientError::Log(error @ LogError::SnapshotBelowMark { .. })) => {
                    return Err(ClientError::Log(error))
                }
                Err(_) => {}
            }
        }
        self.caller.call_leader(method::READ_STREAM, &request).await
    }

    /// Reads every live entry of `stream` in `[from, to)`.
    pub async fn read_stream_all(
        &self,
        stream: StreamId,
        from: Position,
        to: Position,
        as_of: Option<Position>,
    ) -> Result<Vec<Entry>, ClientError> {
        let mut entries = Vec::new();
        let mut cursor = from;
        while cursor < to {
            let chunk = self.read_stream(stream, cursor, to, as_of, Duration::ZERO).await?;
            entries.extend(chunk.entries);
            if chunk.next <= cursor {
                // The replica has not applied up to `to` yet: wait for it.
                let chunk = self.read_stream(stream, cursor, to, as_of, Duration::from_millis(200)).await?;
                let advanced = chunk.next > cursor;
                entries.extend(chunk.entries);
                cursor = chunk.next.max(cursor);
                if !advanced {
                    continue;
                }
            } else {
                cursor = chunk.next;
            }
        }
        Ok(entries)
    }

    /// Every live checkpoint entry of `stream`, read linearizably (the
    /// leader answers after a read-index round).
    pub async fn checkpoints(&self, stream: StreamId) -> Result<Vec<Entry>, ClientError> {
        self.caller.call_leader(method::CHECKPOINTS, &CheckpointsRequest { stream }).await
    }

    /// Registers GC client `client` as a reader of `streams` (all if empty).
    pub async fn register(&self, client: ClientId, name: &str, streams: Vec<StreamId>) -> Result<(), ClientError> {
        let request = RegisterRequest { client, name: name.to_string(), streams };
        self.caller.call_leader(method::REGISTER, &request).await
    }

    pub async fn unregister(&self, client: ClientId) -> Result<(), ClientError> {
        self.caller.call_leader(method::UNREGISTER, &client).await
    }

    pub async fn gc_report(&self, report: &GcReport) -> Result<GcOutcome, ClientError> {
        self.caller.call_leader(method::GC_REPORT, report).await
    }

    pub async fn status(&self, address: &str) -> Result<LogStatus, ClientError> {
        self.caller.call_replica(address, method::STATUS, &(), self.caller.config.call_timeout).await
    }

    /// Asks one replica to checkpoint now (and so purge its Raft log).
    pub async fn checkpoint_now(&self, address: &str) -> Result<(), ClientError> {
        self.caller.call_replica(address, method::CHECKPOINT_NOW, &(), self.caller.config.call_timeout).await
    }

    /// Follows `stream` from `from`.
    pub fn subscribe(&self, stream: StreamId, from: Position) -> Subscription<T> {
        Subscription { client: self.clone(), stream, next: from, buffered: VecDeque::new() }
    }
}

/// Entries of one stream, in position order, as they are appended.
pub struct Subscription<T: Transport> {
    client: LogClient<T>,
    stream: StreamId,
    next: Position,
    buffered: VecDeque<Entry>,
}

impl<T: Transport> Subscription<T> {
    /// The next entry, waiting for it if need be.
    pub async fn next(&mut self) -> Result<Entry, ClientError> {
        loop {
            if let Some(entry) = self.buffered.pop_front() {
                return Ok(entry);
            }
            let chunk = self.client.read_stream(self.stream, self.next, u64::MAX, None, Duration::from_secs(1)).await?;
            self.next = chunk.next.max(self.next);
            self.buffered.extend(chunk.entries);
        }
    }

    /// Everything of the stream below this position has been delivered.
    pub fn position(&self) -> Position {
        self.next
    }
}

async fn run_appender<T: Transport>(
    caller: Arc<Caller<T>>,
    mut queue: mpsc::Receiver<PendingAppend>,
    sequencer: Arc<Mutex<Sequencer>>,
) {
    let in_flight = Arc::new(Semaphore::new(caller.config.batches_in_flight_max));
    loop {
        let permit = in_flight.clone().acquire_owned().await.expect("semaphore never closed");
        let Some(first) = queue.recv().await else {
            return;
        };
        let mut bytes = first.record.payload.len();
        let mut pending = vec![first];
        while pending.len() < caller.config.batch_records_max && bytes < caller.config.batch_bytes_max {
            match queue.try_recv() {
                Ok(append) => {
                    bytes += append.record.payload.len();
                    pending.push(append);
                }
                Err(_) => break,
            }
        }
        let (records, replies): (Vec<Record>, Vec<_>) =
            pending.into_iter().map(|append| (append.record, append.reply)).unzip();
        let (sequence, first_unanswered) = Sequencer::begin(&sequencer);
        let batch = AppendBatch { client: caller.config.client_id, sequence, first_unanswered, records };
        let caller = caller.clone();
        let sequencer = sequencer.clone();
        tokio::spawn(async move {
            let result: Result<Position, ClientError> =
                caller.call_leader(method::APPEND, &AppendRequest { batch }).await;
            Sequencer::end(&sequencer, sequence);
            for (index, reply) in replies.into_iter().enumerate() {
                let _ = reply.send(result.clone().map(|first| first + index as u64));
            }
            drop(permit);
        });
    }
}
