//! The component service over real TCP on loopback: I/O, epoch fencing,
//! checksum errors reported to the caller.

use std::sync::Arc;

use blockstore::{Disk, DiskConfig, BLOCK_SIZE};
use objects::component::{Client, ClientError, ComponentError, Request, Service};
use wire::tcp::TcpTransport;
use wire::Transport;

async fn start(dir: &std::path::Path) -> (Arc<Service>, Client<TcpTransport>, wire::ServeHandle) {
    let disk = Disk::open(fsio::real(), &dir.join("disk0"), DiskConfig::default()).unwrap();
    let service = Service::new(vec![disk]);
    let transport = TcpTransport::new();
    let handler = service.clone();
    let handle =
        transport.serve("127.0.0.1:0", Arc::new(move |request| handler.clone().handle(request))).await.unwrap();
    let client = Client::new(transport, handle.local_address.clone());
    (service, client, handle)
}

#[tokio::test]
async fn writes_and_reads_go_through_and_an_old_owner_is_fenced_off() {
    let dir = tempfile::tempdir().unwrap();
    let (_service, client, handle) = start(dir.path()).await;
    client.call(1, Request::Create { component: 7, disk: 0, blocks: 64 }, &[]).await.unwrap();
    let data = vec![0xabu8; 2 * BLOCK_SIZE];
    client.write(1, 7, 1, 4, &data).await.unwrap();
    assert_eq!(&client.read(1, 7, 4, 2).await.unwrap()[..], &data[..]);
    // A new owner (epoch 2) writes; the old one is refused from then on.
    client.write(2, 7, 2, 6, &data[..BLOCK_SIZE]).await.unwrap();
    match client.write(1, 7, 3, 8, &data[..BLOCK_SIZE]).await {
        Err(ClientError::Component(ComponentError::StaleEpoch { epoch: 1, current: 2 })) => {}
        other => panic!("the old owner's write went through: {other:?}"),
    }
    assert!(matches!(client.read(1, 7, 4, 1).await, Err(ClientError::Component(ComponentError::StaleEpoch { .. }))));
    let info = client.info(2, 7).await.unwrap();
    assert_eq!((info.committed_lsn, info.epoch), (2, 2));
    handle.stop();
}

#[tokio::test]
async fn a_corrupt_block_comes_back_as_a_checksum_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (service, client, handle) = start(dir.path()).await;
        client.call(1, Request::Create { component: 3, disk: 0, blocks: 16 }, &[]).await.unwrap();
        client.write(1, 3, 1, 0, &vec![7u8; 4 * BLOCK_SIZE]).await.unwrap();
        handle.stop();
        service.disks()[0].close();
    }
    let path = dir.path().join("disk0").join("c-3.data");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[2 * BLOCK_SIZE + 9] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let (_service, client, handle) = start(dir.path()).await;
    match client.read(1, 3, 0, 4).await {
        Err(ClientError::Component(ComponentError::Corrupt { blocks })) => assert_eq!(blocks, vec![2]),
        other => panic!("expected a checksum error: {other:?}"),
    }
    handle.stop();
}

#[tokio::test]
async fn a_session_is_applied_in_sequence_order_whatever_order_it_arrives_in() {
    let dir = tempfile::tempdir().unwrap();
    let (service, client, handle) = start(dir.path()).await;
    client.call(1, Request::Create { component: 5, disk: 0, blocks: 4 }, &[]).await.unwrap();
    // 100 writes to one block, sent in reverse order: each must wait for
    // the ones before it, so the last one in the session wins.
    let mut tasks = Vec::new();
    for seq in (1..=100u64).rev() {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let data = vec![seq as u8; BLOCK_SIZE];
            client.call_in(1, 1, seq, Request::Write { component: 5, lsn: seq, first: 0, settled: 0 }, &data).await
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(&client.read(1, 5, 0, 1).await.unwrap()[..], &vec![100u8; BLOCK_SIZE][..]);
    assert_eq!(service.disks()[0].component(5).unwrap().committed_lsn, 100);
    // A repeat is refused; so is the old session once a new one began.
    let data = vec![0u8; BLOCK_SIZE];
    let repeat =
        client.call_in(1, 1, 100, Request::Write { component: 5, lsn: 100, first: 0, settled: 0 }, &data).await;
    assert!(matches!(repeat, Err(ClientError::Component(ComponentError::Duplicate { seq: 100 }))), "{repeat:?}");
    client.call_in(1, 2, 1, Request::Write { component: 5, lsn: 101, first: 1, settled: 0 }, &data).await.unwrap();
    let old = client.call_in(1, 1, 101, Request::Write { component: 5, lsn: 102, first: 1, settled: 0 }, &data).await;
    assert!(matches!(old, Err(ClientError::Component(ComponentError::StaleSession { .. }))), "{old:?}");
    handle.stop();
}
