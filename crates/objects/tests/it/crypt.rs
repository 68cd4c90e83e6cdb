//! Objects encrypted at rest, over component services on loopback: what
//! the components hold is not what was written; the owner reads back the
//! plaintext; erasing the key leaves every written block unreadable at
//! once and every other block reading as zeros, while writes after it read
//! back, also through the next owner.

use std::sync::{Arc, Mutex};

use blockstore::BLOCK_SIZE;
use bytes::Bytes;
use objects::block_cache::BlockCache;
use objects::crypt::{DataKey, KEY_BYTES};
use objects::ec::Layout;
use objects::object::{Hooks, Object, ObjectError, PersistError, Rekeyer};
use wire::tcp::TcpTransport;

use crate::object::{components, hosts, Host, BLOCKS};

fn key(seed: u8) -> DataKey {
    DataKey(std::array::from_fn(|index| (index as u8).wrapping_mul(29).wrapping_add(seed)))
}

/// A rekeyer handing out keys `seed + 1`, `seed + 2`, ... and recording
/// the last in `recorded` (the catalog, for these tests).
fn rekeyer(recorded: &Arc<Mutex<DataKey>>) -> Rekeyer {
    let recorded = recorded.clone();
    Arc::new(move || {
        let recorded = recorded.clone();
        Box::pin(async move {
            let mut last = recorded.lock().unwrap();
            let next = key(last.0[0].wrapping_add(1));
            *last = next.clone();
            Ok(next)
        })
    })
}

fn hooks(recorded: &Arc<Mutex<DataKey>>, erasure: Option<Layout>) -> Hooks {
    Hooks {
        key: Some(recorded.lock().unwrap().clone()),
        rekeyer: Some(rekeyer(recorded)),
        erasure,
        cache: Some(BlockCache::new(1 << 20)),
        ..Hooks::default()
    }
}

/// Recognisable text, so that finding it on a component means plaintext.
fn text(block: u64) -> Vec<u8> {
    let line = format!("plaintext of block {block:06} ");
    line.bytes().cycle().take(BLOCK_SIZE).collect()
}

/// Every block of every component, straight from its service.
async fn medium(hosts: &[Host], epoch: u64) -> Vec<u8> {
    let mut all = Vec::new();
    for host in hosts {
        all.extend_from_slice(&host.client.read(epoch, host.id, 0, BLOCKS).await.unwrap());
    }
    all
}

