use std::time::Duration;

use sharedlog::types::{ReadOutcome, StreamId};

use crate::cluster::Cluster;

const STREAM: StreamId = StreamId::from_name("test");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_are_readable_on_every_replica() {
    let cluster = Cluster::start(3).await;
    let client = cluster.client(1);
    let mut positions = Vec::new();
    for index in 0..100u32 {
        positions.push(client.append(&[STREAM], index.to_le_bytes().to_vec()).await.unwrap());
    }
    let mut sorted = positions.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 100, "every append got its own position");
    let tail = client.tail().await.unwrap();
    assert!(tail >= 100);
    for address in cluster.addresses.values() {
        for (index, position) in positions.iter().enumerate() {
            let outcome = loop {
                match client.read_at_replica(address, *position).await.unwrap() {
                    ReadOutcome::NotWritten => tokio::time::sleep(Duration::from_millis(10)).await,
                    outcome => break outcome,
                }
            };
            let ReadOutcome::Entry(entry) = outcome else { panic!("{outcome:?}") };
            assert_eq!(&entry.payload[..], &(index as u32).to_le_bytes());
        }
    }
    let entries = client.read_stream_all(STREAM, 0, tail, None).await.unwrap();
    assert_eq!(entries.len(), 100);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_continue_after_the_leader_stops() {
    let mut cluster = Cluster::start(3).await;
    let client = cluster.client(2);
    for index in 0..20u32 {
        client.append(&[STREAM], index.to_le_bytes().to_vec()).await.unwrap();
    }
    let leader = cluster.wait_for_leader().await;
    cluster.stop_replica(leader).await;
    for index in 20..40u32 {
        client.append(&[STREAM], index.to_le_bytes().to_vec()).await.unwrap();
    }
    let tail = client.tail().await.unwrap();
    let entries = client.read_stream_all(STREAM, 0, tail, None).await.unwrap();
    let values: Vec<u32> =
        entries.iter().map(|entry| u32::from_le_bytes(entry.payload[..4].try_into().unwrap())).collect();
    assert_eq!(values, (0..40).collect::<Vec<_>>());
    // The stopped replica catches up when it returns.
    cluster.start_replica(leader).await;
    let server = cluster.replicas[&leader].server.clone();
    for _ in 0..100 {
        if server.tail_local() >= tail {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(server.tail_local() >= tail, "restarted replica caught up");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_replica_catches_up_through_a_snapshot() {
    let mut cluster = Cluster::start(3).await;
    let client = cluster.client(3);
    let leader = cluster.wait_for_leader().await;
    let lagging = *cluster.addresses.keys().find(|id| **id != leader).unwrap();
    cluster.stop_replica(lagging).await;
    for index in 0..300u32 {
        client.append(&[STREAM], index.to_le_bytes().repeat(8)).await.unwrap();
    }
    // Checkpoint and purge the Raft log on the others, so the lagging
    // replica cannot be caught up from log entries alone.
    for (id, address) in &cluster.addresses {
        if *id != lagging {
            client.checkpoint_now(address).await.unwrap();
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.start_replica(lagging).await;
    let tail = client.tail().await.unwrap();
    let server = cluster.replicas[&lagging].server.clone();
    for _ in 0..200 {
        if server.tail_local() >= tail {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(server.tail_local() >= tail, "lagging replica at {} of {tail}", server.tail_local());
    assert!(server.status().checkpoint_index.is_some(), "caught up by installing the leader's checkpoint");
    let address = cluster.addresses[&lagging].clone();
    for position in [0u64, 150, 299] {
        let outcome = client.read_at_replica(&address, position).await.unwrap();
        assert!(matches!(outcome, ReadOutcome::Entry(_)), "{outcome:?}");
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_sees_every_entry_of_its_stream_in_order() {
    let cluster = Cluster::start(3).await;
    let client = cluster.client(4);
    let other = StreamId::from_name("other");
    let mut subscription = client.subscribe(STREAM, 0);
    let writer = {
        let client = cluster.client(5);
        tokio::spawn(async move {
            for index in 0..50u32 {
                client.append(&[STREAM], index.to_le_bytes().to_vec()).await.unwrap();
                client.append(&[other], b"noise".to_vec()).await.unwrap();
            }
        })
    };
    let mut last_position = None;
    for index in 0..50u32 {
        let entry =
            tokio::time::timeout(Duration::from_secs(10), subscription.next()).await.expect("entry arrives").unwrap();
        assert_eq!(&entry.payload[..], &index.to_le_bytes(), "in append order, nothing skipped");
        assert!(last_position.is_none_or(|last| entry.position > last));
        last_position = Some(entry.position);
    }
    writer.await.unwrap();
    cluster.shutdown().await;
}
