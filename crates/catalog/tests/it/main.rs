//! Catalog on a real (single-replica, in-process) shared log over TCP.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use catalog::{Catalog, DiskRecord, HostRecord, HostState, Roles, SiteRecord};
use sharedlog::client::{ClientConfig, LogClient};
use sharedlog::server::{handler, LogServer, ServerConfig};
use sharedlog::smr::{Runtime, RuntimeConfig};
use wire::tcp::TcpTransport;
use wire::Transport;

struct Log {
    _dir: tempfile::TempDir,
    _server: Arc<LogServer>,
    _serve: wire::ServeHandle,
    address: String,
}

async fn log() -> Log {
    let dir = tempfile::tempdir().unwrap();
    let address = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let transport = TcpTransport::new();
    let mut config = ServerConfig::new(1, address.clone(), dir.path());
    config.election_timeout_min_ms = 200;
    config.election_timeout_max_ms = 400;
    let server = LogServer::start(config, fsio::real(), transport.clone()).await.unwrap();
    let serve = transport.serve(&address, handler(server.clone())).await.unwrap();
    server.initialize(&BTreeMap::from([(1, address.clone())])).await.unwrap();
    Log { _dir: dir, _server: server, _serve: serve, address }
}

async fn catalog(log: &Log, client: u64) -> Catalog<TcpTransport> {
    let client = LogClient::new(TcpTransport::new(), ClientConfig::new(vec![log.address.clone()], client));
    let runtime = Runtime::new(client.clone(), RuntimeConfig::new(format!("catalog-test-{}", client.client_id())));
    Catalog::open(&runtime).await.unwrap()
}

fn host(id: u64, incarnation: u64) -> HostRecord {
    HostRecord {
        id,
        name: format!("host-{id}"),
        address: format!("127.0.0.{id}:7400"),
        admin_address: format!("127.0.0.{id}:7480"),
        roles: Roles { storage: true, ..Roles::default() },
        site: None,
        fault_domain: None,
        state: HostState::Up,
        epoch: 0,
        incarnation,
        component_addresses: Vec::new(),
        iscsi_address: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_bumps_the_epoch_only_when_something_changes() {
    let log = log().await;
    let catalog = catalog(&log, 1).await;
    let (first, _) = catalog.register_host(host(1, 100)).await.unwrap();
    assert_eq!(first.epoch, 1);
    let (again, _) = catalog.register_host(host(1, 100)).await.unwrap();
    assert_eq!(again.epoch, 1, "re-registering the same process changes nothing");
    let (restarted, _) = catalog.register_host(host(1, 200)).await.unwrap();
    assert_eq!(restarted.epoch, 2, "a restart is a new incarnation");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_changes_are_fenced_by_epoch() {
    let log = log().await;
    let catalog = catalog(&log, 2).await;
    let (record, _) = catalog.register_host(host(3, 1)).await.unwrap();
    let stale = record.epoch;
    let epoch = catalog.set_host_state(3, HostState::Down, stale).await.unwrap().expect("current epoch wins");
    assert_eq!(epoch, stale + 1);
    assert!(
        catalog.set_host_state(3, HostState::Up, stale).await.unwrap().is_err(),
        "a decision on a stale epoch is refused"
    );
    let hosts = catalog.hosts().await.unwrap();
    assert_eq!(hosts[0].0.state, HostState::Down);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_updates_from_two_hosts_both_land_and_watchers_see_them() {
    let log = log().await;
    let first = catalog(&log, 3).await;
    let second = catalog(&log, 4).await;
    first.register_host(host(5, 1)).await.unwrap();
    let mut watch = second.watch_hosts();
    watch.borrow_and_update();
    let site = first.update_host(5, |current| {
        let mut record = current.cloned()?;
        record.site = Some("east".into());
        Some(record)
    });
    let domain = second.update_host(5, |current| {
        let mut record = current.cloned()?;
        record.fault_domain = Some("rack-7".into());
        Some(record)
    });
    let (site, domain) = tokio::join!(site, domain);
    site.unwrap();
    domain.unwrap();
    let record = second.hosts.get(&5).await.unwrap().unwrap().0;
    assert_eq!(record.site.as_deref(), Some("east"), "neither compare-and-set loop lost the other's change");
    assert_eq!(record.fault_domain.as_deref(), Some("rack-7"));
    assert_eq!(record.epoch, 3);
    tokio::time::timeout(Duration::from_secs(5), watch.changed()).await.expect("the watcher was notified").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disks_and_sites_are_replicated() {
    let log = log().await;
    let writer = catalog(&log, 6).await;
    writer.put_site(SiteRecord { name: "east".into(), description: "room 1".into() }).await.unwrap();
    writer
        .put_disk(DiskRecord {
            id: "1/disk0".into(),
            host: 1,
            path: "/var/lib/tessera/disk0".into(),
            capacity_bytes: 1 << 40,
            failed: false,
        })
        .await
        .unwrap();
    let reader = catalog(&log, 7).await;
    assert_eq!(reader.sites.get(&"east".to_string()).await.unwrap().unwrap().0.description, "room 1");
    assert_eq!(reader.disks.get(&"1/disk0".to_string()).await.unwrap().unwrap().0.capacity_bytes, 1 << 40);
}
