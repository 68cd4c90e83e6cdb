use std::time::Duration;

use sharedlog::client::{ClientConfig, LogClient};
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

/// A replica's leader hint names the leader it knows, and the new one once
/// the leader stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicas_leader_hint_follows_the_leader() {
    let mut cluster = Cluster::start(3).await;
    let leader = cluster.wait_for_leader().await;
    let follower = *cluster.replicas.keys().find(|id| **id != leader).unwrap();
    let mut hint = cluster.replicas[&follower].server.leader_hint();
    let old = cluster.addresses[&leader].clone();
    let named = tokio::time::timeout(Duration::from_secs(10), hint.wait_for(|known| known.as_ref() == Some(&old)))
        .await
        .expect("the follower's hint names the leader")
        .unwrap()
        .clone();
    assert_eq!(named, Some(old.clone()));
    cluster.stop_replica(leader).await;
    let new_leader = cluster.wait_for_leader().await;
    let new = cluster.addresses[&new_leader].clone();
    // A follower may know no leader for a moment between the two.
    tokio::time::timeout(Duration::from_secs(10), hint.wait_for(|known| known.as_ref() == Some(&new)))
        .await
        .expect("the follower's hint names the new leader")
        .unwrap();
    // Its replica stopped, the hint names no leader rather than the last
    // one it knew.
    cluster.stop_replica(follower).await;
    tokio::time::timeout(Duration::from_secs(10), hint.wait_for(Option::is_none))
        .await
        .expect("a stopped replica's hint names no leader")
        .unwrap();
    cluster.shutdown().await;
}

/// A client on a log host follows its replica's view of the leader
/// (`ClientConfig::leader_hint`): an append sent to a former leader that
/// takes the connection but never answers (cut off from the network) goes
/// to the leader the hint names as soon as it names one, rather than wait
/// out the call timeout (here 120 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_waiting_on_a_silent_former_leader_goes_to_the_leader_the_hint_names() {
    let cluster = Cluster::start(3).await;
    // Accepts connections and reads what comes, never answering.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_address = silent.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = silent.accept().await {
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut socket, &mut tokio::io::sink()).await;
            });
        }
    });
    let (hint, hinted) = tokio::sync::watch::channel(None);
    // The silent address is the only one the client knows: without the
    // hint it has nowhere else to go.
    let mut config = ClientConfig::new(vec![silent_address], 7);
    config.call_timeout = Duration::from_secs(120);
    config.operation_deadline = Duration::from_secs(240);
    config.leader_hint = Some(hinted);
    let client = LogClient::new(cluster.transport.clone(), config);
    let append = {
        let client = client.clone();
        tokio::spawn(async move { client.append(&[STREAM], b"hinted".to_vec()).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!append.is_finished(), "the append was answered before the hint named a leader: {append:?}");
    let leader = cluster.wait_for_leader().await;
    hint.send(Some(cluster.addresses[&leader].clone())).unwrap();
    let position = tokio::time::timeout(Duration::from_secs(30), append)
        .await
        .expect("the append still waits on the silent address 30 s after the hint named the leader")
        .unwrap()
        .unwrap();
    let tail = client.tail().await.unwrap();
    let entries = client.read_stream_all(STREAM, 0, tail, None).await.unwrap();
    assert!(entries.iter().any(|entry| entry.position == position && &entry.payload[..] == b"hinted"));
    cluster.shutdown().await;
}
