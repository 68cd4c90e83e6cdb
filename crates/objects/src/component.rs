//! The component side: a host's component service over its disks, and the
//! client an owner uses to reach it, over `wire`.
//!
//! Every request names the owner's epoch. A component refuses an epoch
//! below the highest it has seen (the old owner of a moved object is
//! fenced off), and records a higher one durably before it acts on it
//! (contract 2).
//!
//! Payload layout (both ways): `[header length: u32 LE][postcard header]
//! [raw block data]`, so block data is never copied through the serializer.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use blockstore::{ComponentId, ComponentInfo, Disk, Lsn, BLOCK_SIZE};
use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use wire::{ErrorCode, RemoteError, Transport};

/// Wire method of the component service (objects own 0x0300..0x0400).
pub const METHOD: u32 = 0x0301;
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    Create {
        component: ComponentId,
        disk: u32,
        blocks: u64,
    },
    Delete {
        component: ComponentId,
    },
    /// Data follows the header. `settled`: the owner settled every write
    /// up to it that this component refused for want of space (no copy
    /// took them), so it may take writes again (`blockstore::Disk::resume`).
    Write {
        component: ComponentId,
        lsn: Lsn,
        first: u64,
        settled: Lsn,
    },
    Unmap {
        component: ComponentId,
        lsn: Lsn,
        first: u64,
        count: u64,
        settled: Lsn,
    },
    Read {
        component: ComponentId,
        first: u64,
        count: u64,
    },
    Track {
        component: ComponentId,
        stale: Lsn,
        seed: Option<Vec<(u64, u64)>>,
    },
    Untrack {
        component: ComponentId,
        stale: Lsn,
    },
    TrackingBitmap {
        component: ComponentId,
        stale: Lsn,
    },
    /// The synchronization bitmap of the resync under way.
    SyncBitmap {
        component: ComponentId,
    },
    BeginSync {
        component: ComponentId,
        stale: Lsn,
        target: Lsn,
        plan: u64,
    },
    /// Data follows the header. Refused unless resync `plan` is the one
    /// under way there.
    SyncWrite {
        component: ComponentId,
        plan: u64,
        first: u64,
    },
    EndSync {
        component: ComponentId,
        plan: u64,
    },
    /// Data follows the header.
    Repair {
        component: ComponentId,
        first: u64,
    },
    Info {
        component: ComponentId,
    },
    /// The blocks written on the component above `stale`, from its
    /// recent-write windows (None if they do not reach back that far): a
    /// returning copy may hold writes of a deposed owner no other copy has.
    WrittenSince {
        component: ComponentId,
        stale: Lsn,
    },
    /// Whether block `first` is allocated, and for how many blocks (up to
    /// `count`) that holds.
    Provisioning {
        component: ComponentId,
        first: u64,
        count: u64,
    },
    /// An erasure-coded chunk write: the new blocks, then as many holding
    /// what they replace, follow the header; or, `local`, the new blocks
    /// alone, the component reading what they replace itself. `stable`:
    /// every LSN up to it is on every active component (their
    /// before-images can go). `settled`: as for `Write`.
    ChunkWrite {
        component: ComponentId,
        lsn: Lsn,
        first: u64,
        stable: Lsn,
        local: bool,
        settled: Lsn,
    },
    /// An erasure-coded unmap of whole stripes' rows.
    ChunkUnmap {
        component: ComponentId,
        lsn: Lsn,
        first: u64,
        count: u64,
        stable: Lsn,
        settled: Lsn,
    },
    /// Rolls the chunk writes above `to` back (a new owner, before it
    /// takes I/O); answers the ranges of chunk unmaps above `to`, which it
    /// does not undo.
    RollBack {
        component: ComponentId,
        to: Lsn,
    },
    /// Which of the blocks in the bitmap that follows the header
    /// (serialized) are allocated here.
    Allocated {
        component: ComponentId,
    },
}

