use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wire::frame::{Frame, Kind, PAYLOAD_SIZE_MAX};
use wire::tcp::{LocalHandlers, TcpTransport};
use wire::{CallError, ErrorCode, RemoteError, Request, Transport};

const TIMEOUT: Duration = Duration::from_secs(5);

async fn echo_server() -> wire::ServeHandle {
    let handler = |request: Request| async move {
        match request.method {
            1 => Ok(request.payload),
            2 => Err(RemoteError::new(ErrorCode::Internal, "asked to fail")),
            3 => {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok(Bytes::new())
            }
            _ => Err(RemoteError::new(ErrorCode::UnknownMethod, "no such method")),
        }
    };
    TcpTransport::new().serve("127.0.0.1:0", Arc::new(handler)).await.unwrap()
}

#[tokio::test]
async fn calls_are_answered_and_correlated() {
    let server = echo_server().await;
    let transport = TcpTransport::new();
    let mut calls = Vec::new();
    for index in 0..200u32 {
        let transport = transport.clone();
        let address = server.local_address.clone();
        calls.push(tokio::spawn(async move {
            let payload = Bytes::from(index.to_le_bytes().repeat(index as usize % 50 + 1));
            let reply = transport.call(&address, 1, payload.clone(), TIMEOUT).await.unwrap();
            assert_eq!(reply, payload);
        }));
    }
    for call in calls {
        call.await.unwrap();
    }
    server.stop();
}

#[tokio::test]
async fn remote_errors_and_timeouts_are_distinct() {
    let server = echo_server().await;
    let transport = TcpTransport::new();
    let error = transport.call(&server.local_address, 2, Bytes::new(), TIMEOUT).await.unwrap_err();
    assert!(matches!(error, CallError::Remote { error: RemoteError { code: ErrorCode::Internal, .. }, .. }));
    let error = transport.call(&server.local_address, 3, Bytes::new(), Duration::from_millis(100)).await.unwrap_err();
    assert!(matches!(error, CallError::Timeout { .. }), "{error:?}");
    assert!(error.is_ambiguous());
    // The connection still works after a timed-out call.
    let reply = transport.call(&server.local_address, 1, Bytes::from_static(b"ok"), TIMEOUT).await.unwrap();
    assert_eq!(&reply[..], b"ok");
}

/// A call that times out with `call_or_abort` ends its connection at once:
/// the other calls waiting on it end `ConnectionLost`, and the next call
/// opens a new one. A plain call's timeout leaves the connection be.
#[tokio::test]
async fn a_call_or_abort_that_times_out_ends_its_connection() {
    let server = echo_server().await;
    let address = server.local_address.clone();
    let transport = TcpTransport::new();
    let accepted = || server.stats.connections_accepted.load(std::sync::atomic::Ordering::SeqCst);
    let short = Duration::from_millis(200);
    let plain = transport.call(&address, 3, Bytes::new(), short).await;
    assert!(matches!(plain, Err(CallError::Timeout { .. })), "{plain:?}");
    assert_eq!(transport.call(&address, 1, Bytes::from_static(b"a"), TIMEOUT).await.unwrap(), &b"a"[..]);
    assert_eq!(accepted(), 1, "a plain call's timeout kept the connection");
    let waiting = tokio::spawn({
        let (transport, address) = (transport.clone(), address.clone());
        async move { transport.call(&address, 3, Bytes::new(), TIMEOUT).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let aborted = transport.call_or_abort(&address, 3, Bytes::new(), short).await;
    assert!(matches!(aborted, Err(CallError::Timeout { .. })), "{aborted:?}");
    let other = waiting.await.unwrap();
    assert!(matches!(other, Err(CallError::ConnectionLost { .. })), "{other:?}");
    assert_eq!(transport.call(&address, 1, Bytes::from_static(b"b"), TIMEOUT).await.unwrap(), &b"b"[..]);
    assert_eq!(accepted(), 2, "the next call did not open a new connection");
}

/// The connection of a `call_or_abort` that timed out is reset, not closed
/// after its bytes: the peer's read ends with a reset.
#[tokio::test]
async fn an_aborted_connection_is_reset() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let transport = TcpTransport::new();
    let call = tokio::spawn(async move {
        transport.call_or_abort(&address, 1, Bytes::from_static(b"late"), Duration::from_millis(200)).await
    });
    let (mut peer, _) = listener.accept().await.unwrap();
    let timed_out = call.await.unwrap();
    assert!(matches!(timed_out, Err(CallError::Timeout { .. })), "{timed_out:?}");
    let mut bytes = Vec::new();
    let end = tokio::time::timeout(TIMEOUT, peer.read_to_end(&mut bytes)).await.expect("the connection ended");
    assert_eq!(end.map_err(|error| error.kind()), Err(std::io::ErrorKind::ConnectionReset));
}

/// Requests a server has read but not started when the client resets the
/// connection (a `call_or_abort` that timed out) are dropped: the client
/// gave up on them, and may have sent the same change elsewhere since. The
/// handler holds as many requests as one connection may have in flight;
/// the next ones wait for room, and once the client has aborted, none of
/// them is handled when room is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_drops_the_requests_it_had_not_started_once_the_client_resets() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let started = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let handler = {
        let (started, gate) = (started.clone(), gate.clone());
        move |_request: Request| {
            let (started, gate) = (started.clone(), gate.clone());
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                let _ = gate.acquire().await.unwrap();
                Ok(Bytes::new())
            }
        }
    };
    let server = TcpTransport::new().serve("127.0.0.1:0", Arc::new(handler)).await.unwrap();
    let address = server.local_address.clone();
    let transport = TcpTransport::new();
    let held = wire::tcp::REQUESTS_IN_FLIGHT_PER_CONNECTION_MAX;
    let waiting = 100;
    let calls: Vec<_> = (0..held + waiting)
        .map(|_| {
            let (transport, address) = (transport.clone(), address.clone());
            tokio::spawn(async move { transport.call(&address, 1, Bytes::new(), Duration::from_secs(60)).await })
        })
        .collect();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while started.load(Ordering::SeqCst) < held && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(started.load(Ordering::SeqCst), held, "the server did not start as many requests as it may hold");
    let aborted = transport.call_or_abort(&address, 1, Bytes::new(), Duration::from_millis(200)).await;
    assert!(matches!(aborted, Err(CallError::Timeout { .. })), "{aborted:?}");
    for call in calls {
        let lost = call.await.unwrap();
        assert!(matches!(lost, Err(CallError::ConnectionLost { .. })), "{lost:?}");
    }
    // The reset crosses loopback at once; then the handlers make room.
    tokio::time::sleep(Duration::from_millis(500)).await;
    gate.add_permits(held + waiting + 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(started.load(Ordering::SeqCst), held, "requests the client gave up on were handled after its reset");
    server.stop();
}

