//! A cluster of in-process log replicas on loopback, for tests.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sharedlog::client::{ClientConfig, LogClient};
use sharedlog::raft::NodeId;
use sharedlog::server::{handler, LogServer, ServerConfig};
use wire::tcp::TcpTransport;
use wire::{ServeHandle, Transport};

pub struct Replica {
    pub server: Arc<LogServer>,
    serve: ServeHandle,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub addresses: BTreeMap<NodeId, String>,
    pub replicas: BTreeMap<NodeId, Replica>,
    pub transport: TcpTransport,
}

fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

impl Cluster {
    pub async fn start(size: u64) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let addresses: BTreeMap<NodeId, String> = (1..=size).map(|id| (id, free_address())).collect();
        let mut cluster = Cluster { dir, addresses, replicas: BTreeMap::new(), transport: TcpTransport::new() };
        for id in 1..=size {
            cluster.start_replica(id).await;
        }
        let first = cluster.replicas.values().next().unwrap();
        first.server.initialize(&cluster.addresses).await.unwrap();
        cluster.wait_for_leader().await;
        cluster
    }

    pub fn config(&self, id: NodeId) -> ServerConfig {
        let mut config = ServerConfig::new(id, self.addresses[&id].clone(), self.dir.path().join(format!("node{id}")));
        config.election_timeout_min_ms = 300;
        config.election_timeout_max_ms = 600;
        config.logs_kept_after_checkpoint = 0;
        config
    }

    pub async fn start_replica(&mut self, id: NodeId) {
        let config = self.config(id);
        let server = LogServer::start(config, fsio::real(), self.transport.clone()).await.unwrap();
        let serve = self.transport.serve(&self.addresses[&id], handler(server.clone())).await.unwrap();
        self.replicas.insert(id, Replica { server, serve });
    }

    pub async fn stop_replica(&mut self, id: NodeId) {
        let replica = self.replicas.remove(&id).unwrap();
        replica.serve.stop();
        replica.server.shutdown().await;
    }

    pub async fn wait_for_leader(&self) -> NodeId {
        for _ in 0..200 {
            for replica in self.replicas.values() {
                let status = replica.server.status();
                if status.role == "Leader" {
                    return status.node_id;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no leader elected within 10 s");
    }

    pub fn client(&self, client_id: u64) -> LogClient<TcpTransport> {
        LogClient::new(self.transport.clone(), ClientConfig::new(self.addresses.values().cloned().collect(), client_id))
    }

    pub async fn shutdown(mut self) {
        let ids: Vec<NodeId> = self.replicas.keys().copied().collect();
        for id in ids {
            self.stop_replica(id).await;
        }
    }
}
