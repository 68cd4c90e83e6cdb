//! The TCP transport: one multiplexed connection per peer address.
//!
//! Each connection has a reader task and a writer task. The writer coalesces
//! queued frames into one `write` so many small calls cost one syscall; the
//! reader routes replies to waiting callers by correlation id.
//!
//! A transport may be given [`LocalHandlers`]: handlers this process serves,
//! by the address they listen on. A call to one of those addresses is handed
//! to its handler in place, on the caller's thread, with the same timeout and
//! errors as over a socket but without the kernel's TCP stack or a wake-up of
//! the listening thread (an owner reaching a component on its own host).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::frame::{Decoder, Frame, Kind};
use crate::{BoxFuture, CallError, ErrorCode, Handler, RemoteError, Request, ServeHandle, ServerStats, Transport};

/// Calls waiting for a reply on one connection. Why bounded: a peer that
/// stops answering must not make us queue without limit.
pub const CALLS_IN_FLIGHT_MAX: usize = 4096;
/// Requests one server connection handles at once; further requests wait
/// (TCP back-pressure reaches the client).
pub const REQUESTS_IN_FLIGHT_PER_CONNECTION_MAX: usize = 1024;
/// Connections one server accepts at once.
pub const CONNECTIONS_MAX: usize = 4096;
/// Frames queued for one connection's writer.
const WRITE_QUEUE_FRAMES_MAX: usize = 8192;
/// The writer flushes once this much is buffered even if more frames wait.
const WRITE_BATCH_BYTES_MAX: usize = 1024 * 1024;
const READ_BUFFER_BYTES: usize = 256 * 1024;
/// A connection idle this long is probed (TCP keepalive), every
/// `KEEPALIVE_INTERVAL`. Why: a client that aborts a connection while cut
/// off from the server (`call_or_abort`) sends a reset the server never
/// gets, and a server that never wrote there again held the connection,
/// one of its `CONNECTIONS_MAX`, for good. A live peer answers a probe; one
/// that lost the connection answers it with a reset, which ends it at once.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE_PROBES: u32 = 3;
/// A connection ends once what it sent, data or keepalive probes, has gone
/// unacknowledged this long (`TCP_USER_TIMEOUT`, which on Linux takes over
/// from the probe count): a peer gone without a word is let go after about
/// 30 s, where the kernel would retransmit data for about 15 minutes. It
/// also ends a connection whose peer takes nothing (a zero window) for as
/// long: as long as a block I/O call waits (`IO_TIMEOUT` in the node).
const UNACKNOWLEDGED_MAX: Duration = Duration::from_secs(30);

type Pending = Mutex<HashMap<u64, oneshot::Sender<Frame>>>;

struct Connection {
    address: String,
    writer: mpsc::Sender<Frame>,
    pending: Pending,
    next_correlation: AtomicU64,
    closed: AtomicBool,
    /// Tells the writer task the reader ended, so it closes the socket
    /// now rather than at the next call (which a peer that restarted at
    /// another address never gets).
    ended: Arc<tokio::sync::Notify>,
    /// Set once to close the connection at once with a reset, delivering
    /// nothing more (`Transport::call_or_abort`).
    abort: tokio::sync::watch::Sender<bool>,
}

impl Connection {
    /// Closes the connection with a reset: the writer drops the frames it
    /// has queued, the kernel the bytes it has not had acknowledged, and
    /// every call waiting on it ends `ConnectionLost`.
    fn abort(&self) {
        // The flag first: `fail_all_pending` wakes the writer through
        // `ended`, and it must then see the flag.
        self.abort.send_replace(true);
        self.fail_all_pending();
    }

    fn fail_all_pending(&self) {
        self.closed.store(true, Ordering::SeqCst);
        // Dropping the senders wakes every waiter with ConnectionLost.
        self.pending.lock().expect("pending lock poisoned").clear();
        self.ended.notify_one();
    }
}

/// Handlers served in this process, by the address they listen on; shared
/// by every transport given them.
#[derive(Clone, Default)]
pub struct LocalHandlers(Arc<RwLock<HashMap<String, Arc<dyn Handler>>>>);

impl LocalHandlers {
    /// Calls to `address` are served by `handler` in place from now on.
    pub fn insert(&self, address: &str, handler: Arc<dyn Handler>) {
        self.0.write().expect("local handlers lock").insert(address.to_string(), handler);
    }

    /// Calls to `address` go over TCP again.
    pub fn remove(&self, address: &str) {
        self.0.write().expect("local handlers lock").remove(address);
    }