impl Request {
    pub fn component(&self) -> ComponentId {
        match self {
            Request::Create { component, .. }
            | Request::Delete { component }
            | Request::Write { component, .. }
            | Request::Unmap { component, .. }
            | Request::Read { component, .. }
            | Request::Track { component, .. }
            | Request::Untrack { component, .. }
            | Request::TrackingBitmap { component, .. }
            | Request::SyncBitmap { component }
            | Request::BeginSync { component, .. }
            | Request::SyncWrite { component, .. }
            | Request::EndSync { component, .. }
            | Request::Repair { component, .. }
            | Request::Info { component }
            | Request::WrittenSince { component, .. }
            | Request::Provisioning { component, .. }
            | Request::ChunkWrite { component, .. }
            | Request::ChunkUnmap { component, .. }
            | Request::RollBack { component, .. }
            | Request::Allocated { component } => *component,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The owner's epoch for the component's object.
    pub epoch: u64,
    /// The owner's session with this component, and the message's place in
    /// it (from 1). `seq` 0: not ordered (reads, queries, create).
    pub session: u64,
    pub seq: u64,
    pub request: Request,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Done,
    /// Data follows the header (reads).
    Data,
    Info(ComponentInfo),
    /// A tracking bitmap, serialized (roaring's portable format), if held.
    Bitmap(Option<Vec<u8>>),
    /// Whether a resync ended.
    Ended(bool),
    Error(ComponentError),
    /// Allocated or not, and for how many blocks.
    Provisioned {
        mapped: bool,
        blocks: u64,
    },
    /// Rolled back; these chunk unmaps were above the LSN rolled back to.
    RolledBack(Vec<(u64, u64)>),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ComponentError {
    #[error("owner epoch {epoch} is stale: the component accepts {current} and above")]
    StaleEpoch { epoch: u64, current: u64 },
    #[error("checksum mismatch in blocks {blocks:?}")]
    Corrupt { blocks: Vec<u64> },
    #[error("no disk {0} on this host")]
    NoSuchDisk(u32),
    #[error("{0}")]
    Store(String),
    #[error("session {session} of epoch {epoch} is over: the component follows a newer one")]
    StaleSession { epoch: u64, session: u64 },
    #[error("message {seq} was already handled in this session")]
    Duplicate { seq: u64 },
    #[error("message {seq} waited too long for the messages before it")]
    Gap { seq: u64 },
    #[error("too many messages waiting for their predecessors")]
    Busy,
    #[error("{0}")]
    Invalid(String),
    /// Refused before it changed anything: the disk is full.
    #[error("{0}")]
    NoSpace(String),
}

impl From<blockstore::Error> for ComponentError {
    fn from(error: blockstore::Error) -> Self {
        match error {
            blockstore::Error::Corrupt { blocks, .. } => ComponentError::Corrupt { blocks },
            blockstore::Error::StaleEpoch { epoch, current } => stale(epoch, current),
            error @ blockstore::Error::NoSpace { .. } => ComponentError::NoSpace(error.to_string()),
            other => ComponentError::Store(other.to_string()),
        }
    }
}

pub fn frame<H: Serialize>(header: &H, data: &[u8]) -> Bytes {
    let header = postcard::to_stdvec(header).expect("postcard encoding to a Vec cannot fail");
    let mut out = BytesMut::with_capacity(4 + header.len() + data.len());
    out.put_u32_le(header.len() as u32);
    out.extend_from_slice(&header);
    out.extend_from_slice(data);
    out.freeze()
}

pub fn unframe<H: for<'de> Deserialize<'de>>(payload: &Bytes) -> Result<(H, Bytes), String> {
    let length = payload.get(..4).ok_or("payload shorter than its header length")?;
    let length = u32::from_le_bytes(length.try_into().expect("4 bytes")) as usize;
    let end = 4usize.checked_add(length).filter(|end| *end <= payload.len()).ok_or("header runs past the payload")?;
    let header = postcard::from_bytes(&payload[4..end]).map_err(|error| error.to_string())?;
    Ok((header, payload.slice(end..)))
}

/// Messages parked per component waiting for their predecessors, at most.
const PARKED_MAX: usize = 1024;
/// How long a message waits for its predecessors.
const GAP_TIMEOUT: Duration = Duration::from_secs(5);

type Started = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(Reply, Bytes), ComponentError>> + Send>>;

struct Parked {
    epoch: u64,
    request: Request,
    data: Bytes,
    own: Option<Bytes>,
    started: tokio::sync::oneshot::Sender<Result<Started, ComponentError>>,
}

/// The ordered stream of one owner session to one component.
struct Session {
    epoch: u64,
    session: u64,
    next: u64,
    parked: std::collections::BTreeMap<u64, Parked>,
}

/// Refuses an owner epoch below the component's (counting fences queued).
fn refuse_stale(disk: &Disk, component: ComponentId, epoch: u64) -> Result<u64, ComponentError> {
    let current = disk.accepted_epoch(component)?;
    if epoch < current {
        return Err(stale(epoch, current));
    }
    Ok(current)
}

fn stale(epoch: u64, current: u64) -> ComponentError {
    metrics::counter!("objects_stale_epoch_refusals_total").increment(1);
    ComponentError::StaleEpoch { epoch, current }
}

/// Refuses a stale epoch; a newer one is handed to the journal now, and
/// the wait for it returned.
fn fence(
    disk: &Disk,
    component: ComponentId,
    epoch: u64,
) -> Result<Option<impl std::future::Future<Output = blockstore::Result<()>> + Send + 'static>, ComponentError> {
    Ok(disk.submit_in_epoch(component, epoch, None)?.0)
}

fn bitmap_bytes(bitmap: roaring::RoaringBitmap) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(bitmap.serialized_size());
    bitmap.serialize_into(&mut bytes).expect("writing to a Vec cannot fail");
    bytes
}

/// A host's component service: its disks and the components on them.
pub struct Service {
    disks: Vec<Disk>,
    located: RwLock<HashMap<ComponentId, usize>>,
    sessions: std::sync::Mutex<HashMap<ComponentId, Session>>,
}

impl Service {
    pub fn new(disks: Vec<Disk>) -> Arc<Service> {
        let mut located = HashMap::new();
        for (index, disk) in disks.iter().enumerate() {
            for component in disk.components() {
                located.insert(component.id, index);
            }
        }
        Arc::new(Service { disks, located: RwLock::new(located), sessions: std::sync::Mutex::new(HashMap::new()) })
    }

