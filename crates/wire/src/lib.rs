//! `wire`: the node-to-node protocol of Tessera.
//!
//! Every message between nodes is a [`frame::Frame`]: a versioned, checksummed
//! header and a bounded payload. Requests and responses are matched by a
//! correlation id, so one connection carries many calls at once. Payloads are
//! `postcard`-encoded messages defined by the crates above (`sharedlog`,
//! `catalog`, …); this crate only moves bytes and knows no message type.
//!
//! The [`Transport`] trait is the one way the rest of Tessera talks to other
//! nodes. [`tcp::TcpTransport`] is the real one; [`sim::SimNetwork`] is an
//! in-memory, seeded, fault-injecting one for the `sim` crate and for tests
//! that need partitions, delay and loss (this machine has no netem).
//!
//! **Invariant:** a malformed frame closes only the connection it came on,
//! with a logged error; the server keeps serving every other connection.
//!
//! **Boundary:** no knowledge of Raft, logs or SCSI; no dependency on any other
//! Tessera crate.

pub mod frame;
pub mod sim;
pub mod tcp;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use frame::{Frame, FrameError, Kind};

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// One incoming call, as a handler sees it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: u32,
    pub payload: Bytes,
    /// The peer's address as the transport knows it (for logs only).
    pub peer: String,
}

/// Error codes a handler can return; carried in an `Error` frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The payload did not decode as the method's request type.
    BadRequest,
    /// No handler for this method.
    UnknownMethod,
    /// The handler failed; the message says why.
    Internal,
    /// The node is shutting down or not ready.
    Unavailable,
}

/// An error returned by the remote handler.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct RemoteError {
    pub code: ErrorCode,
    pub message: String,
}

impl RemoteError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> RemoteError {
        RemoteError { code, message: message.into() }
    }
}

/// Why a call did not return a response.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("cannot connect to {address}: {reason}")]
    Connect { address: String, reason: String },
    #[error("connection to {address} lost before the reply arrived")]
    ConnectionLost { address: String },
    #[error("no reply from {address} within {timeout_ms} ms")]
    Timeout { address: String, timeout_ms: u64 },
    #[error("too many calls in flight to {address}")]
    Overloaded { address: String },
    #[error("remote error from {address}: {error}")]
    Remote { address: String, error: RemoteError },
    #[error("reply from {address} did not decode: {reason}")]
    Decode { address: String, reason: String },
}

impl CallError {
    /// True when the call may have reached the handler: a retry must be
    /// idempotent.
    pub fn is_ambiguous(&self) -> bool {
        matches!(self, CallError::ConnectionLost { .. } | CallError::Timeout { .. })
    }

    /// True when no answer came from the handler: the peer could not be
    /// reached, went away, was too slow or too busy (not an error it
    /// answered, nor an answer that did not decode).
    pub fn is_unanswered(&self) -> bool {
        matches!(
            self,
            CallError::Connect { .. }
                | CallError::ConnectionLost { .. }
                | CallError::Timeout { .. }
                | CallError::Overloaded { .. }
        )
    }
}

/// A node's request handler: one for all methods of the node.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, request: Request) -> BoxFuture<Result<Bytes, RemoteError>>;
}

impl<F, Fut> Handler for F
where
    F: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Bytes, RemoteError>> + Send + 'static,
{
    fn handle(&self, request: Request) -> BoxFuture<Result<Bytes, RemoteError>> {
        Box::pin(self(request))
    }
}

/// Counters a server keeps about its connections, for metrics.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub connections_accepted: std::sync::atomic::AtomicU64,
    pub connections_rejected: std::sync::atomic::AtomicU64,
    /// Connections served now: accepted, not yet ended.
    pub connections_open: std::sync::atomic::AtomicU64,
    pub bad_frames: std::sync::atomic::AtomicU64,
    pub requests: std::sync::atomic::AtomicU64,
}

/// A running server. Dropping it does not stop it; call [`ServeHandle::stop`].
pub struct ServeHandle {
    pub local_address: String,
    pub stats: Arc<ServerStats>,
    stop: Box<dyn FnOnce() + Send>,
}

impl fmt::Debug for ServeHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServeHandle").field("local_address", &self.local_address).finish()
    }
}

impl ServeHandle {
    pub fn new(local_address: String, stats: Arc<ServerStats>, stop: Box<dyn FnOnce() + Send>) -> Self {
        ServeHandle { local_address, stats, stop }
    }

    /// Stops accepting and closes every connection.
    pub fn stop(self) {
        (self.stop)()
    }
}

/// How a node reaches other nodes and serves them.
pub trait Transport: Clone + Send + Sync + 'static {
    /// Sends one request and waits for its reply, at most `timeout`.
    fn call(&self, to: &str, method: u32, payload: Bytes, timeout: Duration) -> BoxFuture<Result<Bytes, CallError>>;

    /// As [`Transport::call`], but a request that times out is not sent
    /// after its timeout: what is still queued for `to` is dropped. For a
    /// request that must not be carried out once its caller has moved on
    /// (a write the caller reports failed, whose data a later write may
    /// replace). Over TCP the connection is closed with a reset, so neither
    /// the writer's queue nor the kernel's unsent or unacknowledged bytes
    /// are delivered after the timeout (a peer cut off from the network
    /// would otherwise get them when the cut heals), and the peer drops the
    /// requests it has received but not started when it sees the reset;
    /// the other calls waiting on the connection end `ConnectionLost`. Not
    /// covered: a request the peer already started, or one whose call's
    /// future is dropped (its caller must drop it only where something else
    /// fences the request off). A transport that never delivers a request
    /// after its call's timeout needs no more than `call`.
    fn call_or_abort(
        &self,
        to: &str,
        method: u32,
        payload: Bytes,
        timeout: Duration,
    ) -> BoxFuture<Result<Bytes, CallError>> {
        self.call(to, method, payload, timeout)
    }

    /// Serves `handler` at `address` (for TCP, `host:port`; port 0 picks one).
    fn serve(&self, address: &str, handler: Arc<dyn Handler>) -> BoxFuture<std::io::Result<ServeHandle>>;

    /// Whether a call to `to` is served in this process without a socket.
    fn serves_in_place(&self, _to: &str) -> bool {
        false
    }
}

/// Encodes a message as a payload.
pub fn encode<T: Serialize>(message: &T) -> Bytes {
    Bytes::from(postcard::to_stdvec(message).expect("postcard encoding to a Vec cannot fail"))
}

/// Decodes a request payload; the error is ready to return to the caller.
pub fn decode_request<T: DeserializeOwned>(request: &Request) -> Result<T, RemoteError> {
    postcard::from_bytes(&request.payload).map_err(|error| {
        tracing::warn!(peer = %request.peer, method = request.method, %error, "request payload did not decode");
        RemoteError::new(ErrorCode::BadRequest, format!("method {} payload: {error}", request.method))
    })
}

/// A typed call: encodes `request`, decodes the reply.
pub async fn call<T, Req, Resp>(
    transport: &T,
    to: &str,
    method: u32,
    request: &Req,
    timeout: Duration,
) -> Result<Resp, CallError>
where
    T: Transport,
    Req: Serialize,
    Resp: DeserializeOwned,
{
    let reply = transport.call(to, method, encode(request), timeout).await?;
    postcard::from_bytes(&reply)
        .map_err(|error| CallError::Decode { address: to.to_string(), reason: error.to_string() })
}