    fn get(&self, address: &str) -> Option<Arc<dyn Handler>> {
        self.0.read().expect("local handlers lock").get(address).cloned()
    }

    fn contains(&self, address: &str) -> bool {
        self.0.read().expect("local handlers lock").contains_key(address)
    }
}

/// One peer's connection, if any. Its lock is held while connecting: calls
/// to that peer wait for one connect, calls to other peers do not (a peer
/// whose SYNs vanish in a partition must not hold up the healthy ones).
type Slot = Arc<tokio::sync::Mutex<Option<Arc<Connection>>>>;

/// The real transport. Cheap to clone; clones share their connections.
#[derive(Clone, Default)]
pub struct TcpTransport {
    connections: Arc<Mutex<HashMap<String, Slot>>>,
    local: LocalHandlers,
    /// The address outgoing connections leave from; `None`: the kernel's choice.
    source: Option<IpAddr>,
}

impl TcpTransport {
    pub fn new() -> TcpTransport {
        TcpTransport::default()
    }

    /// A transport that serves calls to `local`'s addresses in place.
    pub fn with_local(local: LocalHandlers) -> TcpTransport {
        TcpTransport { connections: Default::default(), local, source: None }
    }

    /// Outgoing connections leave from `source` (port chosen by the
    /// kernel), the address peers know this host by; `None` or an
    /// unspecified address leaves the choice to the kernel. Why: left to itself,
    /// the kernel picks the outgoing interface's primary address (on
    /// loopback, 127.0.0.1 whatever 127.0.0.x the host serves on), so a
    /// network cut of the host's address would stop what it receives but
    /// not what it sends, and a host that hears no one could still tell
    /// others that its peers went silent.
    pub fn bound_to(mut self, source: Option<IpAddr>) -> TcpTransport {
        self.source = source.filter(|source| !source.is_unspecified());
        self
    }