    pub fn disks(&self) -> &[Disk] {
        &self.disks
    }

    /// Deletes a component this host holds (one no object names any more).
    pub async fn remove(&self, component: ComponentId) -> Result<(), ComponentError> {
        self.disk_of(component)?.delete(component).await?;
        self.located.write().expect("located lock").remove(&component);
        self.sessions.lock().expect("sessions lock").remove(&component);
        Ok(())
    }

    fn disk_of(&self, component: ComponentId) -> Result<&Disk, ComponentError> {
        let index = self.located.read().expect("located lock").get(&component).copied();
        index
            .map(|index| &self.disks[index])
            .ok_or_else(|| ComponentError::Store(blockstore::Error::NoSuchComponent(component).to_string()))
    }

    /// Serves one request; returns the reply header and its data.
    pub async fn serve(&self, envelope: Envelope, data: Bytes) -> (Reply, Bytes) {
        match self.serve_inner(envelope, data).await {
            Ok(reply) => reply,
            Err(error) => (Reply::Error(error), Bytes::new()),
        }
    }

    /// An ordered message: handed to the block store in `seq` order within
    /// its session (waiting for its predecessors if it came early), then
    /// awaited concurrently with the others.
    async fn serve_ordered(
        &self,
        envelope: Envelope,
        data: Bytes,
        own: Option<Bytes>,
    ) -> Result<(Reply, Bytes), ComponentError> {
        let Envelope { epoch, session, seq, request } = envelope;
        let component = request.component();
        let waiting = {
            let mut sessions = self.sessions.lock().expect("sessions lock");
            let state = sessions.entry(component).or_insert_with(|| Session {
                epoch,
                session,
                next: 1,
                parked: Default::default(),
            });
            if epoch < state.epoch {
                return Err(ComponentError::StaleEpoch { epoch, current: state.epoch });
            }
            if (epoch, session) < (state.epoch, state.session) {
                return Err(ComponentError::StaleSession { epoch, session });
            }
            if (epoch, session) > (state.epoch, state.session) {
                for (_, parked) in std::mem::take(&mut state.parked) {
                    let _ = parked
                        .started
                        .send(Err(ComponentError::StaleSession { epoch: state.epoch, session: state.session }));
                }
                *state = Session { epoch, session, next: 1, parked: Default::default() };
            }
            if seq < state.next {
                return Err(ComponentError::Duplicate { seq });
            }
            if seq > state.next {
                if state.parked.len() >= PARKED_MAX {
                    return Err(ComponentError::Busy);
                }
                let (started, wait) = tokio::sync::oneshot::channel();
                state.parked.insert(seq, Parked { epoch, request, data, own, started });
                Err(wait)
            } else {
                let started = self.start(epoch, request, data, own);
                state.next += 1;
                while let Some(parked) = state.parked.remove(&state.next) {
                    let _ = parked.started.send(self.start(parked.epoch, parked.request, parked.data, parked.own));
                    state.next += 1;
                }
                Ok(started)
            }
        };
        let started = match waiting {
            Ok(started) => started?,
            Err(wait) => match tokio::time::timeout(GAP_TIMEOUT, wait).await {
                Ok(Ok(started)) => started?,
                Ok(Err(_)) => return Err(ComponentError::Gap { seq }),
                Err(_) => {
                    let mut sessions = self.sessions.lock().expect("sessions lock");
                    if let Some(state) = sessions.get_mut(&component) {
                        state.parked.remove(&seq);
                    }
                    metrics::counter!("objects_ordering_gaps_total").increment(1);
                    return Err(ComponentError::Gap { seq });
                }
            },
        };
        started.await
    }

