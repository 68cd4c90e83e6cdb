//! Bad frames sent to a real node close only their own connection, are
//! logged and counted, while the node keeps serving a client doing appends.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::Bytes;
use sharedlog::types::StreamId;
use wire::frame::{Frame, Kind, PAYLOAD_SIZE_MAX};

use crate::harness::{exclusive, TestCluster};

fn send_and_expect_close(address: &str, bytes: &[u8], half_close: bool) {
    let mut stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(bytes).unwrap();
    if half_close {
        stream.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let mut sink = Vec::new();
    // read_to_end returns once the node closes the connection.
    stream.read_to_end(&mut sink).expect("the node closes a connection that sent a bad frame");
}

fn reseal(bytes: &mut [u8]) {
    let crc = crc32c(&bytes[..28]);
    bytes[28..32].copy_from_slice(&crc.to_le_bytes());
}

fn crc32c(bytes: &[u8]) -> u32 {
    // Bitwise CRC32C (Castagnoli), enough for a test.
    let mut crc = !0u32;
    for byte in bytes {
        crc ^= *byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}

#[test]
fn bad_frames_close_only_their_connection() {
    let _exclusive = exclusive();
    let cluster = TestCluster::start(1);
    cluster.wait_healthy(Duration::from_secs(60));
    let address = cluster.hosts[&1].seed.address.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let _context = runtime.enter();
    let client = cluster.log_client(0xBAD);
    let appender = runtime.spawn(async move {
        for index in 0..300u32 {
            client.append(&[StreamId::from_name("bad-input")], index.to_le_bytes().to_vec()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let good =
        Frame { kind: Kind::Request, method: 0x0200, correlation: 1, payload: Bytes::from_static(b"") }.to_bytes();
    send_and_expect_close(&address, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", false);
    send_and_expect_close(&address, &good[..good.len() - 1], true);
    send_and_expect_close(&address, &[0x54, 0x53, 0x52, 0x57, 1, 1, 0, 0], true);
    let mut oversize = good.to_vec();
    oversize[12..16].copy_from_slice(&((PAYLOAD_SIZE_MAX as u32) + 1).to_le_bytes());
    reseal(&mut oversize);
    send_and_expect_close(&address, &oversize, false);
    let mut wrong_version = good.to_vec();
    wrong_version[4] = 7;
    reseal(&mut wrong_version);
    send_and_expect_close(&address, &wrong_version, false);
    runtime.block_on(appender).unwrap();

    let log = cluster.log_text(1);
    for expected in ["bad magic", "closed in the middle of a frame", "exceeds the limit", "unsupported wire version"] {
        assert!(log.contains(expected), "node log does not mention {expected:?}");
    }
    let bad_frames = cluster.metric(1, "wire_bad_frames").expect("wire_bad_frames in /metrics");
    assert!(bad_frames >= 5.0, "bad frames counted: {bad_frames}");
    // Still healthy and serving.
    assert!(cluster.wait_healthy(Duration::from_secs(10)).healthy);
}
