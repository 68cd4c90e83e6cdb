//! openraft's network over `wire`: AppendEntries, Vote and chunked snapshots.

use std::future::Future;
use std::time::Duration;

use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, ReplicationClosed,
    StreamingError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, SnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::Snapshot;
use wire::{CallError, Transport};

use crate::machine::{frame_snapshot_item, SnapshotData, SnapshotItem};
use crate::protocol::{method, SnapshotChunk};
use crate::raft::{Node, NodeId, TypeConfig, Vote};

/// Payload bytes per AppendEntries RPC before we ask openraft to split.
const APPEND_PAYLOAD_BYTES_MAX: usize = wire::frame::PAYLOAD_SIZE_MAX - 64 * 1024;
/// Entry bytes per snapshot chunk.
const SNAPSHOT_CHUNK_BYTES: usize = 4 * 1024 * 1024;
const SNAPSHOT_CHUNK_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct Network<T: Transport> {
    transport: T,
}

impl<T: Transport> Network<T> {
    pub fn new(transport: T) -> Self {
        Network { transport }
    }
}

pub struct Peer<T: Transport> {
    transport: T,
    target: NodeId,
    address: String,
}

impl<T: Transport> RaftNetworkFactory<TypeConfig> for Network<T> {
    type Network = Peer<T>;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> Self::Network {
        Peer { transport: self.transport.clone(), target, address: node.addr.clone() }
    }
}

fn to_rpc_error<E: std::error::Error>(error: CallError) -> RPCError<NodeId, Node, E> {
    match error {
        CallError::Connect { .. } => RPCError::Unreachable(Unreachable::new(&error)),
        _ => RPCError::Network(NetworkError::new(&error)),
    }
}

impl<T: Transport> Peer<T> {
    async fn call<Req, Resp, E>(
        &self,
        method: u32,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<NodeId, Node, RaftError<NodeId, E>>>
    where
        Req: serde::Serialize,
        Resp: serde::de::DeserializeOwned,
        E: std::error::Error + serde::de::DeserializeOwned,
    {
        let reply: Result<Resp, RaftError<NodeId, E>> =
            wire::call(&self.transport, &self.address, method, request, timeout).await.map_err(to_rpc_error)?;
        reply.map_err(|error| RPCError::RemoteError(RemoteError::new(self.target, error)))
    }

    async fn send_chunk(&self, chunk: &SnapshotChunk) -> Result<Option<SnapshotResponse<NodeId>>, CallError> {
        let reply: Result<Option<SnapshotResponse<NodeId>>, String> =
            wire::call(&self.transport, &self.address, method::RAFT_SNAPSHOT, chunk, SNAPSHOT_CHUNK_TIMEOUT).await?;
        reply.map_err(|message| CallError::Remote {
            address: self.address.clone(),
            error: wire::RemoteError::new(wire::ErrorCode::Internal, message),
        })
    }

    async fn stream_snapshot(
        &self,
        vote: Vote,
        snapshot: Snapshot<TypeConfig>,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let SnapshotData::Local { shared, header } = *snapshot.snapshot else {
            return Err(StreamingError::Network(NetworkError::new(&std::io::Error::other(
                "only a local checkpoint can be sent",
            ))));
        };
        // A peer that refuses connections is down: say Unreachable so
        // openraft backs off instead of retrying the snapshot at once.
        let network_error = |error: CallError| match error {
            CallError::Connect { .. } => StreamingError::Unreachable(Unreachable::new(&error)),
            _ => StreamingError::Network(NetworkError::new(&error)),
        };
        let upto = header.next_position;
        // The stream is a byte sequence of framed items (header, entry
        // batches, trailer), cut into chunks of at most SNAPSHOT_CHUNK_BYTES
        // whatever the items' sizes, so no frame exceeds the wire's limit.
        let mut pending: Vec<u8> = frame_snapshot_item(&SnapshotItem::Header {
            meta: Box::new(snapshot.meta.clone()),
            machine: Box::new(header),
        });
        let mut chunk = SnapshotChunk { vote, meta: snapshot.meta.clone(), offset: 0, data: Vec::new(), done: false };
        let mut from = 0;
        let mut sent_entries = 0u64;
        let mut finished = false;
        loop {
            while pending.len() < SNAPSHOT_CHUNK_BYTES && !finished {
                if from < upto {
                    let (entries, next) = {
                        let inner = shared.read();
                        inner
                            .store
                            .live_entries_from(from, upto, SNAPSHOT_CHUNK_BYTES)
                            .map_err(|error| StreamingError::Network(NetworkError::new(&error)))?
                    };
                    from = next;
                    if !entries.is_empty() {
                        sent_entries += entries.len() as u64;
                        pending.extend(frame_snapshot_item(&SnapshotItem::Entries(entries)));
                    }
                } else {
                    pending.extend(frame_snapshot_item(&SnapshotItem::End { entries: sent_entries }));
                    finished = true;
                }
            }
            let take = pending.len().min(SNAPSHOT_CHUNK_BYTES);
            chunk.data = pending.drain(..take).collect();
            chunk.done = finished && pending.is_empty();
            let response = self.send_chunk(&chunk).await.map_err(network_error)?;
            chunk.offset += chunk.data.len() as u64;
            if chunk.done {
                return response.ok_or_else(|| {
                    StreamingError::Network(NetworkError::new(&std::io::Error::other(
                        "follower did not install the snapshot",
                    )))
                });
            }
        }
    }
}

impl<T: Transport> RaftNetwork<TypeConfig> for Peer<T> {
    async fn append_entries(
        &mut self,
        request: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        let encoded = wire::encode(&request);
        if encoded.len() > APPEND_PAYLOAD_BYTES_MAX && request.entries.len() > 1 {
            return Err(RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(request.entries.len() as u64 / 2)));
        }
        let entries = request.entries.len();
        let started = std::time::Instant::now();
        let reply: Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> = {
            let bytes = self
                .transport
                .call(&self.address, method::RAFT_APPEND, encoded, option.hard_ttl())
                .await
                .map_err(to_rpc_error)?;
            postcard::from_bytes(&bytes).map_err(|error| RPCError::Network(NetworkError::new(&error)))?
        };
        metrics::histogram!("sharedlog_append_entries_rpc_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("sharedlog_append_entries_rpc_entries").record(entries as f64);
        reply.map_err(|error| RPCError::RemoteError(RemoteError::new(self.target, error)))
    }

    async fn install_snapshot(
        &mut self,
        _request: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>> {
        // With generic snapshot data openraft only calls full_snapshot.
        Err(RPCError::Unreachable(Unreachable::new(&std::io::Error::other("chunked install_snapshot is not used"))))
    }

    async fn vote(
        &mut self,
        request: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.call(method::RAFT_VOTE, &request, option.hard_ttl()).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot<TypeConfig>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        tokio::select! {
            result = self.stream_snapshot(vote, snapshot) => result,
            closed = cancel => Err(StreamingError::Closed(closed)),
        }
    }
}