    /// Checks the epoch and hands the request to the block store now;
    /// returns the wait for its durability.
    /// `own`: the before-image a `local` chunk write's component read on
    /// arrival ([`Service::own_before_image`]).
    fn start(&self, epoch: u64, request: Request, data: Bytes, own: Option<Bytes>) -> Result<Started, ComponentError> {
        use blockstore::Record;
        let component = request.component();
        let disk = self.disk_of(component)?.clone();
        let mut reply = Reply::Done;
        if let Request::Write { settled, .. }
        | Request::Unmap { settled, .. }
        | Request::ChunkWrite { settled, .. }
        | Request::ChunkUnmap { settled, .. } = request
        {
            disk.resume(component, settled);
        }
        let record = match request {
            Request::Write { lsn, first, .. } => Record::Write { component, lsn, first, data },
            Request::Unmap { lsn, first, count, .. } => Record::Unmap { component, lsn, first, count },
            Request::Track { stale, seed, .. } => Record::Track { component, stale, seed },
            Request::Untrack { stale, .. } => Record::Untrack { component, stale },
            Request::BeginSync { stale, target, plan, .. } => {
                if target < stale || plan == 0 {
                    return Err(ComponentError::Invalid(format!("resync plan {plan} from {stale} to {target}")));
                }
                Record::BeginSync { component, stale, target, plan }
            }
            Request::SyncWrite { plan, first, .. } => {
                if plan == 0 {
                    return Err(ComponentError::Invalid("a resync write of plan 0".into()));
                }
                Record::SyncWrite { component, plan, first, data }
            }
            Request::Repair { first, .. } => Record::Repair { component, first, data },
            Request::ChunkWrite { lsn, first, stable, local: true, .. } => {
                let undo =
                    own.ok_or_else(|| ComponentError::Invalid("a chunk write's own before-image was not read".into()))?;
                Record::ChunkWrite { component, lsn, first, stable, undo, data }
            }
            Request::ChunkWrite { lsn, first, stable, .. } => {
                if !(data.len() / BLOCK_SIZE).is_multiple_of(2) || !data.len().is_multiple_of(BLOCK_SIZE) {
                    return Err(ComponentError::Invalid(format!(
                        "a chunk write of {} bytes is not new and old blocks in equal parts",
                        data.len()
                    )));
                }
                let half = data.len() / 2;
                Record::ChunkWrite { component, lsn, first, stable, undo: data.slice(half..), data: data.slice(..half) }
            }
            Request::ChunkUnmap { lsn, first, count, stable, .. } => {
                Record::ChunkUnmap { component, lsn, first, count, stable }
            }
            Request::RollBack { to, .. } => {
                reply = Reply::RolledBack(disk.unmapped_above(component, to)?);
                Record::RollBack { component, to }
            }
            Request::EndSync { plan, .. } => {
                let ended = disk.sync_plan(component)?.is_some_and(|(current, _, _)| plan == 0 || current == plan);
                reply = Reply::Ended(ended);
                Record::EndSync { component, plan }
            }
            other => return Err(ComponentError::Invalid(format!("{other:?} is not an ordered request"))),
        };
        // Checked against the epoch and queued behind any newer owner's
        // fence in one step (a fence queued meanwhile would let a deposed
        // owner's write in behind it).
        let (fence, wait) = disk.submit_in_epoch(component, epoch, Some(record))?;
        Ok(Box::pin(async move {
            if let Some(fence) = fence {
                fence.await?;
            }
            if let Some(wait) = wait {
                wait.await?;
            }
            Ok((reply, Bytes::new()))
        }))
    }

