//! An object's owner at run time: drives [`crate::owner::Owner`] over the
//! component clients, and offers the block client API (`write_at`,
//! `read_at`, `unmap`, `flush`).
//!
//! Every message to a component goes out in its owner session's sequence
//! (see [`crate::component`]), numbered under the owner's lock, so each
//! component applies them in the order the owner decided them. Resync jobs
//! run as tasks: begin, wait for the source to be ready, copy the blocks the
//! source's tracking bitmap marks (or every block), end.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockstore::{ComponentId, Lsn, BLOCK_SIZE};
use bytes::Bytes;
use roaring::RoaringBitmap;
use tokio::sync::oneshot;
use wire::Transport;

use crate::component::{Client, ClientError, ComponentError, Reply, Request};
use crate::owner::{Action, Index, Input, Op, Owner, Source, Status};

/// Blocks per message to a component.
const MESSAGE_BLOCKS_MAX: u64 = 256;
/// Blocks copied per resync step.
const RESYNC_BLOCKS: u64 = 64;

#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("offset {offset} and length {length} are not whole {BLOCK_SIZE}-byte blocks")]
    Unaligned { offset: u64, length: u64 },
    #[error("bytes {offset}..{end} are past the end of the object ({size} bytes)")]
    OutOfRange { offset: u64, end: u64, size: u64 },
    #[error("no copy of the object is available")]
    Unavailable,
    #[error("every copy failed to read: {0}")]
    Read(String),
}

/// Resync figures, for status and tests.
#[derive(Debug, Default)]
pub struct ResyncStats {
    pub blocks_copied: AtomicU64,
    pub full_copies: AtomicU64,
    pub resyncs_done: AtomicU64,
}

struct State {
    owner: Owner,
    /// Per component: its session and the next sequence number.
    sessions: Vec<(u64, u64)>,
    waiters: HashMap<u64, oneshot::Sender<Result<Lsn, ObjectError>>>,
    next_request: u64,
}

pub struct Object<T: Transport> {
    epoch: u64,
    blocks: u64,
    components: Vec<(ComponentId, Client<T>)>,
    state: Mutex<State>,
    next_session: AtomicU64,
    pub resync_stats: ResyncStats,
}

impl<T: Transport> Object<T> {
    /// Opens an object whose components all hold the same data up to
    /// `committed` (a new object: 0).
    pub fn open(epoch: u64, blocks: u64, components: Vec<(ComponentId, Client<T>)>, committed: Lsn) -> Arc<Self> {
        let count = components.len();
        Arc::new(Object {
            epoch,
            blocks,
            components,
            state: Mutex::new(State {
                owner: Owner::new(vec![Status::Active; count], committed),
                sessions: (0..count).map(|index| (index as u64 + 1, 1)).collect(),
                waiters: HashMap::new(),
                next_request: 0,
            }),
            next_session: AtomicU64::new(count as u64 + 1),
            resync_stats: ResyncStats::default(),
        })
    }

    pub fn statuses(&self) -> Vec<Status> {
        self.state.lock().expect("object lock").owner.statuses()
    }

    pub fn size(&self) -> u64 {
        self.blocks * BLOCK_SIZE as u64
    }

    fn check(&self, offset: u64, length: u64) -> Result<(u64, u64), ObjectError> {
        let block = BLOCK_SIZE as u64;
        if !offset.is_multiple_of(block) || !length.is_multiple_of(block) || length == 0 {
            return Err(ObjectError::Unaligned { offset, length });
        }
        let end = offset.saturating_add(length);
        if end > self.size() {
            return Err(ObjectError::OutOfRange { offset, end, size: self.size() });
        }
        Ok((offset / BLOCK_SIZE as u64, length / BLOCK_SIZE as u64))
    }

