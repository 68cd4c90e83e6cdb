use std::sync::Arc;
use std::time::Duration;

use sharedlog::objects::{Conflict, Map, Register};
use sharedlog::queue::{PersistentQueue, SystemClock};
use sharedlog::smr::{Runtime, RuntimeConfig};
use sharedlog::types::StreamId;
use wire::tcp::TcpTransport;

use crate::cluster::Cluster;

fn runtime(cluster: &Cluster, client_id: u64, name: &str) -> Runtime<TcpTransport> {
    let mut config = RuntimeConfig::new(name);
    config.gc_interval = Duration::from_millis(100);
    Runtime::new(cluster.client(client_id), config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maps_agree_across_runtimes_and_compare_and_set_has_one_winner() {
    let cluster = Cluster::start(3).await;
    let stream = StreamId::from_name("map");
    let a = runtime(&cluster, 10, "a").open::<Map<String, u64>>(stream).await.unwrap();
    let b = runtime(&cluster, 11, "b").open::<Map<String, u64>>(stream).await.unwrap();
    let version = a.put("k".into(), 1).await.unwrap();
    assert_eq!(b.get(&"k".into()).await.unwrap(), Some((1, version)), "b sees a's write after syncing");
    // Both race to move the key from `version`; exactly one wins.
    let (first, second) = tokio::join!(
        a.compare_and_set("k".into(), Some(version), Some(2)),
        b.compare_and_set("k".into(), Some(version), Some(3)),
    );
    let outcomes = [first.unwrap(), second.unwrap()];
    let winners: Vec<_> = outcomes.iter().filter(|outcome| outcome.is_ok()).collect();
    assert_eq!(winners.len(), 1, "{outcomes:?}");
    let winning_version = *winners[0].as_ref().unwrap();
    let loser = outcomes.iter().find(|outcome| outcome.is_err()).unwrap();
    assert_eq!(*loser, Err(Conflict { current: Some(winning_version) }));
    assert_eq!(a.entries().await.unwrap(), b.entries().await.unwrap());
    assert!(a.delete("k".into()).await.unwrap());
    assert_eq!(b.get(&"k".into()).await.unwrap(), None);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_runtime_starts_from_a_checkpoint() {
    let cluster = Cluster::start(3).await;
    let stream = StreamId::from_name("register");
    let writer = runtime(&cluster, 20, "writer").open::<Register<u64>>(stream).await.unwrap();
    for value in 0..50 {
        writer.set(value).await.unwrap();
    }
    let checkpoint = writer.checkpoint().await.unwrap().expect("small state checkpoints");
    writer.set(50).await.unwrap();
    let reader = runtime(&cluster, 21, "reader").open::<Register<u64>>(stream).await.unwrap();
    assert_eq!(reader.get().await.unwrap().map(|(value, _)| value), Some(50));
    // The reader loaded the checkpoint and replayed only what came after it.
    assert!(reader.live_entries() <= 2, "live entries {}", reader.live_entries());
    assert!(checkpoint > 49);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_order_is_identical_everywhere_and_removal_works_anywhere() {
    let cluster = Cluster::start(3).await;
    let stream = StreamId::from_name("tasks");
    let mut queues = Vec::new();
    for host in 0..3u32 {
        let runtime = runtime(&cluster, 30 + host as u64, &format!("host{host}"));
        queues.push(Arc::new(
            PersistentQueue::<String, _>::open(&runtime, stream, host, Arc::new(SystemClock)).await.unwrap(),
        ));
    }
    let mut writers = Vec::new();
    for (host, queue) in queues.iter().enumerate() {
        let queue = queue.clone();
        writers.push(tokio::spawn(async move {
            for index in 0..30 {
                queue.enqueue(format!("host{host}-item{index}")).await.unwrap();
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let orders =
        [queues[0].entries().await.unwrap(), queues[1].entries().await.unwrap(), queues[2].entries().await.unwrap()];
    assert_eq!(orders[0].len(), 90);
    assert_eq!(orders[0], orders[1]);
    assert_eq!(orders[1], orders[2]);
    let middle = orders[0][45].0;
    assert!(queues[2].remove(middle).await.unwrap());
    assert!(!queues[1].remove(middle).await.unwrap(), "removing twice finds nothing");
    let after = queues[0].entries().await.unwrap();
    assert_eq!(after.len(), 89);
    assert!(!after.iter().any(|(id, _)| *id == middle));
    assert_eq!(after, queues[1].entries().await.unwrap());
    cluster.shutdown().await;
}