    /// For a chunk write whose before-image this component is to read
    /// itself (`local`): the blocks as they stand. Read on arrival,
    /// outside the sessions' lock: the owner sends it only to a component
    /// it holds up to date, once every earlier write to those rows is on
    /// it (the stripe lock), so they are what the write replaces.
    fn own_before_image(&self, request: &Request, data: &Bytes) -> Result<Option<Bytes>, ComponentError> {
        let Request::ChunkWrite { component, first, local: true, .. } = *request else { return Ok(None) };
        if data.is_empty() || !data.len().is_multiple_of(BLOCK_SIZE) {
            return Err(ComponentError::Invalid(format!("a chunk write of {} bytes", data.len())));
        }
        Ok(Some(self.disk_of(component)?.read(component, first, (data.len() / BLOCK_SIZE) as u64)?))
    }

    async fn serve_inner(&self, envelope: Envelope, data: Bytes) -> Result<(Reply, Bytes), ComponentError> {
        let own = self.own_before_image(&envelope.request, &data)?;
        if envelope.seq > 0 {
            return self.serve_ordered(envelope, data, own).await;
        }
        let Envelope { epoch, request, .. } = envelope;
        let done = Ok((Reply::Done, Bytes::new()));
        if let Request::Create { component, disk, blocks } = request {
            let store = self.disks.get(disk as usize).ok_or(ComponentError::NoSuchDisk(disk))?;
            match store.create(component, blocks).await {
                Ok(()) | Err(blockstore::Error::Exists(_)) => {}
                Err(error) => return Err(error.into()),
            }
            self.located.write().expect("located lock").insert(component, disk as usize);
            if let Some(fence) = fence(store, component, epoch)? {
                fence.await?;
            }
            return done;
        }
        let component = request.component();
        let disk = self.disk_of(component)?;
        match request {
            Request::Delete { .. } => {
                if let Some(fence) = fence(disk, component, epoch)? {
                    fence.await?;
                }
                disk.delete(component).await?;
                self.located.write().expect("located lock").remove(&component);
                done
            }
            // Queries: a stale owner is refused, without fencing.
            Request::Read { first, count, .. } => {
                refuse_stale(disk, component, epoch)?;
                Ok((Reply::Data, disk.read(component, first, count)?))
            }
            Request::Provisioning { first, count, .. } => {
                refuse_stale(disk, component, epoch)?;
                let (mapped, blocks) = disk.provisioning(component, first, count)?;
                Ok((Reply::Provisioned { mapped, blocks }, Bytes::new()))
            }
            Request::TrackingBitmap { stale, .. } => {
                Ok((Reply::Bitmap(disk.tracking_bitmap(component, stale)?.map(bitmap_bytes)), Bytes::new()))
            }
            Request::SyncBitmap { .. } => {
                Ok((Reply::Bitmap(disk.sync_bitmap(component)?.map(bitmap_bytes)), Bytes::new()))
            }
            Request::WrittenSince { stale, .. } => {
                Ok((Reply::Bitmap(disk.written_since(component, stale)?.map(bitmap_bytes)), Bytes::new()))
            }
            Request::Allocated { .. } => {
                refuse_stale(disk, component, epoch)?;
                let among = roaring::RoaringBitmap::deserialize_from(&data[..])
                    .map_err(|error| ComponentError::Store(format!("the block bitmap does not decode: {error}")))?;
                Ok((Reply::Bitmap(Some(bitmap_bytes(disk.allocated_among(component, &among)?))), Bytes::new()))
            }
            // A newer owner's first question also fences the older one:
            // once answered, the committed LSN it reports can only grow
            // by the newer owner's writes.
            Request::Info { .. } => {
                if let Some(fence) = fence(disk, component, epoch)? {
                    fence.await?;
                }
                Ok((Reply::Info(disk.component(component)?), Bytes::new()))
            }
            // Changes: the same path as an ordered session's, unordered.
            other => self.start(epoch, other, data, own)?.await,
        }
    }

