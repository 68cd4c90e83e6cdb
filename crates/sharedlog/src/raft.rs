//! Raft plumbing: the type configuration, the replicated commands, and an
//! async runtime whose randomness can be seeded (so the `sim` crate replays).

use std::cell::RefCell;
use std::future::Future;
use std::time::Duration;

use openraft::async_runtime::{AsyncRuntime, TokioOneShotSender};
use openraft::{OptionalSend, TokioInstant};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::types::{ClientId, Locator, Position, Record, StreamId};

pub type NodeId = u64;
pub type Node = openraft::BasicNode;

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = NodeId,
        Node = Node,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = crate::machine::SnapshotData,
        AsyncRuntime = SeededTokio,
        Responder = openraft::impls::OneshotResponder<TypeConfig>,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type RaftEntry = openraft::Entry<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;

/// One client's batch of records, deduplicated by `(client, sequence)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendBatch {
    pub client: ClientId,
    pub sequence: u64,
    /// The client's lowest sequence still waiting for an answer: it will
    /// never retry anything below, so the log may forget those results.
    pub first_unanswered: u64,
    pub records: Vec<Record>,
}

/// A client's periodic GC report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    pub client: ClientId,
    /// The client has processed every entry of its streams below this.
    pub progress: Position,
    pub locators: Vec<Locator>,
}

/// A replicated command: what the Raft log carries and the entry store applies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Several clients' batches, grouped by the leader into one Raft entry.
    Append(Vec<AppendBatch>),
    Gc(GcReport),
    /// Registers a GC client reading `streams` (empty: every stream). A
    /// registered client's progress holds back deletions in its streams.
    RegisterClient {
        client: ClientId,
        name: String,
        streams: Vec<StreamId>,
    },
    UnregisterClient {
        client: ClientId,
    },
}

/// Why one batch of an `Append` command was not applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AppendRejected {
    /// The client had already been answered for this sequence (this is a
    /// late duplicate nobody waits for), or it was too far behind the
    /// client's other batches to be remembered.
    SequenceTooOld,
    Invalid(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    /// Per batch: the position of its first record (records are consecutive).
    Appended(Vec<Result<Position, AppendRejected>>),
    /// `accepted`: how many of the report's locators (from the front) the
    /// log took; the client keeps the rest for its next report.
    Collected {
        deleted: u64,
        snapshot_mark: Position,
        accepted: u64,
    },
    Done,
}

thread_local! {
    static SEEDED_RNG: RefCell<Option<StdRng>> = const { RefCell::new(None) };
}

/// Makes every Raft random choice on this thread (election timeouts) come
/// from `seed`. The `sim` crate calls this on its single runtime thread.
pub fn seed_thread_rng(seed: u64) {
    SEEDED_RNG.with(|rng| *rng.borrow_mut() = Some(StdRng::seed_from_u64(seed)));
}

/// The thread's seeded generator if there is one, else the OS-seeded one.
#[derive(Clone, Copy, Debug, Default)]
pub struct ThreadRng;

impl RngCore for ThreadRng {
    fn next_u32(&mut self) -> u32 {
        self.next_u64() as u32
    }

    fn next_u64(&mut self) -> u64 {
        SEEDED_RNG.with(|rng| match rng.borrow_mut().as_mut() {
            Some(rng) => rng.next_u64(),
            None => rand::thread_rng().next_u64(),
        })
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        SEEDED_RNG.with(|rng| match rng.borrow_mut().as_mut() {
            Some(rng) => rng.fill_bytes(dest),
            None => rand::thread_rng().fill_bytes(dest),
        })
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

/// Tokio, with [`ThreadRng`] as its random source.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SeededTokio;

impl AsyncRuntime for SeededTokio {
    type JoinError = tokio::task::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = tokio::task::JoinHandle<T>;
    type Sleep = tokio::time::Sleep;
    type Instant = TokioInstant;
    type TimeoutError = tokio::time::error::Elapsed;
    type Timeout<R, T: Future<Output = R> + OptionalSend> = tokio::time::Timeout<T>;
    type ThreadLocalRng = ThreadRng;
    type OneshotSender<T: OptionalSend> = TokioOneShotSender<T>;
    type OneshotReceiver<T: OptionalSend> = tokio::sync::oneshot::Receiver<T>;
    type OneshotReceiverError = tokio::sync::oneshot::error::RecvError;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        tokio::task::spawn(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        tokio::time::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        tokio::time::sleep_until(deadline)
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(duration: Duration, future: F) -> Self::Timeout<R, F> {
        tokio::time::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(deadline: Self::Instant, future: F) -> Self::Timeout<R, F> {
        tokio::time::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        join_error.is_panic()
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        ThreadRng
    }

    fn oneshot<T>() -> (Self::OneshotSender<T>, Self::OneshotReceiver<T>)
    where
        T: OptionalSend,
    {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        (TokioOneShotSender(sender), receiver)
    }
}