    /// Writes whole blocks; returns once every active copy has them durably.
    pub async fn write_at(self: &Arc<Self>, offset: u64, data: Bytes) -> Result<(), ObjectError> {
        let (first, count) = self.check(offset, data.len() as u64)?;
        let mut waits = Vec::new();
        for start in (0..count).step_by(MESSAGE_BLOCKS_MAX as usize) {
            let blocks = MESSAGE_BLOCKS_MAX.min(count - start);
            let piece = data.slice((start as usize * BLOCK_SIZE)..((start + blocks) as usize * BLOCK_SIZE));
            waits.push(self.submit(Op::Write { first: first + start, count: blocks }, piece));
        }
        for wait in waits {
            wait.await.map_err(|_| ObjectError::Unavailable)??;
        }
        Ok(())
    }

    /// Deallocates whole blocks (they read as zeros).
    pub async fn unmap(self: &Arc<Self>, offset: u64, length: u64) -> Result<(), ObjectError> {
        let (first, count) = self.check(offset, length)?;
        self.submit(Op::Unmap { first, count }, Bytes::new()).await.map_err(|_| ObjectError::Unavailable)??;
        Ok(())
    }

    /// Every acknowledged write is already durable on every active copy.
    pub async fn flush(&self) -> Result<(), ObjectError> {
        Ok(())
    }

    fn submit(self: &Arc<Self>, op: Op, data: Bytes) -> oneshot::Receiver<Result<Lsn, ObjectError>> {
        let (done, wait) = oneshot::channel();
        let mut state = self.state.lock().expect("object lock");
        state.next_request += 1;
        let request = state.next_request;
        state.waiters.insert(request, done);
        let mut out = Vec::new();
        state.owner.handle(0, Input::Submit { request, op }, &mut out);
        self.act(&mut state, out, &data);
        wait
    }

    /// Carries out the owner's actions (under the lock: sequence numbers
    /// are taken in the order the owner decided). `data`: the submitted
    /// operation's, which its `Send` actions carry (the owner sends only
    /// when an operation is submitted).
    fn act(self: &Arc<Self>, state: &mut State, actions: Vec<Action>, data: &Bytes) {
        for action in actions {
            match action {
                Action::Send { component, lsn, .. } => {
                    let op = state.owner.op(lsn).cloned();
                    let request = match op {
                        Some(Op::Write { first, .. }) => {
                            Request::Write { component: self.components[component].0, lsn, first }
                        }
                        Some(Op::Unmap { first, count }) => {
                            Request::Unmap { component: self.components[component].0, lsn, first, count }
                        }
                        None => continue,
                    };
                    self.send(state, component, request, data.clone(), Some(lsn));
                }
                Action::Done { request, lsn } => {
                    if let Some(waiter) = state.waiters.remove(&request) {
                        let _ = waiter.send(Ok(lsn));
                    }
                }
                Action::Refused { request } => {
                    if let Some(waiter) = state.waiters.remove(&request) {
                        let _ = waiter.send(Err(ObjectError::Unavailable));
                    }
                }
                Action::Track { component, stale, seed } => {
                    let request = Request::Track { component: self.components[component].0, stale, seed: Some(seed) };
                    self.send(state, component, request, Bytes::new(), None);
                }
                Action::Untrack { component, stale } => {
                    let request = Request::Untrack { component: self.components[component].0, stale };
                    self.send(state, component, request, Bytes::new(), None);
                }
                Action::Resync { component, stale, target, source, ready, plan } => {
                    let request = Request::BeginSync { component: self.components[component].0, stale, target, plan };
                    let begun = self.send(state, component, request, Bytes::new(), None);
                    let object = self.clone();
                    tokio::spawn(async move { object.resync(component, source, ready, plan, begun).await });
                }
                Action::Current { component } => {
                    let request = Request::EndSync { component: self.components[component].0, plan: 0 };
                    self.send(state, component, request, Bytes::new(), None);
                }
                Action::Persist => {}
            }
        }
    }