    async fn connect(&self, address: &str) -> std::io::Result<TcpStream> {
        let Some(source) = self.source else { return TcpStream::connect(address).await };
        let mut last_error = None;
        for peer in tokio::net::lookup_host(address).await? {
            if peer.is_ipv4() != source.is_ipv4() {
                continue;
            }
            let socket = if peer.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
            socket.bind(SocketAddr::new(source, 0))?;
            match socket.connect(peer).await {
                Ok(stream) => return Ok(stream),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::AddrNotAvailable,
                format!("{address} has no address of the family of this host's {source}"),
            )
        }))
    }

    /// A call to a handler of this process: what a socket would have carried,
    /// minus the socket.
    async fn call_in_place(
        handler: Arc<dyn Handler>,
        address: String,
        method: u32,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, CallError> {
        let request = Request { method, payload, peer: "in-process".to_string() };
        match tokio::time::timeout(timeout, handler.handle(request)).await {
            Err(_) => Err(CallError::Timeout { address, timeout_ms: timeout.as_millis() as u64 }),
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(error)) => Err(CallError::Remote { address, error }),
        }
    }

    /// The open connection to `address`, connecting if there is none; no
    /// later than `deadline`, whoever else is connecting to it.
    async fn connection(
        &self,
        address: &str,
        deadline: tokio::time::Instant,
        timeout: Duration,
    ) -> Result<Arc<Connection>, CallError> {
        let slot = {
            let mut connections = self.connections.lock().expect("connections lock");
            match connections.get(address) {
                Some(slot) => slot.clone(),
                None => connections.entry(address.to_string()).or_default().clone(),
            }
        };
        let connect_error = |reason: String| CallError::Connect { address: address.to_string(), reason };
        let timed_out = || connect_error(format!("timed out after {} ms", timeout.as_millis()));
        let mut slot = tokio::time::timeout_at(deadline, slot.lock()).await.map_err(|_| timed_out())?;
        // A writer task gone without marking the connection closed: its
        // runtime stopped (a thread's own transport outlived it).
        let alive =
            |connection: &&Arc<Connection>| !connection.closed.load(Ordering::SeqCst) && !connection.writer.is_closed();
        if let Some(connection) = slot.as_ref().filter(alive) {
            return Ok(connection.clone());
        }
        *slot = None;
        let stream = tokio::time::timeout_at(deadline, self.connect(address))
            .await
            .map_err(|_| timed_out())?
            .map_err(|error| connect_error(error.to_string()))?;
        stream.set_nodelay(true).map_err(|error| connect_error(error.to_string()))?;
        // Closed with a reset, however it closes (an abort, the process
        // ending): what it still holds for the peer is not sent after, when
        // nobody waits for its answers (a peer cut off from the network
        // would get it when the cut heals).
        stream.set_zero_linger().map_err(|error| connect_error(error.to_string()))?;
        if let Err(error) = detect_dead_peers(&stream) {
            tracing::warn!(peer = %address, %error, "could not enable keepalive; a peer gone silently holds the connection");
        }
        let (read_half, write_half) = stream.into_split();
        let (writer, queue) = mpsc::channel(WRITE_QUEUE_FRAMES_MAX);
        let (abort, aborted) = tokio::sync::watch::channel(false);
        let connection = Arc::new(Connection {
            address: address.to_string(),
            writer,
            pending: Mutex::new(HashMap::new()),
            next_correlation: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            ended: Arc::new(tokio::sync::Notify::new()),
            abort,
        });
        let peer = address.to_string();
        tokio::spawn(write_frames(write_half, queue, peer, connection.ended.clone(), Some(aborted.clone())));
        tokio::spawn(read_replies(read_half, connection.clone(), aborted));
        *slot = Some(connection.clone());
        Ok(connection)
    }

    /// A call over TCP; one that times out aborts its connection if
    /// `abort_on_timeout` (`Transport::call_or_abort`).
    async fn call_inner(
        &self,
        address: String,
        method: u32,
        payload: Bytes,
        timeout: Duration,
        abort_on_timeout: bool,
    ) -> Result<Bytes, CallError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let connection = self.connection(&address, deadline, timeout).await?;
        let correlation = connection.next_correlation.fetch_add(1, Ordering::Relaxed);
        let (reply_sender, reply) = oneshot::channel();
        {
            let mut pending = connection.pending.lock().expect("pending lock poisoned");
            if pending.len() >= CALLS_IN_FLIGHT_MAX {
                return Err(CallError::Overloaded { address });
            }
            if connection.closed.load(Ordering::SeqCst) {
                return Err(CallError::ConnectionLost { address });
            }
            pending.insert(correlation, reply_sender);
        }
        let frame = Frame { kind: Kind::Request, method, correlation, payload };
        let outcome = tokio::time::timeout_at(deadline, async {
            connection.writer.send(frame).await.map_err(|_| CallError::ConnectionLost { address: address.clone() })?;
            reply.await.map_err(|_| CallError::ConnectionLost { address: address.clone() })
        })
        .await;
        let frame = match outcome {
            Ok(result) => result?,
            Err(_) => {
                connection.pending.lock().expect("pending lock poisoned").remove(&correlation);
                if abort_on_timeout {
                    tracing::debug!(peer = %address, "a call timed out; aborting its connection");
                    connection.abort();
                }
                return Err(CallError::Timeout { address, timeout_ms: timeout.as_millis() as u64 });
            }
        };
        match frame.kind {
            Kind::Response => Ok(frame.payload),
            Kind::Error => {
                let error = postcard::from_bytes::<RemoteError>(&frame.payload).unwrap_or_else(|error| {
                    RemoteError::new(ErrorCode::Internal, format!("undecodable error reply: {error}"))
                });
                Err(CallError::Remote { address, error })
            }
            Kind::Request => unreachable!("read_replies never routes requests"),
        }
    }
}

impl Transport for TcpTransport {
    fn call(&self, to: &str, method: u32, payload: Bytes, timeout: Duration) -> BoxFuture<Result<Bytes, CallError>> {
        let address = to.to_string();
        if let Some(handler) = self.local.get(to) {
            return Box::pin(TcpTransport::call_in_place(handler, address, method, payload, timeout));
        }
        let transport = self.clone();
        Box::pin(async move { transport.call_inner(address, method, payload, timeout, false).await })
    }

    /// A call served in place is not sent anywhere: its timeout drops it
    /// (what its handler already handed to another task may still run).
    fn call_or_abort(
        &self,
        to: &str,
        method: u32,
        payload: Bytes,
        timeout: Duration,
    ) -> BoxFuture<Result<Bytes, CallError>> {
        let address = to.to_string();
        if let Some(handler) = self.local.get(to) {
            return Box::pin(TcpTransport::call_in_place(handler, address, method, payload, timeout));
        }
        let transport = self.clone();
        Box::pin(async move { transport.call_inner(address, method, payload, timeout, true).await })
    }

    fn serve(&self, address: &str, handler: Arc<dyn Handler>) -> BoxFuture<std::io::Result<ServeHandle>> {
        let address = address.to_string();
        Box::pin(async move { serve_tcp(&address, handler).await })
    }

    fn serves_in_place(&self, to: &str) -> bool {
        self.local.contains(to)
    }
}

