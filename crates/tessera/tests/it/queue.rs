//! The cluster task queue (the persistent queue) through three node
//! processes: concurrent enqueues, one order everywhere, removal in the
//! middle, and a restart of every node.

use std::time::Duration;

use crate::harness::{exclusive, TestCluster};

fn tasks(cluster: &TestCluster, id: u64) -> Vec<(String, u64)> {
    let value = cluster.get(id, "/api/v1/tasks").unwrap();
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|task| (task["id"].as_str().unwrap().to_string(), task["position"].as_u64().unwrap()))
        .collect()
}

fn post_task(admin: &str, kind: &str) -> String {
    let reply: serde_json::Value = ureq::post(&format!("http://{admin}/api/v1/tasks"))
        .timeout(Duration::from_secs(30))
        .send_json(serde_json::json!({ "kind": kind, "detail": "scenario" }))
        .unwrap()
        .into_json()
        .unwrap();
    reply["id"].as_str().unwrap().to_string()
}

#[test]
fn task_queue_order_is_identical_on_every_host_and_survives_restart() {
    let _exclusive = exclusive();
    let mut cluster = TestCluster::start(3);
    cluster.wait_healthy(Duration::from_secs(60));
    let writers: Vec<_> = (1..=3u64)
        .map(|id| {
            let admin = cluster.admin(id);
            std::thread::spawn(move || {
                (0..20).map(|index| post_task(&admin, &format!("host{id}-job{index}"))).collect::<Vec<_>>()
            })
        })
        .collect();
    let mut enqueued: Vec<String> = writers.into_iter().flat_map(|writer| writer.join().unwrap()).collect();
    enqueued.sort();
    let orders: Vec<Vec<(String, u64)>> = (1..=3).map(|id| tasks(&cluster, id)).collect();
    assert_eq!(orders[0].len(), 60);
    assert_eq!(orders[0], orders[1], "host 1 and host 2 disagree on the order");
    assert_eq!(orders[1], orders[2], "host 2 and host 3 disagree on the order");
    let mut listed: Vec<String> = orders[0].iter().map(|(id, _)| id.clone()).collect();
    listed.sort();
    assert_eq!(listed, enqueued);
    assert!(orders[0].windows(2).all(|pair| pair[0].1 < pair[1].1), "ordered by log position");

    // Remove one in the middle, through a third host.
    let middle = orders[0][30].0.clone();
    let removed: serde_json::Value = ureq::delete(&format!("http://{}/api/v1/tasks/{middle}", cluster.admin(2)))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(removed["removed"], true);
    let expected: Vec<(String, u64)> = orders[0].iter().filter(|(id, _)| *id != middle).cloned().collect();
    assert_eq!(tasks(&cluster, 3), expected);

    // Restart every node: two cleanly, one with SIGKILL.
    cluster.stop(1);
    cluster.stop(2);
    cluster.kill(3);
    for id in 1..=3 {
        cluster.start_host(id);
    }
    cluster.wait_healthy(Duration::from_secs(60));
    for id in 1..=3 {
        assert_eq!(tasks(&cluster, id), expected, "host {id} after the restart");
    }
}