    /// Sends the next message of `component`'s session; its answer comes
    /// back to the owner (a write's acknowledgement, or a failure).
    fn send(
        self: &Arc<Self>,
        state: &mut State,
        component: Index,
        request: Request,
        data: Bytes,
        lsn: Option<Lsn>,
    ) -> oneshot::Receiver<Result<Reply, ClientError>> {
        let (session, seq) = state.sessions[component];
        state.sessions[component].1 += 1;
        let (answered, answer) = oneshot::channel();
        let object = self.clone();
        tokio::spawn(async move {
            let client = &object.components[component].1;
            let result = client.call_in(object.epoch, session, seq, request, &data).await.map(|(reply, _)| reply);
            let input = match (&result, lsn) {
                (Ok(_), Some(lsn)) => Some(Input::Acked { component, lsn }),
                (Ok(_), None) => None,
                (Err(error), _) => {
                    tracing::warn!(component, %error, "component failed");
                    Some(Input::Failed { component })
                }
            };
            if let Some(input) = input {
                object.input_from(component, session, input);
            }
            let _ = answered.send(result);
        });
        answer
    }

    /// An answer from `component` in `session`: one from a session that is
    /// over (the component went away and came back since) is void.
    fn input_from(self: &Arc<Self>, component: Index, session: u64, input: Input) {
        if self.state.lock().expect("object lock").sessions[component].0 != session {
            return;
        }
        self.input(input);
    }

    fn input(self: &Arc<Self>, input: Input) {
        let mut state = self.state.lock().expect("object lock");
        if let Input::Failed { component } = input {
            if matches!(state.owner.status(component), Status::Absent { .. }) {
                return;
            }
        }
        let mut out = Vec::new();
        state.owner.handle(now_ms(), input, &mut out);
        self.act(&mut state, out, &Bytes::new());
    }

    /// Asks an absent component whether it is back; if so, the owner plans
    /// its resync.
    pub async fn probe(self: &Arc<Self>, component: Index) -> bool {
        if !matches!(self.statuses()[component], Status::Absent { .. }) {
            return false;
        }
        let (id, client) = &self.components[component];
        let Ok(info) = client.info(self.epoch, *id).await else { return false };
        let mut state = self.state.lock().expect("object lock");
        // A new session: the old one's messages are void.
        state.sessions[component] = (self.next_session.fetch_add(1, Ordering::Relaxed), 1);
        let mut out = Vec::new();
        state.owner.handle(now_ms(), Input::Back { component, committed: info.committed_lsn }, &mut out);
        self.act(&mut state, out, &Bytes::new());
        true
    }