async fn write_frames(
    mut stream: OwnedWriteHalf,
    mut queue: mpsc::Receiver<Frame>,
    peer: String,
    ended: Arc<tokio::sync::Notify>,
    mut aborted: Option<tokio::sync::watch::Receiver<bool>>,
) {
    let mut buffer = BytesMut::with_capacity(64 * 1024);
    loop {
        let frame = tokio::select! {
            biased;
            () = until_aborted(&mut aborted) => return reset(stream),
            frame = queue.recv() => match frame {
                Some(frame) => frame,
                None => break,
            },
            () = ended.notified() => break,
        };
        frame.encode(&mut buffer);
        while buffer.len() < WRITE_BATCH_BYTES_MAX {
            match queue.try_recv() {
                Ok(frame) => frame.encode(&mut buffer),
                Err(_) => break,
            }
        }
        // A write blocked on a peer that takes nothing (cut off) ends with
        // an abort too.
        tokio::select! {
            biased;
            () = until_aborted(&mut aborted) => return reset(stream),
            written = stream.write_all(&buffer) => {
                if let Err(error) = written {
                    tracing::debug!(%peer, %error, "write failed; closing connection");
                    return;
                }
            }
        }
        buffer.clear();
    }
    if aborted.as_ref().is_some_and(|aborted| *aborted.borrow()) {
        return reset(stream);
    }
    let _ = stream.shutdown().await;
}

/// Returns once the connection is aborted; never for one that cannot be
/// (a server's).
async fn until_aborted(aborted: &mut Option<tokio::sync::watch::Receiver<bool>>) {
    if let Some(aborted) = aborted {
        if aborted.wait_for(|aborted| *aborted).await.is_ok() {
            return;
        }
    }
    std::future::pending().await
}

/// Closes an aborted connection's socket (once its read half is gone too)
/// with a reset (its linger is zero), not after the bytes the kernel still
/// holds for the peer.
fn reset(stream: OwnedWriteHalf) {
    stream.forget();
}

async fn read_replies(
    mut stream: OwnedReadHalf,
    connection: Arc<Connection>,
    aborted: tokio::sync::watch::Receiver<bool>,
) {
    let mut aborted = Some(aborted);
    let decoder = Decoder::default();
    let mut buffer = BytesMut::with_capacity(READ_BUFFER_BYTES);
    loop {
        loop {
            match decoder.decode(&mut buffer) {
                Ok(Some(frame)) if frame.kind != Kind::Request => {
                    let waiter = connection.pending.lock().expect("pending lock poisoned").remove(&frame.correlation);
                    // A reply for a call that timed out is dropped.
                    if let Some(waiter) = waiter {
                        let _ = waiter.send(frame);
                    }
                }
                Ok(Some(frame)) => {
                    tracing::warn!(peer = %connection.address, method = frame.method,
                        "server sent a request on a client connection; closing");
                    connection.fail_all_pending();
                    return;
                }
                Ok(None) => break,
                Err(error) => {
                    tracing::warn!(peer = %connection.address, %error, "bad frame from server; closing connection");
                    connection.fail_all_pending();
                    return;
                }
            }
        }
        let read = tokio::select! {
            read = stream.read_buf(&mut buffer) => read,
            () = until_aborted(&mut aborted) => return,
        };
        match read {
            Ok(0) | Err(_) => {
                connection.fail_all_pending();
                return;
            }
            Ok(_) => {}
        }
    }
}

async fn serve_tcp(address: &str, handler: Arc<dyn Handler>) -> std::io::Result<ServeHandle> {
    let listener = TcpListener::bind(address).await?;
    let local_address = listener.local_addr()?.to_string();
    let stats = Arc::new(ServerStats::default());
    let (stop_sender, mut stop) = tokio::sync::watch::channel(false);
    let accept_stats = stats.clone();
    tokio::spawn(async move {
        let connections = Arc::new(Semaphore::new(CONNECTIONS_MAX));
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stop.changed() => return,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = connections.clone().try_acquire_owned() else {
                accept_stats.connections_rejected.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%peer, limit = CONNECTIONS_MAX, "connection limit reached; refusing");
                continue;
            };
            accept_stats.connections_accepted.fetch_add(1, Ordering::Relaxed);
            let _ = stream.set_nodelay(true);
            if let Err(error) = detect_dead_peers(&stream) {
                tracing::warn!(%peer, %error, "could not enable keepalive; a peer gone silently holds its connection");
            }
            let handler = handler.clone();
            let stats = accept_stats.clone();
            let mut stop = stop.clone();
            stats.connections_open.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                tokio::select! {
                    _ = serve_connection(stream, peer.to_string(), handler, stats.clone()) => {}
                    _ = stop.changed() => {}
                }
                stats.connections_open.fetch_sub(1, Ordering::Relaxed);
                drop(permit);
            });
        }
    });
    Ok(ServeHandle::new(
        local_address,
        stats,
        Box::new(move || {
            let _ = stop_sender.send(true);
        }),
    ))
}

