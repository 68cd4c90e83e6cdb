//! Kill -9 the log leader in the middle of 10,000 appends from 4 clients;
//! every acknowledged append must then be readable, at the position it was
//! acknowledged with, on every replica.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sharedlog::types::{ReadOutcome, StreamId};

use crate::harness::{exclusive, TestCluster};

const CLIENTS: u64 = 4;
const APPENDS_PER_CLIENT: u64 = 2_500;
const STREAM: StreamId = StreamId::from_name("scenario/leader-kill");

fn payload(client: u64, index: u64) -> Vec<u8> {
    format!("client {client} append {index}").into_bytes()
}

#[test]
fn killing_the_leader_loses_no_acknowledged_append() {
    let _exclusive = exclusive();
    let mut cluster = TestCluster::start(3);
    let old_leader = cluster.leader();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let acknowledged = Arc::new(AtomicU64::new(0));
    let (acked, killed_at) = runtime.block_on(async {
        let mut clients = Vec::new();
        for client in 0..CLIENTS {
            let log = cluster.log_client(0xC0DE_0000 + client);
            let acknowledged = acknowledged.clone();
            clients.push(tokio::spawn(async move {
                let mut acked = Vec::new();
                // Each client keeps 16 appends in flight.
                let mut in_flight = tokio::task::JoinSet::new();
                for index in 0..APPENDS_PER_CLIENT {
                    if in_flight.len() >= 16 {
                        let (index, result) = in_flight.join_next().await.unwrap().unwrap();
                        match result {
                            Ok(position) => {
                                acked.push((position, payload(client, index)));
                                acknowledged.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(error) => println!("client {client} append {index} failed: {error}"),
                        }
                    }
                    let log = log.clone();
                    in_flight.spawn(async move { (index, log.append(&[STREAM], payload(client, index)).await) });
                }
                while let Some(joined) = in_flight.join_next().await {
                    let (index, result) = joined.unwrap();
                    match result {
                        Ok(position) => {
                            acked.push((position, payload(client, index)));
                            acknowledged.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(error) => println!("client {client} append {index} failed: {error}"),
                    }
                }
                acked
            }));
        }
        // Kill the leader once about a third of the appends are acknowledged.
        while acknowledged.load(Ordering::Relaxed) < CLIENTS * APPENDS_PER_CLIENT / 3 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let killed_at = acknowledged.load(Ordering::Relaxed);
        cluster.kill(old_leader);
        let mut acked = Vec::new();
        for client in clients {
            acked.extend(client.await.unwrap());
        }
        (acked, killed_at)
    });
    println!(
        "killed leader {old_leader} after {killed_at} acknowledgements; {} of {} appends acknowledged",
        acked.len(),
        CLIENTS * APPENDS_PER_CLIENT
    );
    assert_eq!(
        acked.len() as u64,
        CLIENTS * APPENDS_PER_CLIENT,
        "appends retry through the failover until acknowledged"
    );
    let positions: HashSet<u64> = acked.iter().map(|(position, _)| *position).collect();
    assert_eq!(positions.len(), acked.len(), "two acknowledged appends share a position");

    // Bring the old leader back and let every replica catch up.
    cluster.start_host(old_leader);
    let status = cluster.wait_healthy(Duration::from_secs(60));
    assert_ne!(status.log.leader, Some(old_leader), "leadership moved");
    let expected: BTreeMap<u64, Vec<u8>> = acked.into_iter().collect();
    let max_position = *expected.keys().last().unwrap();
    runtime.block_on(async {
        let reader = cluster.log_client(0xC0DE_FFFF);
        for address in cluster.replica_addresses() {
            for (position, payload) in &expected {
                let mut attempts = 0;
                let outcome = loop {
                    match reader.read_at_replica(&address, *position).await {
                        Ok(ReadOutcome::NotWritten) | Err(_) if attempts < 200 => {
                            attempts += 1;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        other => break other,
                    }
                };
                match outcome {
                    Ok(ReadOutcome::Entry(entry)) => {
                        assert_eq!(&entry.payload[..], &payload[..], "position {position} on {address}")
                    }
                    other => panic!("position {position} on {address}: {other:?}"),
                }
            }
        }
        // No append landed twice (the retries after the failover were
        // deduplicated): the stream holds each payload once.
        let tail = reader.tail().await.unwrap();
        assert!(tail > max_position);
        let entries = reader.read_stream_all(STREAM, 0, tail, None).await.unwrap();
        let payloads: HashSet<Vec<u8>> = entries.iter().map(|entry| entry.payload.to_vec()).collect();
        assert_eq!(payloads.len(), entries.len(), "a payload appears twice in the stream");
        assert_eq!(entries.len(), expected.len());
    });
}
