//! The log's RPC methods and messages (carried by `wire` frames).

use serde::{Deserialize, Serialize};

use crate::machine::GcClient;
use crate::raft::{AppendBatch, AppendRejected, NodeId};
use crate::types::{ClientId, Entry, Position, ReadOutcome, StreamId};

/// Method numbers; the log owns 0x0100..0x0200.
pub mod method {
    pub const RAFT_APPEND: u32 = 0x0100;
    pub const RAFT_VOTE: u32 = 0x0101;
    pub const RAFT_SNAPSHOT: u32 = 0x0102;
    pub const APPEND: u32 = 0x0110;
    pub const READ: u32 = 0x0111;
    pub const READ_STREAM: u32 = 0x0112;
    pub const TAIL: u32 = 0x0113;
    pub const GC_REPORT: u32 = 0x0114;
    pub const REGISTER: u32 = 0x0115;
    pub const UNREGISTER: u32 = 0x0116;
    pub const STATUS: u32 = 0x0117;
    pub const CHECKPOINTS: u32 = 0x0118;
    pub const CHECKPOINT_NOW: u32 = 0x0119;

    pub fn is_log_method(method: u32) -> bool {
        (0x0100..0x0200).contains(&method)
    }
}

/// Domain errors of the log, returned inside successful wire replies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum LogError {
    #[error("not the leader; the leader is {leader:?}")]
    NotLeader { leader: Option<(NodeId, String)> },
    #[error("log unavailable: {0}")]
    Unavailable(String),
    #[error("snapshot at {requested} refused: the snapshot mark is {mark}")]
    SnapshotBelowMark { requested: Position, mark: Position },
    #[error("append rejected: {0:?}")]
    Rejected(AppendRejected),
    #[error("storage error: {0}")]
    Storage(String),
}

pub type LogResult<T> = Result<T, LogError>;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AppendRequest {
    pub batch: AppendBatch,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReadRequest {
    pub position: Position,
}

pub type ReadReply = LogResult<ReadOutcome>;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReadStreamRequest {
    pub stream: StreamId,
    pub from: Position,
    /// Exclusive; `u64::MAX` for "as far as there is".
    pub to: Position,
    /// A snapshot read: only entries below this version, refused below the mark.
    pub as_of: Option<Position>,
    pub max_entries: u32,
    pub max_bytes: u32,
    /// Wait up to this long for something to return (a subscription poll).
    pub wait_ms: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StreamChunk {
    pub entries: Vec<Entry>,
    /// Everything of the stream below this has been returned (or collected).
    pub next: Position,
    /// The replica's tail when it answered.
    pub tail: Position,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RegisterRequest {
    pub client: ClientId,
    pub name: String,
    pub streams: Vec<StreamId>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct GcOutcome {
    pub deleted: u64,
    pub snapshot_mark: Position,
    /// Locators taken, from the front of the report; resend the rest.
    pub accepted: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckpointsRequest {
    pub stream: StreamId,
}

/// One replica's view of the log, for `tessera status` and tests.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LogStatus {
    pub node_id: NodeId,
    pub address: String,
    /// "Leader", "Follower", "Candidate", "Learner", "Shutdown".
    pub role: String,
    pub term: u64,
    pub leader: Option<NodeId>,
    pub leader_address: Option<String>,
    pub members: Vec<(NodeId, String)>,
    pub last_log_index: Option<u64>,
    pub commit_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub tail: Position,
    pub snapshot_mark: Position,
    pub live_entries: u64,
    pub live_bytes: u64,
    pub disk_bytes: u64,
    pub gc_pending_entries: u64,
    pub gc_deleted_entries: u64,
    pub gc_clients: Vec<(u64, GcClient)>,
    /// Per member: the last log index it is known to hold (leader only).
    pub replication: Vec<(NodeId, Option<u64>)>,
    /// The Raft index of the newest checkpoint (built or installed).
    pub checkpoint_index: Option<u64>,
    pub purged_index: Option<u64>,
    /// Snapshots this replica installed from a leader since it started.
    pub snapshots_installed: u64,
}

/// A chunk of a snapshot being sent to a follower.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotChunk {
    pub vote: crate::raft::Vote,
    pub meta: openraft::SnapshotMeta<NodeId, crate::raft::Node>,
    pub offset: u64,
    /// Framed snapshot items (see `machine::frame_snapshot_item`).
    pub data: Vec<u8>,
    pub done: bool,
}
