//! Erasure-coded objects (RAID-5/6) on component services over real TCP on
//! loopback: full and partial stripe writes, degraded reads and writes,
//! resync of a returning component by rebuilding its chunks, reclamation
//! of whole stripes, and a new owner settling stripes an old one left
//! half written. A checker reads every row of every component and checks
//! each stripe's parity against its data.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockstore::BLOCK_SIZE;
use bytes::Bytes;
use objects::component::Request;
use objects::ec::Layout;
use objects::object::{Hooks, Object};
use objects::owner::Status;
use wire::tcp::TcpTransport;

use crate::object::{components, hosts, Host, BLOCKS};

/// Every component holds `BLOCKS` rows: the object holds `BLOCKS * k`.
fn object_blocks(layout: &Layout) -> u64 {
    BLOCKS * layout.data as u64
}

fn hooks(layout: Layout) -> Hooks {
    Hooks { erasure: Some(layout), ..Hooks::default() }
}

/// Deterministic bytes for `blocks` blocks of write number `seed`.
fn bytes(seed: u64, blocks: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..blocks as usize * BLOCK_SIZE)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

async fn write(object: &Arc<Object<TcpTransport>>, model: &mut [u8], first: u64, count: u64, seed: u64) {
    let data = bytes(seed, count);
    object.write_at(first * BLOCK_SIZE as u64, Bytes::from(data.clone())).await.unwrap();
    model[first as usize * BLOCK_SIZE..(first + count) as usize * BLOCK_SIZE].copy_from_slice(&data);
}

async fn read_all(object: &Arc<Object<TcpTransport>>, blocks: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for first in (0..blocks).step_by(100) {
        let count = 100.min(blocks - first);
        out.extend_from_slice(&object.read_at(first * BLOCK_SIZE as u64, count * BLOCK_SIZE as u64).await.unwrap());
    }
    out
}

/// Reads every row of every component (straight from their services) and
/// checks that each stripe's parity is the code of its data, and that the
/// data is `model`. Returns the stripes checked.
async fn check_stripes(hosts: &[Host], layout: Layout, model: &[u8]) -> u64 {
    let mut held = Vec::new();
    for host in hosts {
        let mut rows = Vec::new();
        for first in (0..BLOCKS).step_by(64) {
            rows.extend_from_slice(&host.client.read(1 << 40, host.id, first, 64).await.unwrap());
        }
        held.push(rows);
    }
    let chunk = layout.chunk_blocks as usize * BLOCK_SIZE;
    let stripes = BLOCKS / layout.chunk_blocks;
    for stripe in 0..stripes {
        let at = stripe as usize * chunk;
        let piece = |position: usize| &held[layout.component(stripe, position)][at..at + chunk];
        let data: Vec<&[u8]> = (0..layout.data).map(piece).collect();
        let parity = layout.encode(&data).unwrap();
        for (index, expected) in parity.iter().enumerate() {
            assert!(
                expected[..] == piece(layout.data + index)[..],
                "stripe {stripe}: parity {index} does not match its data"
            );
        }
        for (position, chunk_data) in data.iter().enumerate() {
            let block = layout.block_at(stripe * layout.chunk_blocks, position) as usize;
            assert!(
                chunk_data[..] == model[block * BLOCK_SIZE..block * BLOCK_SIZE + chunk],
                "stripe {stripe}, data position {position}: not what was written"
            );
        }
    }
    stripes
}