/// Ends the connection once its peer stops answering: when idle, after
/// unanswered keepalive probes; with data outstanding, once it has gone
/// unacknowledged for `UNACKNOWLEDGED_MAX`.
fn detect_dead_peers(stream: &TcpStream) -> std::io::Result<()> {
    let socket = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    socket.set_tcp_keepalive(&keepalive)?;
    socket.set_tcp_user_timeout(Some(UNACKNOWLEDGED_MAX))
}

/// Whether the client reset the connection (`Transport::call_or_abort`).
/// Requests it sent before that are still read after the reset, but it
/// gave up on them: those not started yet are dropped, with the connection.
fn reset_by_peer(read_half: &OwnedReadHalf, peer: &str) -> bool {
    // A reset closes the socket: it has no peer any more. (Not the
    // socket's pending error: a reply written after the reset takes that.)
    // Other errors (an ICMP message, say) leave the connection working.
    match read_half.peer_addr() {
        Err(error) if error.kind() == std::io::ErrorKind::NotConnected => {
            tracing::debug!(%peer, "the client reset the connection; dropping the requests not started");
            true
        }
        _ => false,
    }
}

async fn serve_connection(stream: TcpStream, peer: String, handler: Arc<dyn Handler>, stats: Arc<ServerStats>) {
    let (mut read_half, write_half) = stream.into_split();
    let (writer, queue) = mpsc::channel(WRITE_QUEUE_FRAMES_MAX);
    let ended = Arc::new(tokio::sync::Notify::new());
    let writer_task = tokio::spawn(write_frames(write_half, queue, peer.clone(), ended, None));
    let in_flight = Arc::new(Semaphore::new(REQUESTS_IN_FLIGHT_PER_CONNECTION_MAX));
    let decoder = Decoder::default();
    let mut buffer = BytesMut::with_capacity(READ_BUFFER_BYTES);
    'connection: loop {
        loop {
            match decoder.decode(&mut buffer) {
                Ok(Some(frame)) if frame.kind == Kind::Request => {
                    stats.requests.fetch_add(1, Ordering::Relaxed);
                    let permit = match in_flight.clone().try_acquire_owned() {
                        Ok(permit) => permit,
                        Err(_) => {
                            let permit = in_flight.clone().acquire_owned().await.expect("semaphore never closed");
                            // The client may have given up meanwhile.
                            if reset_by_peer(&read_half, &peer) {
                                break 'connection;
                            }
                            permit
                        }
                    };
                    let handler = handler.clone();
                    let writer = writer.clone();
                    let peer = peer.clone();
                    tokio::spawn(async move {
                        let request = Request { method: frame.method, payload: frame.payload, peer };
                        let reply = match handler.handle(request).await {
                            Ok(payload) => Frame {
                                kind: Kind::Response,
                                method: frame.method,
                                correlation: frame.correlation,
                                payload,
                            },
                            Err(error) => Frame {
                                kind: Kind::Error,
                                method: frame.method,
                                correlation: frame.correlation,
                                payload: crate::encode(&error),
                            },
                        };
                        let _ = writer.send(reply).await;
                        drop(permit);
                    });
                }
                Ok(Some(frame)) => {
                    stats.bad_frames.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%peer, kind = ?frame.kind, "client sent a non-request frame; closing connection");
                    break 'connection;
                }
                Ok(None) => break,
                Err(error) => {
                    stats.bad_frames.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%peer, %error, "bad frame; closing connection");
                    break 'connection;
                }
            }
        }
        match read_half.read_buf(&mut buffer).await {
            Ok(0) => {
                if let Err(error) = decoder.finish(&buffer) {
                    stats.bad_frames.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%peer, %error, "bad frame; closing connection");
                }
                break;
            }
            Ok(_) if reset_by_peer(&read_half, &peer) => break,
            Ok(_) => {}
            Err(error) => {
                tracing::debug!(%peer, %error, "read failed; closing connection");
                break;
            }
        }
    }
    drop(writer);
    // Let replies already queued go out, but do not wait on a dead peer forever.
    let _ = tokio::time::timeout(Duration::from_secs(1), writer_task).await;
}