    async fn resync(
        self: Arc<Self>,
        target: Index,
        source: Source,
        ready: Lsn,
        plan: u64,
        begun: oneshot::Receiver<Result<Reply, ClientError>>,
    ) {
        if !matches!(begun.await, Ok(Ok(_))) {
            return; // the target failed; the owner knows
        }
        let from = source.index();
        let tracking = match source {
            Source::Tracked { tracking, .. } => Some(tracking),
            Source::FullCopy { .. } => None,
        };
        let (source_id, source_client) = &self.components[from];
        // Wait until the source has everything sent to it so far.
        loop {
            match source_client.info(self.epoch, *source_id).await {
                Ok(info) if info.committed_lsn >= ready => break,
                Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                Err(_) => return, // the source failed; the owner re-plans
            }
        }
        let blocks: RoaringBitmap = match tracking {
            Some(stale) => {
                let reply =
                    source_client.call(self.epoch, Request::TrackingBitmap { component: *source_id, stale }, &[]).await;
                match reply {
                    Ok((Reply::Bitmap(Some(bytes)), _)) => match RoaringBitmap::deserialize_from(&bytes[..]) {
                        Ok(bitmap) => bitmap,
                        Err(_) => return,
                    },
                    _ => return,
                }
            }
            None => {
                self.resync_stats.full_copies.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(component = target, "resync by full copy");
                (0..self.blocks as u32).collect()
            }
        };
        let target_id = self.components[target].0;
        // Blocks the target already has newer writes for need no copy.
        let mut blocks = blocks;
        let target_client = &self.components[target].1;
        if let Ok((Reply::Bitmap(Some(bytes)), _)) =
            target_client.call(self.epoch, Request::SyncBitmap { component: target_id }, &[]).await
        {
            if let Ok(done) = RoaringBitmap::deserialize_from(&bytes[..]) {
                blocks -= done;
            }
        }
        let list: Vec<u32> = blocks.iter().collect();
        for run in list.chunk_by(|a, b| b == &(a + 1)) {
            for piece in run.chunks(RESYNC_BLOCKS as usize) {
                let first = piece[0] as u64;
                let count = piece.len() as u64;
                let data = match source_client.read(self.epoch, *source_id, first, count).await {
                    Ok(data) => data,
                    Err(_) => return,
                };
                let sent = {
                    let mut state = self.state.lock().expect("object lock");
                    if state.owner.status(target) == &Status::Active {
                        return;
                    }
                    let request = Request::SyncWrite { component: target_id, first };
                    self.send(&mut state, target, request, data, None)
                };
                if !matches!(sent.await, Ok(Ok(_))) {
                    return;
                }
                self.resync_stats.blocks_copied.fetch_add(count, Ordering::Relaxed);
            }
        }
        let ended = {
            let mut state = self.state.lock().expect("object lock");
            let request = Request::EndSync { component: target_id, plan };
            self.send(&mut state, target, request, Bytes::new(), None)
        };
        if let Ok(Ok(Reply::Ended(true))) = ended.await {
            self.resync_stats.resyncs_done.fetch_add(1, Ordering::Relaxed);
            self.input(Input::Resynced { component: target, plan });
        }
    }

    /// Reads whole blocks from an active copy; a checksum error is repaired
    /// from another copy and reported.
    pub async fn read_at(self: &Arc<Self>, offset: u64, length: u64) -> Result<Bytes, ObjectError> {
        let (first, count) = self.check(offset, length)?;
        let active: Vec<Index> = self
            .statuses()
            .iter()
            .enumerate()
            .filter(|(_, status)| **status == Status::Active)
            .map(|(index, _)| index)
            .collect();
        if active.is_empty() {
            return Err(ObjectError::Unavailable);
        }
        let written_before = self.state.lock().expect("object lock").owner.last_lsn();
        let mut errors = Vec::new();
        let mut corrupt: Vec<(Index, Vec<u64>)> = Vec::new();
        for index in active {
            let (id, client) = &self.components[index];
            match client.read(self.epoch, *id, first, count).await {
                Ok(data) => {
                    for (bad, blocks) in corrupt {
                        self.repair(bad, first, &blocks, &data, written_before);
                    }
                    return Ok(data);
                }
                Err(ClientError::Component(ComponentError::Corrupt { blocks })) => {
                    tracing::error!(component = index, ?blocks, "checksum mismatch; reading another copy");
                    corrupt.push((index, blocks));
                }
                Err(error) => errors.push(error.to_string()),
            }
        }
        Err(ObjectError::Read(errors.join("; ")))
    }

    /// Rewrites corrupt blocks of `component` with good data read while no
    /// write was made (a write since might be newer than the data read).
    fn repair(self: &Arc<Self>, component: Index, first: u64, blocks: &[u64], data: &Bytes, written_before: Lsn) {
        let mut state = self.state.lock().expect("object lock");
        if state.owner.last_lsn() != written_before || state.owner.status(component) != &Status::Active {
            tracing::info!(component, "not repairing now: the object was written meanwhile");
            return;
        }
        metrics::counter!("objects_blocks_repaired_total").increment(blocks.len() as u64);
        for block in blocks {
            let at = ((block - first) as usize) * BLOCK_SIZE;
            let request = Request::Repair { component: self.components[component].0, first: *block };
            drop(self.send(&mut state, component, request, data.slice(at..at + BLOCK_SIZE), None));
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
