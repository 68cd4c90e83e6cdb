use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use wire::sim::{Faults, SimNetwork};
use wire::{CallError, Request, Transport};

async fn echo(network: &SimNetwork, address: &str) -> wire::ServeHandle {
    let handler = |request: Request| async move { Ok(request.payload) };
    network.transport(address).serve(address, Arc::new(handler)).await.unwrap()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().unwrap()
}

#[test]
fn partitions_are_silence_and_heal() {
    runtime().block_on(async {
        let network = SimNetwork::new(7, Faults::default());
        let _server = echo(&network, "b").await;
        let client = network.transport("a");
        let timeout = Duration::from_millis(500);
        assert!(client.call("b", 1, Bytes::from_static(b"x"), timeout).await.is_ok());
        network.partition("a", "b");
        let error = client.call("b", 1, Bytes::new(), timeout).await.unwrap_err();
        assert!(matches!(error, CallError::Timeout { .. }));
        network.heal_all();
        assert!(client.call("b", 1, Bytes::new(), timeout).await.is_ok());
        network.take_down("b");
        let error = client.call("b", 1, Bytes::new(), timeout).await.unwrap_err();
        assert!(matches!(error, CallError::Connect { .. }));
    });
}

fn lossy_run(seed: u64) -> Vec<bool> {
    runtime().block_on(async {
        let faults = Faults { loss_probability: 0.3, ..Faults::default() };
        let network = SimNetwork::new(seed, faults);
        let _server = echo(&network, "b").await;
        let client = network.transport("a");
        let mut outcomes = Vec::new();
        for _ in 0..200 {
            outcomes.push(client.call("b", 1, Bytes::new(), Duration::from_millis(50)).await.is_ok());
        }
        outcomes
    })
}

#[test]
fn loss_replays_from_the_seed() {
    let first = lossy_run(11);
    assert_eq!(first, lossy_run(11), "the same seed gives the same losses");
    let delivered = first.iter().filter(|ok| **ok).count();
    // Two messages per call, each lost with p = 0.3: about 49% get through.
    assert!((60..140).contains(&delivered), "delivered {delivered} of 200");
    assert_ne!(first, lossy_run(12), "another seed gives other losses");
}