#[tokio::test]
async fn connect_failure_is_reported() {
    let transport = TcpTransport::new();
    // Port 1 on loopback is closed on these machines.
    let error = transport.call("127.0.0.1:1", 1, Bytes::new(), TIMEOUT).await.unwrap_err();
    assert!(matches!(error, CallError::Connect { .. }), "{error:?}");
}

#[tokio::test]
async fn a_local_handler_is_called_in_place_and_answers_like_a_socket() {
    let server = echo_server().await;
    let address = server.local_address.clone();
    // The echo handler's twin, registered for the address, counting its
    // calls and marking its answers so they cannot be taken for the TCP
    // server's.
    let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = calls.clone();
    let handler = move |request: Request| {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            match request.method {
                1 => Ok(Bytes::from([&b"in place: "[..], &request.payload].concat())),
                2 => Err(RemoteError::new(ErrorCode::Internal, "asked to fail")),
                _ => {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    Ok(Bytes::new())
                }
            }
        }
    };
    let local = LocalHandlers::default();
    let transport = TcpTransport::with_local(local.clone());
    assert!(!transport.serves_in_place(&address));
    local.insert(&address, Arc::new(handler));
    assert!(transport.serves_in_place(&address));
    let reply = transport.call(&address, 1, Bytes::from_static(b"here"), TIMEOUT).await.unwrap();
    assert_eq!(&reply[..], b"in place: here");
    let error = transport.call(&address, 2, Bytes::new(), TIMEOUT).await.unwrap_err();
    assert!(matches!(error, CallError::Remote { error: RemoteError { code: ErrorCode::Internal, .. }, .. }));
    let error = transport.call(&address, 3, Bytes::new(), Duration::from_millis(100)).await.unwrap_err();
    assert!(matches!(error, CallError::Timeout { .. }), "{error:?}");
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);
    // Removed: calls go over TCP again. (The server keeps running: once
    // stopped, its port may be handed to another test's server at once.)
    local.remove(&address);
    assert!(!transport.serves_in_place(&address));
    let reply = transport.call(&address, 1, Bytes::from_static(b"there"), TIMEOUT).await.unwrap();
    assert_eq!(&reply[..], b"there");
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);
    server.stop();
}

/// Sends `bytes` on a fresh connection and expects the server to close it.
async fn expect_closed_after(address: &str, bytes: &[u8], close_write: bool) {
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    if close_write {
        stream.shutdown().await.unwrap();
    }
    let mut sink = Vec::new();
    let read = tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut sink)).await;
    assert!(read.is_ok(), "server kept a connection open after bad input {:?}", &bytes[..bytes.len().min(8)]);
}

fn encode(frame: &Frame) -> BytesMut {
    let mut buffer = BytesMut::new();
    frame.encode(&mut buffer);
    buffer
}

fn reseal_header(buffer: &mut BytesMut) {
    let crc = crc32c::crc32c(&buffer[..28]);
    buffer[28..32].copy_from_slice(&crc.to_le_bytes());
}