    /// Serves the wire method.
    pub async fn handle(self: Arc<Self>, request: wire::Request) -> Result<Bytes, RemoteError> {
        if request.method != METHOD {
            return Err(RemoteError::new(ErrorCode::UnknownMethod, format!("unknown method {:#06x}", request.method)));
        }
        let (envelope, data): (Envelope, Bytes) = unframe(&request.payload).map_err(|reason| {
            tracing::warn!(peer = %request.peer, %reason, "component request did not decode");
            RemoteError::new(ErrorCode::BadRequest, format!("component request: {reason}"))
        })?;
        let (reply, data) = self.serve(envelope, data).await;
        Ok(frame(&reply, &data))
    }
}

/// An owner's view of one component host.
#[derive(Clone)]
pub struct Client<T: Transport> {
    transport: T,
    address: Arc<str>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Component(#[from] ComponentError),
    #[error(transparent)]
    Call(#[from] wire::CallError),
    #[error("unexpected reply: {0}")]
    Protocol(String),
    /// Not sent: the owner's object is closed (deposed or stopped).
    #[error("the object is closed")]
    Closed,
}

impl<T: Transport> Client<T> {
    pub fn new(transport: T, address: impl Into<String>) -> Client<T> {
        Client { transport, address: Arc::from(address.into()) }
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// Whether the component host is this process (calls skip the socket).
    pub fn is_in_place(&self) -> bool {
        self.transport.serves_in_place(&self.address)
    }

    /// The same transport, another address (the host restarted and
    /// listens elsewhere).
    pub fn with_address(&self, address: impl Into<String>) -> Client<T> {
        Client::new(self.transport.clone(), address)
    }

    /// The same address through another transport (another thread's).
    pub fn with_transport(&self, transport: T) -> Client<T> {
        Client { transport, address: self.address.clone() }
    }

    /// An unordered request (reads, queries, create, and tests).
    pub async fn call(&self, epoch: u64, request: Request, data: &[u8]) -> Result<(Reply, Bytes), ClientError> {
        self.call_in(epoch, 0, 0, request, data).await
    }

    /// Message `seq` (from 1) of the owner's `session` with the component:
    /// the component hands them to its store in `seq` order.
    pub async fn call_in(
        &self,
        epoch: u64,
        session: u64,
        seq: u64,
        request: Request,
        data: &[u8],
    ) -> Result<(Reply, Bytes), ClientError> {
        let payload = frame(&Envelope { epoch, session, seq, request }, data);
        let reply = self.transport.call(&self.address, METHOD, payload, CALL_TIMEOUT).await?;
        let (reply, data): (Reply, Bytes) = unframe(&reply).map_err(ClientError::Protocol)?;
        match reply {
            Reply::Error(error) => Err(error.into()),
            other => Ok((other, data)),
        }
    }

    pub async fn write(
        &self,
        epoch: u64,
        component: ComponentId,
        lsn: Lsn,
        first: u64,
        data: &[u8],
    ) -> Result<(), ClientError> {
        debug_assert!(data.len().is_multiple_of(BLOCK_SIZE));
        self.call(epoch, Request::Write { component, lsn, first, settled: 0 }, data).await.map(|_| ())
    }

    pub async fn read(&self, epoch: u64, component: ComponentId, first: u64, count: u64) -> Result<Bytes, ClientError> {
        match self.call(epoch, Request::Read { component, first, count }, &[]).await? {
            (Reply::Data, data) => Ok(data),
            (other, _) => Err(ClientError::Protocol(format!("{other:?} to a read"))),
        }
    }

    pub async fn provisioning(
        &self,
        epoch: u64,
        component: ComponentId,
        first: u64,
        count: u64,
    ) -> Result<(bool, u64), ClientError> {
        match self.call(epoch, Request::Provisioning { component, first, count }, &[]).await? {
            (Reply::Provisioned { mapped, blocks }, _) => Ok((mapped, blocks)),
            (other, _) => Err(ClientError::Protocol(format!("{other:?} to a provisioning query"))),
        }
    }

    /// The blocks of `among` allocated on the component.
    pub async fn allocated(
        &self,
        epoch: u64,
        component: ComponentId,
        among: &roaring::RoaringBitmap,
    ) -> Result<roaring::RoaringBitmap, ClientError> {
        match self.call(epoch, Request::Allocated { component }, &bitmap_bytes(among.clone())).await? {
            (Reply::Bitmap(Some(bytes)), _) => roaring::RoaringBitmap::deserialize_from(&bytes[..])
                .map_err(|error| ClientError::Protocol(format!("allocated blocks do not decode: {error}"))),
            (other, _) => Err(ClientError::Protocol(format!("{other:?} to an allocation query"))),
        }
    }

    pub async fn info(&self, epoch: u64, component: ComponentId) -> Result<ComponentInfo, ClientError> {
        match self.call(epoch, Request::Info { component }, &[]).await? {
            (Reply::Info(info), _) => Ok(info),
            (other, _) => Err(ClientError::Protocol(format!("{other:?} to an info request"))),
        }
    }
}