async fn wait_all_active(object: &Arc<Object<TcpTransport>>, width: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while object.statuses() != vec![Status::Active; width] {
        assert!(Instant::now() < deadline, "resync did not finish: {:?}", object.statuses());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The object's new owner at epoch 2, after its old owner stopped with
/// component `away` gone with it (every component recorded active).
async fn recover_without(hosts: &[Host], layout: Layout, blocks: u64, away: usize) -> Arc<Object<TcpTransport>> {
    hosts[away].online.store(false, Ordering::SeqCst);
    let recorded = vec![Status::Active; hosts.len()];
    Object::recover(2, blocks, components(hosts), recorded, hooks(layout)).await.unwrap()
}

/// Component `away` comes back and is resynced until every component is
/// active.
async fn bring_back(object: &Arc<Object<TcpTransport>>, hosts: &[Host], away: usize) {
    hosts[away].online.store(true, Ordering::SeqCst);
    assert!(object.probe(away).await);
    wait_all_active(object, hosts.len()).await;
}

/// The LSN `host`'s component has committed.
fn committed(host: &Host) -> u64 {
    host.service.disks()[0].component(host.id).unwrap().committed_lsn
}

/// RAID-5 (2+1), every block written: components 1 and 2 go away and a
/// whole-stripe write reaches component 0 alone (all were active when it
/// was sent, so it read nothing first), and is refused. Returns the stripe
/// and the position of a data chunk of it on component 0.
async fn refuse_a_write_component_0_alone_holds(
    object: &Arc<Object<TcpTransport>>,
    hosts: &[Host],
    layout: Layout,
    blocks: u64,
) -> (u64, usize) {
    for host in &hosts[1..] {
        host.online.store(false, Ordering::SeqCst);
    }
    let (stripe, position) = (0..layout.stripes(blocks))
        .flat_map(|stripe| (0..layout.data).map(move |position| (stripe, position)))
        .find(|(stripe, position)| layout.component(*stripe, *position) == 0)
        .expect("a data chunk on component 0");
    let size = layout.stripe_blocks();
    let refused = object.write_at(stripe * size * BLOCK_SIZE as u64, Bytes::from(bytes(2, size))).await;
    assert!(refused.is_err(), "a write one chunk holds must not be acknowledged");
    (stripe, position)
}

/// Waits until components 0 and 1 are active again.
async fn wait_taken_back(object: &Arc<Object<TcpTransport>>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while object.statuses()[..2] != [Status::Active, Status::Active] {
        assert!(Instant::now() < deadline, "not taken back: {:?}", object.statuses());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes that start and end anywhere: inside a chunk, across chunks,
/// across stripes, whole stripes, the whole object.
const WRITES: [(u64, u64); 9] = [(0, 1), (5, 3), (14, 4), (15, 40), (48, 48), (100, 200), (300, 1), (2, 130), (33, 17)];

/// An erasure-coded object of `layout` over `width` in-process hosts
/// (component ids from `first`), opened at epoch 1, and its content as
/// written so far (zeros).
struct Fixture {
    _dir: tempfile::TempDir,
    hosts: Vec<Host>,
    blocks: u64,
    object: Arc<Object<TcpTransport>>,
    model: Vec<u8>,
}

impl Fixture {
    async fn open(layout: Layout, width: usize, first: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let hosts = hosts(dir.path(), &TcpTransport::new(), width, first).await;
        let blocks = object_blocks(&layout);
        let object = Object::open_with(1, blocks, components(&hosts), 0, hooks(layout));
        Fixture { _dir: dir, hosts, blocks, object, model: vec![0u8; blocks as usize * BLOCK_SIZE] }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raid5_and_raid6_read_back_every_write_and_every_stripes_parity_matches_its_data() {
    for (k, m) in [(2, 1), (3, 1), (4, 1), (4, 2)] {
        let layout = Layout::new(k, m);
        let Fixture { _dir, hosts, blocks, object, mut model } = Fixture::open(layout, k + m, 100).await;
        write(&object, &mut model, 0, blocks, 1).await;
        for (seed, (first, count)) in WRITES.iter().enumerate() {
            write(&object, &mut model, *first, *count, seed as u64 + 2).await;
        }
        // Concurrent partial writes to one stripe take turns.
        let writes = (0..8u64).map(|i| {
            let object = object.clone();
            let data = bytes(100 + i, 1);
            async move { object.write_at((i * 3) * BLOCK_SIZE as u64, Bytes::from(data)).await.unwrap() }
        });
        futures::future::join_all(writes).await;
        for i in 0..8u64 {
            let at = (i * 3) as usize * BLOCK_SIZE;
            model[at..at + BLOCK_SIZE].copy_from_slice(&bytes(100 + i, 1));
        }
        assert!(read_all(&object, blocks).await == model, "{k}+{m}: read back differs");
        let stripes = check_stripes(&hosts, layout, &model).await;
        println!("{k}+{m}: {stripes} stripes, parity matches");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_m_components_away_every_read_is_right_and_their_return_rebuilds_only_what_changed() {
    for (k, m) in [(3, 1), (4, 2)] {
        let layout = Layout::new(k, m);
        let Fixture { _dir, hosts, blocks, object, mut model } = Fixture::open(layout, k + m, 200).await;
        write(&object, &mut model, 0, blocks, 1).await;

        // m components go away (one holds parity of stripe 0, one data).
        let away: Vec<usize> = (0..m).map(|i| i * 2 + 1).collect();
        for index in &away {
            hosts[*index].online.store(false, Ordering::SeqCst);
        }
        // Writes go on, degraded; the first ones find the components gone.
        let mut rows_written = std::collections::BTreeSet::new();
        for (seed, (first, count)) in WRITES.iter().enumerate() {
            write(&object, &mut model, *first, *count, seed as u64 + 10).await;
            // Per stripe, the write covers the rows its pieces span.
            let pieces = layout.pieces(*first, *count);
            for stripe in pieces.iter().map(|piece| piece.stripe) {
                let of_stripe = pieces.iter().filter(|piece| piece.stripe == stripe);
                let low = of_stripe.clone().map(|piece| piece.row).min().unwrap();
                let high = of_stripe.map(|piece| piece.row + piece.count).max().unwrap();
                rows_written.extend(low..high);
            }
        }
        for index in &away {
            assert!(matches!(object.statuses()[*index], Status::Absent { .. }), "{:?}", object.statuses());
        }
        // Every read is right: chunks on the away components are rebuilt.
        assert!(read_all(&object, blocks).await == model, "{k}+{m}: degraded read differs");

        for index in &away {
            hosts[*index].online.store(true, Ordering::SeqCst);
            assert!(object.probe(*index).await);
        }
        wait_all_active(&object, k + m).await;
        let copied = object.resync_stats.blocks_copied.load(Ordering::Relaxed);
        let changed = rows_written.len() as u64 * m as u64;
        println!("{k}+{m}: resync rebuilt {copied} chunk blocks for {changed} changed on the returning components");
        assert_eq!(object.resync_stats.full_copies.load(Ordering::Relaxed), 0);
        assert!(copied <= changed * 11 / 10, "rebuilt {copied} for {changed} changed");
        assert!(copied > 0);
        check_stripes(&hosts, layout, &model).await;
        assert!(read_all(&object, blocks).await == model);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmapping_whole_stripes_reclaims_data_and_parity_and_partial_stripes_read_as_zeros() {
    let layout = Layout::new(3, 1);
    let Fixture { _dir, hosts, blocks, object, mut model } = Fixture::open(layout, 4, 300).await;
    write(&object, &mut model, 0, blocks, 1).await;
    let allocated = |hosts: &[Host]| {
        let mut total = 0;
        for host in hosts {
            let info = host.service.disks()[0].component(host.id).unwrap();
            total += info.allocated_bytes / BLOCK_SIZE as u64;
        }
        total
    };
    let before = allocated(&hosts);
    assert_eq!(before, BLOCKS * 4);

    // Stripes are 48 blocks: 10..200 covers stripes 1, 2 and 3 whole, and
    // parts of stripes 0 and 4.
    object.unmap(10 * BLOCK_SIZE as u64, 190 * BLOCK_SIZE as u64).await.unwrap();
    model[10 * BLOCK_SIZE..200 * BLOCK_SIZE].fill(0);
    let after = allocated(&hosts);
    println!("allocated blocks across components: {before} before, {after} after");
    assert_eq!(after, before - 3 * 16 * 4, "three whole stripes, data and parity, are reclaimed");
    assert!(read_all(&object, blocks).await == model);
    check_stripes(&hosts, layout, &model).await;

    // GET LBA STATUS's view: the reclaimed stripes are deallocated, the
    // zeroed parts of the others are mapped.
    let (mapped, length) = object.provisioning(48 * BLOCK_SIZE as u64, 16 * BLOCK_SIZE as u64).await.unwrap();
    assert!(!mapped);
    assert_eq!(length, 16 * BLOCK_SIZE as u64);
    let (mapped, _) = object.provisioning(10 * BLOCK_SIZE as u64, BLOCK_SIZE as u64).await.unwrap();
    assert!(mapped);

    // An unmap to the end reclaims the last stripe.
    object.unmap((blocks - 48) * BLOCK_SIZE as u64, 48 * BLOCK_SIZE as u64).await.unwrap();
    model[(blocks as usize - 48) * BLOCK_SIZE..].fill(0);
    assert_eq!(allocated(&hosts), after - 16 * 4);
    assert!(read_all(&object, blocks).await == model);
}

/// The old owner's last write, rows 3..5 of stripe 0, reached only the
/// component holding data position 0 (a chunk write, with what it
/// replaced, under an LSN above the rest); then the old owner stopped.
async fn tear_a_write(hosts: &[Host], layout: Layout) -> Vec<u8> {
    let component = layout.component(0, 0);
    let host = &hosts[component];
    let info = host.service.disks()[0].component(host.id).unwrap();
    let old = host.client.read(1, host.id, 3, 2).await.unwrap();
    let mut both = bytes(77, 2);
    both.extend_from_slice(&old);
    let request = Request::ChunkWrite {
        component: host.id,
        lsn: info.committed_lsn + 1,
        first: 3,
        stable: 0,
        local: false,
        settled: 0,
    };
    host.client.call(1, request, &both).await.unwrap();
    old.to_vec()
}

/// As a whole-stripe write is sent: the old owner's write of stripe 1
/// reached only the components of its data positions 0 and 1, each with
/// the new chunk alone (`local`: it read its own before-image).
async fn tear_a_whole_stripe_write(hosts: &[Host], layout: Layout) {
    for position in 0..2 {
        let host = &hosts[layout.component(1, position)];
        let info = host.service.disks()[0].component(host.id).unwrap();
        let (first, count) = (layout.chunk_blocks, layout.chunk_blocks);
        let request = Request::ChunkWrite {
            component: host.id,
            lsn: info.committed_lsn + 1,
            first,
            stable: 0,
            local: true,
            settled: 0,
        };
        host.client.call(1, request, &bytes(88 + position as u64, count)).await.unwrap();
    }
}

/// A whole-stripe write sends no before-images (each component reads its
/// own): torn across the stripe's chunks, it is rolled back all the same,
/// and whole-stripe writes through the owner keep every stripe a codeword.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_whole_stripe_write_is_rolled_back_from_the_components_own_before_images() {
    let layout = Layout::new(3, 1);
    let Fixture { _dir, hosts, blocks, object, mut model } = Fixture::open(layout, 4, 600).await;
    // Whole stripes (48 blocks each), then a partial write, then whole
    // stripes over it again.
    let stripe = layout.stripe_blocks();
    let whole = || object.full_stripe_writes.load(Ordering::Relaxed);
    write(&object, &mut model, 0, blocks, 1).await;
    assert_eq!(whole(), layout.stripes(blocks), "every stripe written whole");
    write(&object, &mut model, stripe + 5, 7, 2).await;
    assert_eq!(whole(), layout.stripes(blocks), "a partial write is no whole-stripe write");
    write(&object, &mut model, stripe, 2 * stripe, 3).await;
    assert_eq!(whole(), layout.stripes(blocks) + 2);
    check_stripes(&hosts, layout, &model).await;
    // With a component away, a whole stripe is written the partial way
    // (reads and before-images from the owner).
    let away = layout.component(0, 0);
    hosts[away].online.store(false, Ordering::SeqCst);
    write(&object, &mut model, 40, 1, 5).await;
    assert!(matches!(object.statuses()[away], Status::Absent { .. }), "{:?}", object.statuses());
    write(&object, &mut model, 0, stripe, 6).await;
    assert_eq!(whole(), layout.stripes(blocks) + 2);
    bring_back(&object, &hosts, away).await;
    check_stripes(&hosts, layout, &model).await;
    object.close();
    tear_a_whole_stripe_write(&hosts, layout).await;
    // Data position 2 of stripe 1 goes away with the owner: it is rebuilt
    // from the others, right only if positions 0 and 1 were rolled back.
    let away = layout.component(1, 2);
    let object = recover_without(&hosts, layout, blocks, away).await;
    assert!(read_all(&object, blocks).await == model, "a chunk rebuilt from a torn whole-stripe write is wrong");
    bring_back(&object, &hosts, away).await;
    check_stripes(&hosts, layout, &model).await;
    write(&object, &mut model, 0, stripe, 4).await;
    check_stripes(&hosts, layout, &model).await;
    assert!(read_all(&object, blocks).await == model);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_owner_rolls_back_a_write_that_reached_only_some_chunks() {
    let layout = Layout::new(3, 1);
    let Fixture { _dir, hosts, blocks, object, mut model } = Fixture::open(layout, 4, 400).await;
    write(&object, &mut model, 0, blocks, 1).await;
    object.close();
    tear_a_write(&hosts, layout).await;

    let recorded = vec![Status::Active; 4];
    let object = Object::recover(2, blocks, components(&hosts), recorded, hooks(layout)).await.unwrap();
    // The unacknowledged write is undone; every stripe is one codeword.
    check_stripes(&hosts, layout, &model).await;
    assert!(read_all(&object, blocks).await == model);
    // And the object goes on.
    write(&object, &mut model, 2, 5, 3).await;
    check_stripes(&hosts, layout, &model).await;
}

/// The RAID write hole: a write torn across a stripe's chunks while another
/// chunk of that stripe is away. The away chunk is rebuilt from the others,
/// so they must be one codeword: the new owner rolls the torn write back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_away_while_the_owner_dies_mid_write_still_reads_right() {
    let layout = Layout::new(3, 1);
    let Fixture { _dir, hosts, blocks, object, mut model } = Fixture::open(layout, 4, 500).await;
    write(&object, &mut model, 0, blocks, 1).await;
    object.close();
    tear_a_write(&hosts, layout).await;
    // The component with data position 1 of stripe 0 goes away with the
    // owner.
    let away = layout.component(0, 1);
    let object = recover_without(&hosts, layout, blocks, away).await;
    assert!(matches!(object.statuses()[away], Status::Absent { .. }), "{:?}", object.statuses());
    // Position 1's rows 3..5 (object blocks 19..21) are rebuilt from the
    // others: right only if the torn write was undone.
    assert!(read_all(&object, blocks).await == model, "a chunk rebuilt from a torn stripe is wrong");
    write(&object, &mut model, 40, 30, 4).await;
    bring_back(&object, &hosts, away).await;
    check_stripes(&hosts, layout, &model).await;
    assert!(read_all(&object, blocks).await == model);
}

/// An owner deposed by a newer one (ownership moved) learns it from the
/// reads its writes begin with: it closes and says `Deposed`, which sends
/// the caller to the new owner, rather than failing the I/O.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_owner_says_so_when_its_reads_are_refused() {
    let layout = Layout::new(2, 1);
    let dir = tempfile::tempdir().unwrap();
    let transport = TcpTransport::new();
    let hosts = hosts(dir.path(), &transport, 3, 600).await;
    let blocks = object_blocks(&layout);
    let old = Object::open_with(1, blocks, components(&hosts), 0, hooks(layout));
    let mut model = vec![0u8; blocks as usize * BLOCK_SIZE];
    write(&old, &mut model, 0, 64, 1).await;
    let new = Object::recover(2, blocks, components(&hosts), vec![Status::Active; 3], hooks(layout)).await.unwrap();
    let refused = old.write_at(5 * BLOCK_SIZE as u64, Bytes::from(bytes(9, 1))).await;
    assert!(matches!(refused, Err(objects::object::ObjectError::Deposed)), "{refused:?}");
    assert!(matches!(old.read_at(0, BLOCK_SIZE as u64).await, Err(objects::object::ObjectError::Deposed)));
    assert!(read_all(&new, blocks).await == model);
}

/// An object of two copies (component ids from `first`), opened at epoch
/// 1, its first 4 blocks written with `bytes(1, 4)`.
async fn two_copies_written(first: u64) -> (tempfile::TempDir, Vec<Host>, Arc<Object<TcpTransport>>) {
    let dir = tempfile::tempdir().unwrap();
    let hosts = hosts(dir.path(), &TcpTransport::new(), 2, first).await;
    let object = Object::open(1, BLOCKS, components(&hosts), 0);
    object.write_at(0, Bytes::from(bytes(1, 4))).await.unwrap();
    (dir, hosts, object)
}

/// The same for copies: a write of an owner a newer one fenced is answered
/// `Deposed` (it goes to the new owner), not refused as if every copy had
/// failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_owner_of_copies_answers_its_writes_deposed() {
    let (_dir, hosts, old) = two_copies_written(700).await;
    let _new = Object::recover(2, BLOCKS, components(&hosts), vec![Status::Active; 2], Hooks::default()).await.unwrap();
    for _ in 0..4 {
        let refused = old.write_at(0, Bytes::from(bytes(2, 1))).await;
        assert!(matches!(refused, Err(objects::object::ObjectError::Deposed)), "{refused:?}");
    }
    assert!(old.is_closed());
    let read = old.read_at(0, BLOCK_SIZE as u64).await;
    assert!(matches!(read, Err(objects::object::ObjectError::Deposed)), "{read:?}");
}

/// A read that reaches too few chunks to rebuild a stripe because their
/// hosts died (connections refused), before the owner has marked them
/// away, is `Unavailable`: the iSCSI target holds such an I/O until the
/// object is back rather than fail it. A chunk whose host answers with an
/// error is a read error, as before. The same for the allocation query
/// once no component answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_that_reaches_too_few_chunks_because_their_hosts_died_is_unavailable_not_an_error() {
    use objects::object::ObjectError;
    let layout = Layout::new(2, 1);
    let Fixture { _dir, mut hosts, blocks, object, mut model } = Fixture::open(layout, 3, 900).await;
    write(&object, &mut model, 0, blocks, 1).await;
    hosts[0].die();
    assert!(read_all(&object, blocks).await == model, "one chunk gone: rebuilt from the others");
    let length = 8 * BLOCK_SIZE as u64;
    hosts[1].online.store(false, Ordering::SeqCst);
    let read = object.read_at(0, length).await;
    assert!(matches!(read, Err(ObjectError::Read(_))), "a host answered with an error: {read:?}");
    hosts[1].online.store(true, Ordering::SeqCst);
    hosts[1].die();
    let read = object.read_at(0, length).await;
    assert!(matches!(read, Err(ObjectError::Unavailable)), "{read:?}");
    // Any component tells whether rows are allocated: the last one still does.
    assert!(object.provisioning(0, length).await.is_ok());
    hosts[2].die();
    let provisioning = object.provisioning(0, length).await;
    assert!(matches!(provisioning, Err(ObjectError::Unavailable)), "{provisioning:?}");
    assert_eq!(object.statuses(), vec![Status::Active; 3], "reads mark nothing away");
}

/// The same for copies: no copy reached is `Unavailable`, a copy that
/// answered with an error makes it a read error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_that_reaches_no_copy_because_their_hosts_died_is_unavailable_not_an_error() {
    use objects::object::ObjectError;
    let (_dir, mut hosts, object) = two_copies_written(1000).await;
    hosts[0].die();
    assert_eq!(object.read_at(0, 4 * BLOCK_SIZE as u64).await.unwrap(), bytes(1, 4), "read from the other copy");
    hosts[1].online.store(false, Ordering::SeqCst);
    let read = object.read_at(0, BLOCK_SIZE as u64).await;
    assert!(matches!(read, Err(ObjectError::Read(_))), "a host answered with an error: {read:?}");
    let provisioning = object.provisioning(0, BLOCK_SIZE as u64).await;
    assert!(matches!(provisioning, Err(ObjectError::Read(_))), "{provisioning:?}");
    hosts[1].online.store(true, Ordering::SeqCst);
    hosts[1].die();
    let read = object.read_at(0, BLOCK_SIZE as u64).await;
    assert!(matches!(read, Err(ObjectError::Unavailable)), "{read:?}");
    let provisioning = object.provisioning(0, BLOCK_SIZE as u64).await;
    assert!(matches!(provisioning, Err(ObjectError::Unavailable)), "{provisioning:?}");
}

/// A compare and write whose compare passed but whose write a newer
/// owner's fence refused on one copy (it may have reached the other) is
/// answered as of unknown outcome, not `Deposed`: tried again at the new
/// owner, its compare would fail on its own data and report a miscompare
/// for a write that was made. A read-modify-write of part of a block
/// (nothing to compare) is the same done twice, and stays `Deposed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compare_and_write_deposed_mid_write_is_of_unknown_outcome() {
    use objects::object::ObjectError;
    let (_dir, hosts, old) = two_copies_written(800).await;
    // A newer owner's first question fences copy 1 only; the old owner
    // still reads copy 0.
    hosts[1].client.info(2, hosts[1].id).await.unwrap();
    let expected = bytes(1, 1);
    let answer = old.compare_and_write(0, &expected[..512], Bytes::from(vec![7u8; 512])).await;
    assert!(matches!(answer, Err(ObjectError::Indeterminate)), "{answer:?}");
    assert!(old.is_closed());

    let old = Object::open(3, BLOCKS, components(&hosts), 0);
    hosts[1].client.info(4, hosts[1].id).await.unwrap();
    let answer = old.compare_and_write(100, &[], Bytes::from(vec![9u8; 512])).await;
    assert!(matches!(answer, Err(ObjectError::Deposed)), "{answer:?}");
}

/// Two of a RAID-5 (2+1) object's three components away at once: the
/// write that found them gone reached only the third, and is refused; no
/// chunk can be rebuilt, so nothing is resynced. Once one of the two is
/// back, the two that hold every acknowledged write roll back to the
/// newest one (the refused write's chunk goes) and take I/O again; the
/// last is then resynced, and every stripe is a codeword of what was
/// acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_more_than_m_components_away_the_object_takes_back_k_that_hold_every_acknowledged_write() {
    let layout = Layout::new(2, 1);
    let Fixture { _dir, hosts, blocks, object, mut model } = Fixture::open(layout, 3, 700).await;
    write(&object, &mut model, 0, blocks, 1).await;
    let (stripe, position) = refuse_a_write_component_0_alone_holds(&object, &hosts, layout, blocks).await;
    let statuses = object.statuses();
    assert!(statuses[1..].iter().all(|status| matches!(status, Status::Absent { .. })), "{statuses:?}");
    let held_by_0 = committed(&hosts[0]);
    // Refused before it is sent: nothing more to roll back.
    assert!(object.write_at(0, Bytes::from(bytes(3, 1))).await.is_err());
    assert!(object.read_at(0, blocks * BLOCK_SIZE as u64).await.is_err(), "one chunk of a row cannot be read");
    // Not even a block whose data chunk is on component 0: that holds the
    // refused write, which the readmission rolls back.
    let block = layout.block_at(stripe * layout.chunk_blocks, position);
    let read = object.read_at(block * BLOCK_SIZE as u64, BLOCK_SIZE as u64).await;
    assert!(read.is_err(), "a block of a refused write was read");

    // Component 1 comes back, holding every acknowledged write.
    hosts[1].online.store(true, Ordering::SeqCst);
    assert!(object.probe(1).await, "k components hold every acknowledged write: they are taken back");
    wait_taken_back(&object).await;
    assert_eq!(object.resync_stats.readmissions.load(Ordering::Relaxed), 1);
    let now_0 = committed(&hosts[0]);
    assert!(now_0 < held_by_0, "component 0 rolled the refused write back: {now_0} from {held_by_0}");
    assert!(read_all(&object, blocks).await == model, "the refused write's chunk must not be read");
    write(&object, &mut model, 7, 40, 4).await;

    // The last one is resynced, its chunks rebuilt from the two.
    bring_back(&object, &hosts, 2).await;
    check_stripes(&hosts, layout, &model).await;
    assert!(read_all(&object, blocks).await == model);
}

/// A catalog that records an object's statuses, and that a test can hold
/// back (a record waits until it lets go).
struct Catalog {
    held_back: Arc<std::sync::atomic::AtomicBool>,
    records: Arc<std::sync::Mutex<Vec<Vec<Status>>>>,
    /// Hooks for an erasure-coded object of the layout recording there.
    hooks: Hooks,
}

impl Catalog {
    fn new(layout: Layout) -> Catalog {
        use objects::object::{PersistError, Persister};
        let held_back: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let records: Arc<std::sync::Mutex<Vec<Vec<Status>>>> = Arc::default();
        let persister: Persister = {
            let (held_back, records) = (held_back.clone(), records.clone());
            Arc::new(move |statuses: Vec<Status>| {
                let (held_back, records) = (held_back.clone(), records.clone());
                Box::pin(async move {
                    while held_back.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    records.lock().unwrap().push(statuses);
                    Ok::<(), PersistError>(())
                })
            })
        };
        let hooks = Hooks { persister: Some(persister), erasure: Some(layout), ..Hooks::default() };
        Catalog { held_back, records, hooks }
    }
}

/// A readmission sends no rollback before the states it lowered are
/// recorded: with the catalog slow (a record held back), the component
/// holding a refused write still holds it, however long that takes; once
/// the record is in, the rollback goes and the two are taken back. (An
/// owner deposed after rollbacks reached disks that the record still
/// counted above where they went left an object no new owner could open:
/// raid5 sim seed 30.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_readmission_rolls_nothing_back_before_the_states_it_goes_by_are_recorded() {
    let layout = Layout::new(2, 1);
    let dir = tempfile::tempdir().unwrap();
    let hosts = crate::object::hosts(dir.path(), &TcpTransport::new(), 3, 1000).await;
    let blocks = object_blocks(&layout);
    let Catalog { held_back, records, hooks } = Catalog::new(layout);
    let object = Object::open_with(1, blocks, components(&hosts), 0, hooks);
    let mut model = vec![0u8; blocks as usize * BLOCK_SIZE];
    write(&object, &mut model, 0, blocks, 1).await;
    refuse_a_write_component_0_alone_holds(&object, &hosts, layout, blocks).await;
    let held_by_0 = committed(&hosts[0]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while records.lock().unwrap().last().is_none_or(|last| last[1..].contains(&Status::Active)) {
        assert!(Instant::now() < deadline, "the absences were not recorded");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    held_back.store(true, Ordering::SeqCst);
    hosts[1].online.store(true, Ordering::SeqCst);
    assert!(object.probe(1).await, "k components hold every acknowledged write: a readmission begins");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(committed(&hosts[0]), held_by_0, "rolled back before the record was in");
    assert!(matches!(object.statuses()[1], Status::Absent { .. }));

    held_back.store(false, Ordering::SeqCst);
    wait_taken_back(&object).await;
    assert!(committed(&hosts[0]) < held_by_0, "component 0 rolled the refused write back");
    assert!(read_all(&object, blocks).await == model);
}

/// A new owner finding every component recorded away, the one that went
/// last holding a write the others never got (refused: one chunk held
/// it): the newest write answered done is at or above the second highest
/// recorded stale LSN, so all three are current, rolled back to it. (Going
/// by the highest alone, one component, fewer than k, would be current
/// and the object could never be opened.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_owner_takes_for_current_the_components_recorded_away_that_hold_every_write_answered_done() {
    let layout = Layout::new(2, 1);
    let Fixture { _dir, hosts, blocks, object, mut model } = Fixture::open(layout, 3, 800).await;
    write(&object, &mut model, 0, blocks, 1).await;
    write(&object, &mut model, 3, 2, 2).await;
    object.close();
    let committed: Vec<u64> = hosts.iter().map(committed).collect();
    assert!(committed.iter().all(|lsn| *lsn == committed[0]), "{committed:?}");
    // The last write of the old owner reached one chunk; every component
    // was then recorded away, that one last.
    tear_a_write(&hosts, layout).await;
    let last = layout.component(0, 0);
    let recorded: Vec<Status> =
        (0..3).map(|index| Status::Absent { stale: committed[0] + u64::from(index == last), since: 0 }).collect();
    let object = Object::recover(2, blocks, components(&hosts), recorded, hooks(layout)).await.unwrap();
    assert_eq!(object.statuses(), vec![Status::Active; 3]);
    assert!(read_all(&object, blocks).await == model, "the torn write must be rolled back");
    check_stripes(&hosts, layout, &model).await;
    write(&object, &mut model, 10, 30, 3).await;
    check_stripes(&hosts, layout, &model).await;
}

/// As above, but the old owner recorded every component away at one stale
/// LSN, the torn write on one of them above it: each counts only up to its
/// stale LSN, all the same, yet that one holds more on disk and is rolled
/// back all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_owner_rolls_back_a_component_recorded_away_that_holds_more_than_it_counts_for() {
    let layout = Layout::new(2, 1);
    let Fixture { _dir, hosts, blocks, object, mut model } = Fixture::open(layout, 3, 900).await;
    write(&object, &mut model, 0, blocks, 1).await;
    object.close();
    let committed = committed(&hosts[0]);
    tear_a_write(&hosts, layout).await;
    let recorded = vec![Status::Absent { stale: committed, since: 0 }; 3];
    let object = Object::recover(2, blocks, components(&hosts), recorded, hooks(layout)).await.unwrap();
    assert_eq!(object.statuses(), vec![Status::Active; 3]);
    assert!(read_all(&object, blocks).await == model, "the torn write must be rolled back");
    check_stripes(&hosts, layout, &model).await;
}

/// A write fewer than k components hold because another had no room is
/// answered "no space" (it changes nothing: it is rolled back wherever it
/// reached). That promise holds only once the record shows the components
/// that did not take it away, since a new owner going by an older record
/// could take one that applied it, unacknowledged, for current and keep
/// it: with the catalog slow, the answer waits for the record. Component
/// 2's disk is a small tmpfs, nearly full (needs root to mount it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_refused_for_want_of_room_is_answered_once_the_absences_are_recorded() {
    use objects::object::ObjectError;
    let layout = Layout::new(2, 1);
    let (dir, tmpfs, hosts) = third_host_without_room(1100).await;
    let blocks = object_blocks(&layout);
    let Catalog { held_back, records, hooks } = Catalog::new(layout);
    let object = Object::open_with(1, blocks, components(&hosts), 0, hooks);

    // Component 1 stops answering and component 2 has no room: component
    // 0 alone holds the write, and room on 2 would have made it done.
    held_back.store(true, Ordering::SeqCst);
    hosts[1].online.store(false, Ordering::SeqCst);
    let write = {
        let object = object.clone();
        tokio::spawn(async move { object.write_at(0, Bytes::from(bytes(3, layout.stripe_blocks()))).await })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while object.statuses()[1..].contains(&Status::Active) {
        assert!(Instant::now() < deadline, "components 1 and 2 still active: {:?}", object.statuses());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!write.is_finished(), "answered before the absences were recorded");

    held_back.store(false, Ordering::SeqCst);
    let answer = tokio::time::timeout(Duration::from_secs(10), write).await.expect("answered").unwrap();
    assert!(matches!(answer, Err(ObjectError::NoSpace)), "{answer:?}");
    let recorded = records.lock().unwrap().last().cloned().expect("a record");
    assert!(recorded[1..].iter().all(|status| matches!(status, Status::Absent { .. })), "{recorded:?}");
    drop(hosts);
    drop((dir, tmpfs));
}

/// Three in-process hosts (component ids from `first`), the third's disk a
/// 100 MiB tmpfs with less free than the block store's reserve (64 MiB):
/// it takes no write that needs new blocks (needs root to mount it).
async fn third_host_without_room(first: u64) -> (tempfile::TempDir, fsio::tmpfs::Tmpfs, Vec<Host>) {
    let dir = tempfile::tempdir().unwrap();
    let tmpfs = fsio::tmpfs::Tmpfs::mount(100);
    std::fs::create_dir(tmpfs.path().join("host2")).unwrap();
    std::os::unix::fs::symlink(tmpfs.path().join("host2"), dir.path().join("host2")).unwrap();
    let hosts = hosts(dir.path(), &TcpTransport::new(), 3, first).await;
    std::fs::write(tmpfs.path().join("filler"), vec![1u8; 60 << 20]).unwrap();
    (dir, tmpfs, hosts)
}

/// A new owner rolls back every current component, even one at the LSN
/// it rolls back to: one that declined the write above for want of room
/// takes nothing more until a rollback gives that write up (or its owner
/// settles it). Without that, the first write under the new owner found
/// it still refusing, though its disk had room again, and it failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_owner_lets_a_component_that_had_no_room_take_writes_again() {
    let layout = Layout::new(2, 1);
    let (dir, tmpfs, hosts) = third_host_without_room(1200).await;
    let blocks = object_blocks(&layout);
    let object = Object::open_with(1, blocks, components(&hosts), 0, hooks(layout));
    // Components 0 and 1 take it; 2 declines it and fails.
    let size = layout.stripe_blocks();
    let done = object.write_at(0, Bytes::from(bytes(4, size))).await;
    assert!(done.is_ok(), "k components hold it: {done:?}");
    assert!(matches!(object.statuses()[2], Status::Absent { .. }));
    assert!(hosts[2].service.disks()[0].halted(hosts[2].id).is_some(), "component 2 halted");
    object.close();

    // The owner dies before its record shows component 2 away: the new
    // owner takes all three for current, at the lowest LSN among them.
    std::fs::remove_file(tmpfs.path().join("filler")).unwrap();
    let recorded = vec![Status::Active; 3];
    let object = Object::recover(2, blocks, components(&hosts), recorded, hooks(layout)).await.unwrap();
    assert_eq!(object.statuses(), vec![Status::Active; 3]);
    assert_eq!(hosts[2].service.disks()[0].halted(hosts[2].id), None, "the rollback lifted the halt");
    let mut model = vec![0u8; blocks as usize * BLOCK_SIZE];
    write(&object, &mut model, size, size, 5).await;
    assert_eq!(object.statuses(), vec![Status::Active; 3], "component 2 took the write");
    drop(hosts);
    drop((dir, tmpfs));
}

/// A readmission numbers the writes after it above the LSNs it rolled
/// back, which were refused everywhere: a component readmitted then and
/// recorded away later is recorded at a stale LSN above its own committed
/// one. With fewer than k recorded active, a new owner counts each
/// component that answers only up to what it holds, so such a component
/// still counts: here the record says 0 is away at the LSN it holds, 1 at
/// three LSNs above it (refused ones), 2 active. Counting 1 at its record
/// found one current component of the two needed, and no owner could ever
/// open the object (the `sim` crate's seed 30 of the more-than-m scenario
/// once reached this).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_recorded_away_above_what_it_holds_still_counts_toward_a_new_owners_open() {
    let layout = Layout::new(2, 1);
    let Fixture { _dir, hosts, blocks, object, mut model } = Fixture::open(layout, 3, 700).await;
    write(&object, &mut model, 0, blocks, 1).await;
    write(&object, &mut model, 3, 5, 2).await;
    object.close();
    let held = committed(&hosts[0]);
    assert!(hosts.iter().all(|host| committed(host) == held), "every chunk holds every write");
    let recorded =
        vec![Status::Absent { stale: held, since: 0 }, Status::Absent { stale: held + 3, since: 0 }, Status::Active];
    let object = Object::recover(2, blocks, components(&hosts), recorded, hooks(layout)).await.unwrap();
    assert!(read_all(&object, blocks).await == model);
    write(&object, &mut model, 7, 3, 3).await;
    check_stripes(&hosts, layout, &model).await;
    assert!(read_all(&object, blocks).await == model);
}