#[tokio::test]
async fn bad_input_closes_only_that_connection() {
    let server = echo_server().await;
    let address = server.local_address.clone();
    let transport = TcpTransport::new();
    // A healthy client keeps calling throughout.
    let healthy = {
        let transport = transport.clone();
        let address = address.clone();
        tokio::spawn(async move {
            for index in 0..400u32 {
                let payload = Bytes::from(index.to_le_bytes().to_vec());
                let reply = transport.call(&address, 1, payload.clone(), TIMEOUT).await.unwrap();
                assert_eq!(reply, payload);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let good = Frame { kind: Kind::Request, method: 1, correlation: 1, payload: Bytes::from_static(b"abc") };

    // Garbage.
    expect_closed_after(&address, b"\x00\x01garbage garbage garbage garbage garbage", false).await;
    // Truncated: a valid header whose payload never comes.
    let whole = encode(&good);
    expect_closed_after(&address, &whole[..whole.len() - 2], true).await;
    // Oversize.
    let mut oversize = encode(&good);
    oversize[12..16].copy_from_slice(&((PAYLOAD_SIZE_MAX as u32) + 1).to_le_bytes());
    reseal_header(&mut oversize);
    expect_closed_after(&address, &oversize, false).await;
    // Wrong version.
    let mut wrong_version = encode(&good);
    wrong_version[4] = 2;
    reseal_header(&mut wrong_version);
    expect_closed_after(&address, &wrong_version, false).await;
    // Corrupted payload.
    let mut corrupted = encode(&good);
    let last = corrupted.len() - 1;
    corrupted[last] ^= 0xff;
    expect_closed_after(&address, &corrupted, false).await;

    healthy.await.unwrap();
    let bad = server.stats.bad_frames.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(bad, 5, "every bad connection is counted");
    server.stop();
}

/// A loopback address whose connects hang: a listener with a backlog of
/// one that never accepts, its accept queue filled, drops further SYNs.
/// Checked before use, so the test cannot pass without a hanging peer.
async fn address_whose_connects_hang() -> (tokio::net::TcpListener, Vec<TcpStream>, String) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let mut filling = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(&address)).await {
            Ok(Ok(stream)) => filling.push(stream),
            Ok(Err(error)) => panic!("connecting to fill the accept queue: {error}"),
            Err(_) => break,
        }
        assert!(filling.len() < 64, "connects to a listener that never accepts do not hang here");
    }
    (listener, filling, address)
}

#[tokio::test]
async fn a_peer_whose_connect_hangs_holds_up_only_calls_to_itself() {
    let server = echo_server().await;
    let (_listener, _filling, hanging) = address_whose_connects_hang().await;
    let transport = TcpTransport::new();
    let stuck = {
        let (transport, hanging) = (transport.clone(), hanging.clone());
        tokio::spawn(async move { transport.call(&hanging, 1, Bytes::new(), Duration::from_secs(20)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A healthy peer answers while the other connect is still waiting.
    let reply = transport.call(&server.local_address, 1, Bytes::from_static(b"ok"), TIMEOUT).await.unwrap();
    assert_eq!(&reply[..], b"ok");
    assert!(!stuck.is_finished(), "the hanging connect ended before the healthy call was answered");
    // A second call to the hanging peer gives up at its own deadline, not
    // the first call's.
    let error = transport.call(&hanging, 1, Bytes::new(), Duration::from_millis(300)).await.unwrap_err();
    assert!(matches!(error, CallError::Connect { .. }), "{error:?}");
    assert!(!stuck.is_finished(), "the second call waited for the first call's connect to end");
    stuck.abort();
    server.stop();
}

/// A host's outgoing calls leave from the address it serves on, so cutting
/// that address off the network cuts both ways (the partition scenarios
/// rely on it; unbound, they would leave from 127.0.0.1).
#[tokio::test]
async fn a_bound_transport_calls_from_its_own_address() {
    let handler = |request: Request| async move { Ok(Bytes::from(request.peer)) };
    let server = TcpTransport::new().serve("127.0.0.1:0", Arc::new(handler)).await.unwrap();
    let peer_ip = |reply: Bytes| String::from_utf8(reply.to_vec()).unwrap().rsplit_once(':').unwrap().0.to_string();

    let unbound = TcpTransport::new().call(&server.local_address, 1, Bytes::new(), TIMEOUT).await.unwrap();
    assert_eq!(peer_ip(unbound), "127.0.0.1");
    let bound = TcpTransport::new().bound_to("127.0.0.77".parse().ok());
    let reply = bound.call(&server.local_address, 1, Bytes::new(), TIMEOUT).await.unwrap();
    assert_eq!(peer_ip(reply), "127.0.0.77");
    // Unspecified means the kernel's choice, as unbound.
    let any = TcpTransport::new().bound_to("0.0.0.0".parse().ok());
    assert_eq!(peer_ip(any.call(&server.local_address, 1, Bytes::new(), TIMEOUT).await.unwrap()), "127.0.0.1");
    server.stop();
}