fn holds(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

async fn read(object: &Arc<Object<TcpTransport>>, block: u64) -> Vec<u8> {
    object.read_at(block * BLOCK_SIZE as u64, BLOCK_SIZE as u64).await.unwrap().to_vec()
}

async fn encrypted_object_round(erasure: Option<Layout>) {
    let dir = tempfile::tempdir().unwrap();
    let transport = TcpTransport::new();
    let count = erasure.map_or(2, |layout| layout.data + layout.parity);
    let hosts = hosts(dir.path(), &transport, count, 1).await;
    let blocks = erasure.map_or(BLOCKS, |layout| BLOCKS * layout.data as u64);
    let recorded = Arc::new(Mutex::new(key(1)));
    let object = Object::open_with(1, blocks, components(&hosts), 0, hooks(&recorded, erasure));
    assert!(object.is_encrypted());

    let written: Vec<u64> = vec![0, 1, 7, 40];
    for &block in &written {
        object.write_at(block * BLOCK_SIZE as u64, Bytes::from(text(block))).await.unwrap();
    }
    // Not on any component, not even a 32-byte piece of it.
    let on_disk = medium(&hosts, 1).await;
    for &block in &written {
        assert!(!holds(&on_disk, &text(block)[..32]), "block {block}'s plaintext is on a component");
        assert_eq!(read(&object, block).await, text(block));
    }
    assert_eq!(read(&object, 3).await, vec![0u8; BLOCK_SIZE], "a block never written reads as zeros");

    // A compare and write compares the plaintext.
    let at = 7 * BLOCK_SIZE as u64 + 100;
    let expected = &text(7)[100..164];
    let differs = object.compare_and_write(at, b"not what it holds", Bytes::from_static(b"x")).await.unwrap();
    assert_eq!(differs, Some(0));
    let written_over = object.compare_and_write(at, expected, Bytes::from_static(b"NEW")).await.unwrap();
    assert_eq!(written_over, None);
    let mut block7 = text(7);
    block7[100..103].copy_from_slice(b"NEW");
    assert_eq!(read(&object, 7).await, block7);

    // Erase the key: read (also from the cache, which holds what the
    // components hold) every written block as noise, the rest as zeros.
    object.erase_key().await.unwrap();
    for &block in &written {
        let noise = read(&object, block).await;
        let plain = if block == 7 { block7.clone() } else { text(block) };
        assert_ne!(noise, plain, "block {block} still reads after its key was erased");
        assert!(
            noise.chunks(16).zip(plain.chunks(16)).all(|(noise, plain)| noise != plain),
            "a piece of block {block} still reads after its key was erased"
        );
        assert_ne!(noise, vec![0u8; BLOCK_SIZE]);
    }
    assert_eq!(read(&object, 3).await, vec![0u8; BLOCK_SIZE]);

    // Written after: read back, here and by the next owner, which opens
    // with the key recorded.
    object.write_at(0, Bytes::from(text(1000))).await.unwrap();
    assert_eq!(read(&object, 0).await, text(1000));
    object.close();
    let next = Object::recover(2, blocks, components(&hosts), vec![objects::owner::Status::Active; count], {
        hooks(&recorded, erasure)
    })
    .await
    .unwrap();
    assert_eq!(read(&next, 0).await, text(1000));
    assert_ne!(read(&next, 1).await, text(1));
    assert_eq!(read(&next, 3).await, vec![0u8; BLOCK_SIZE]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_object_keeps_no_plaintext_on_its_copies_and_reads_nothing_old_once_its_key_is_erased() {
    encrypted_object_round(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_erasure_coded_object_keeps_no_plaintext_on_its_chunks_and_reads_nothing_old_once_its_key_is_erased(
) {
    encrypted_object_round(Some(Layout::new(2, 1))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_may_not_have_been_recorded_closes_the_object_and_an_object_without_a_key_refuses_to_erase() {
    let dir = tempfile::tempdir().unwrap();
    let transport = TcpTransport::new();
    let hosts = hosts(dir.path(), &transport, 2, 1).await;

    let plain = Object::open_with(1, BLOCKS, components(&hosts), 0, Hooks::default());
    assert!(!plain.is_encrypted());
    assert!(matches!(plain.erase_key().await, Err(ObjectError::NotEncrypted)));
    plain.write_at(0, Bytes::from(text(0))).await.unwrap();
    assert!(holds(&medium(&hosts, 1).await, &text(0)[..32]), "an object without a key stores what it is given");
    plain.close();

    let failing: Rekeyer =
        Arc::new(|| Box::pin(async { Err::<DataKey, _>(PersistError::Failed("the catalog did not answer".into())) }));
    let hooks = Hooks { key: Some(key(5)), rekeyer: Some(failing), ..Hooks::default() };
    let object = Object::open_with(2, BLOCKS, components(&hosts), 0, hooks);
    object.write_at(BLOCK_SIZE as u64, Bytes::from(text(1))).await.unwrap();
    assert!(matches!(object.erase_key().await, Err(ObjectError::Unavailable)));
    assert!(object.is_closed(), "an owner that cannot tell which key the record holds stops serving");
    assert_eq!(KEY_BYTES, 64);
}

/// A new owner erases the key at once after it took the object from an
/// owner that was cut off (not handed over): the erase waits out the old
/// owner's cache lease, so once it is answered the old owner serves
/// nothing written before from its cache either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_erased_by_a_new_owner_at_once_leaves_the_deposed_owners_cache_nothing_to_serve() {
    let dir = tempfile::tempdir().unwrap();
    let transport = TcpTransport::new();
    let hosts = hosts(dir.path(), &transport, 2, 1).await;
    let recorded = Arc::new(Mutex::new(key(1)));
    let old_cache = BlockCache::new(1 << 20);
    let old = Object::open_with(
        1,
        BLOCKS,
        components(&hosts),
        0,
        Hooks { cache: Some(old_cache.clone()), ..hooks(&recorded, None) },
    );
    old.write_at(0, Bytes::from(text(0))).await.unwrap();
    for _ in 0..2 {
        assert_eq!(read(&old, 0).await, text(0));
    }
    assert!(old_cache.stats().hits >= 1, "the old owner serves block 0 from its cache");

    let statuses = vec![objects::owner::Status::Active; 2];
    let new = Object::recover(2, BLOCKS, components(&hosts), statuses, hooks(&recorded, None)).await.unwrap();
    let taken = std::time::Instant::now();
    new.erase_key().await.unwrap();
    println!("the key was erased {:?} after the new owner took over", taken.elapsed());
    match old.read_at(0, BLOCK_SIZE as u64).await {
        Ok(data) => assert_ne!(data.to_vec(), text(0), "the deposed owner served the block the erase was to end"),
        Err(error) => println!("the deposed owner's read fails: {error}"),
    }
}