/// A chunk back in the middle of a resync under which nothing landed (one
/// that waited for its turn, say) holds what it held when the resync began.
/// A new owner that finds too few chunks recorded active counts it at its
/// stale LSN, and its rollback ends that resync; before, such a chunk never
/// counted, and with another chunk away the object never opened again.
/// One under which a block landed, under this plan or one before, still
/// does not count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_owner_counts_a_chunk_in_the_middle_of_a_resync_under_which_nothing_landed() {
    let layout = Layout::new(2, 1);
    let Fixture { _dir, hosts, blocks, object, mut model } = Fixture::open(layout, 3, 720).await;
    write(&object, &mut model, 0, blocks, 1).await;
    write(&object, &mut model, 3, 5, 2).await;
    object.close();
    let held = committed(&hosts[0]);
    assert!(hosts.iter().all(|host| committed(host) == held), "every chunk holds every write");
    let begin = |plan| Request::BeginSync { component: hosts[1].id, stale: held, target: held + 2, plan };
    let recorded = || {
        vec![
            Status::Absent { stale: held, since: 0 },
            Status::Resyncing { stale: held, target: held + 2 },
            Status::Absent { stale: held, since: 0 },
        ]
    };
    hosts[2].online.store(false, Ordering::SeqCst);

    // Something landed under an earlier plan: it cannot count.
    hosts[1].client.call(1, begin(7), &[]).await.unwrap();
    let own = hosts[1].client.read(1, hosts[1].id, 0, 1).await.unwrap();
    hosts[1].client.call(1, Request::SyncWrite { component: hosts[1].id, plan: 7, first: 0 }, &own).await.unwrap();
    hosts[1].client.call(1, begin(8), &[]).await.unwrap();
    let refused = Object::recover(2, blocks, components(&hosts), recorded(), hooks(layout)).await;
    assert!(refused.is_err(), "a chunk with resync data under it counted");

    // Nothing landed: it counts, and the rollback ends its resync.
    hosts[1].client.call(2, Request::EndSync { component: hosts[1].id, plan: 0 }, &[]).await.unwrap();
    hosts[1].client.call(2, begin(9), &[]).await.unwrap();
    let info = hosts[1].service.disks()[0].component(hosts[1].id).unwrap();
    assert!(info.untouched_by_resync, "{info:?}");
    let object = Object::recover(3, blocks, components(&hosts), recorded(), hooks(layout)).await.unwrap();
    assert_eq!(object.statuses()[..2], [Status::Active, Status::Active]);
    let info = hosts[1].service.disks()[0].component(hosts[1].id).unwrap();
    assert_eq!((info.sync, info.committed_lsn), (None, held), "{info:?}");
    assert!(read_all(&object, blocks).await == model);
    write(&object, &mut model, 9, 4, 3).await;
    bring_back(&object, &hosts, 2).await;
    check_stripes(&hosts, layout, &model).await;
    assert!(read_all(&object, blocks).await == model);
}
