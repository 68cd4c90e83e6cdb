//! The owner of one object, sans-IO: LSNs, fan-out, acknowledgement,
//! degraded mode, tracking for absent components, and the choice of resync
//! source when one comes back (see `docs/design/objects.md`).
//!
//! The I/O layer feeds it [`Input`]s and carries out its [`Action`]s: sends
//! writes to components (each component's connection delivers in order),
//! answers clients, runs resync jobs, records component states in the
//! catalog.

use std::collections::{BTreeMap, BTreeSet};

use blockstore::Lsn;
use serde::{Deserialize, Serialize};

/// A component's place in the object's layout.
pub type Index = usize;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Active,
    /// Unavailable since `since` (ms); it has every write up to `stale`.
    Absent {
        stale: Lsn,
        since: u64,
    },
    /// Coming back: has everything up to `stale`, is being brought to
    /// `target` by a resync, and receives every new write meanwhile.
    Resyncing {
        stale: Lsn,
        target: Lsn,
    },
}

/// Where a resync copies from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The blocks marked in `source`'s tracking bitmap for `tracking`
    /// (equal to the stale LSN, or the largest below it: a superset).
    Tracked { source: Index, tracking: Lsn },
    /// No tracking bitmap covers the absence: every block (allocated on the
    /// source: copied; not allocated there: deallocated on the component).
    FullCopy { source: Index },
}

impl Source {
    /// The component copied from.
    pub fn index(&self) -> Index {
        match self {
            Source::Tracked { source, .. } | Source::FullCopy { source } => *source,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Write { first: u64, count: u64 },
    Unmap { first: u64, count: u64 },
}

impl Op {
    fn range(&self) -> (u64, u64) {
        match self {
            Op::Write { first, count } | Op::Unmap { first, count } => (*first, *count),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send the client's operation, under `lsn`, to `component`.
    Send {
        component: Index,
        lsn: Lsn,
        request: u64,
    },
    /// The client's operation is durable on every active component.
    Done {
        request: u64,
        lsn: Lsn,
    },
    /// The object cannot take I/O: no active component.
    Refused {
        request: u64,
    },
    /// The operation was not carried out: every copy it was sent to had no
    /// room for it (and changed nothing).
    NoSpace {
        request: u64,
    },
    /// Start a tracking bitmap on `component` for a peer stale at `stale`,
    /// seeded with these block ranges (writes above `stale` it may already
    /// have).
    Track {
        component: Index,
        stale: Lsn,
        seed: Vec<(u64, u64)>,
    },
    Untrack {
        component: Index,
        stale: Lsn,
    },
    /// Bring `component` from `stale` to `target`: begin; wait until the
    /// source reports `ready` as its committed LSN (it then has every write
    /// sent to it so far, and the tracking bitmap sent before them; LSNs
    /// refused while every copy was away are never sent to anyone); copy;
    /// end behind the writes already sent to the component.
    /// `plan` identifies this resync (the block store keeps a
    /// synchronization bitmap per plan; see `blockstore::Disk::begin_sync`).
    Resync {
        component: Index,
        stale: Lsn,
        target: Lsn,
        source: Source,
        ready: Lsn,
        plan: u64,
    },
    /// `component` is the copy of record as it stands (every other copy
    /// was away): drop any resync state it has, and go on from there. Sent
    /// in order behind the writes already sent to it.
    Current {
        component: Index,
    },
    /// Erasure-coded, with fewer than k components active: roll each of
    /// `components` back to `to` (in order behind what was sent to it),
    /// then report [`Input::Readmitted`]. Each holds every write answered
    /// done, so once none holds anything above `to` every stripe is one
    /// codeword again and they are the object's active components. Comes
    /// after an [`Action::Persist`] of states counting no component above
    /// `to`: no rollback is sent before that is recorded (an owner deposed
    /// mid-readmission would otherwise leave a record above what the disks
    /// hold, and no new owner could open the object).
    Readmit {
        components: Vec<Index>,
        to: Lsn,
    },
    /// The component states changed: record them in the catalog.
    Persist,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// A client operation (`request` identifies it to the caller).
    Submit { request: u64, op: Op },
    /// `component` made `lsn` durable.
    Acked { component: Index, lsn: Lsn },
    /// `component` could not (or its host or disk is gone).
    Failed { component: Index },
    /// `component` refused `lsn` for want of space, having changed
    /// nothing. Settled once every active copy has answered: if every copy
    /// it was sent to declined it, it is refused for all (`NoSpace`) and
    /// they go on; otherwise the copies that declined it have failed.
    Declined { component: Index, lsn: Lsn },
    /// A `Track` action was carried out (informational: the owner counts a
    /// tracking bitmap from when it sends it, as the connection keeps order).
    Tracking { component: Index, stale: Lsn },
    /// An absent component is reachable again, with everything up to
    /// `committed` (its own committed LSN) and writes up to `newest` (above
    /// `committed` in the middle of a resync). `mid_resync`: its disk is in
    /// the middle of a resync (rows rebuilt from others that no rollback
    /// can undo), so it can only be resynced, never readmitted as it stands.
    Back { component: Index, committed: Lsn, newest: Lsn, mid_resync: bool },
    /// The rollback of a [`Action::Readmit`] ended: every component
    /// answered it (`rolled_back`), or some did not (they fail).
    Readmitted { rolled_back: bool },
    /// Resync `plan` of `component` finished (its end was acknowledged
    /// after every write sent to it before). The end of a resync planned
    /// before the current one is ignored.
    Resynced { component: Index, plan: u64 },
}

struct Pending {
    request: u64,
    op: Op,
    /// Active components that have not acknowledged yet.
    waiting: BTreeSet<Index>,
    /// Components that acknowledged it and still count as holding it (one
    /// that fails later is current only to its stale LSN). If none is left
    /// when no active component owes it, it is not done: it is refused.
    holders: BTreeSet<Index>,
    /// The components it was sent to.
    sent: BTreeSet<Index>,
    /// Active components that declined it for want of space (having
    /// changed nothing): they go on if every copy it was sent to declined
    /// it, and fail otherwise (another copy holds it or may hold it).
    declined_by: BTreeSet<Index>,
    /// Every component that declined it, by whatever path (one resyncing
    /// fails at once): none of them holds it.
    refused: BTreeSet<Index>,
    /// How many declined it while active and waited for: with room, each
    /// would have been a holder.
    short_of_room: usize,
}

struct Component {
    status: Status,
    /// Every LSN up to this one is durable there.
    acked: Lsn,
    /// Acknowledged above `acked`, out of order.
    acked_above: BTreeSet<Lsn>,
    /// Stale LSNs this component holds tracking bitmaps for (sent to it).
    tracking: BTreeSet<Lsn>,
    /// The newest LSN sent to it (or that it held when it became current).
    last_sent: Lsn,
    /// LSNs sent to it that it has not answered yet.
    unanswered: BTreeSet<Lsn>,
    /// Writes it declined that another copy may hold, until a resync makes
    /// it whole (or every copy declined them): it may hold later writes,
    /// so its committed LSN says nothing of what it holds from the first.
    holes: BTreeSet<Lsn>,
    /// Every write up to here it declined was declined by every copy
    /// (answered no space): it may take writes again (its block store
    /// refuses them after a refusal until told so).
    settled: Lsn,
    /// While resyncing: the component it copies from, the tracking bitmap
    /// it copies by, and the plan.
    source: Option<Index>,
    uses: Option<Lsn>,
    plan: u64,
    /// `Owner::records` when it was last active: below it, it was away
    /// when the current copy of record was made, and since.
    record: u64,
}

pub struct Owner {
    components: Vec<Component>,
    last_lsn: Lsn,
    pending: BTreeMap<Lsn, Pending>,
    /// The operations not yet acknowledged by every component that is not
    /// absent: the seed of a tracking bitmap when one becomes absent.
    history: BTreeMap<Lsn, (u64, u64)>,
    /// Every operation up to this LSN has left `history`.
    history_floor: Lsn,
    /// The newest LSN answered as done.
    done_lsn: Lsn,
    /// Components that must hold a write for it to be done: 1 for copies
    /// (any copy holds all of it), k for an erasure-coded object (fewer
    /// chunks of a row cannot be decoded).
    holders_needed: usize,
    /// The last resync plan issued.
    plans: u64,
    /// After every component was absent, the one that came back first
    /// became the copy of record at `.0`; writes up to `.1` were issued
    /// before, and a component holding some of them above `.0` diverged.
    restarted: Option<(Lsn, Lsn)>,
    /// Erasure-coded, while fewer than k components are active: absent
    /// components that answered since, with the LSN each is known to hold
    /// up to (see `readmit`).
    returned: BTreeMap<Index, Lsn>,
    /// A readmission under way: its components and the LSN they roll back to.
    readmitting: Option<(Vec<Index>, Lsn)>,
    /// Copies recorded active under the previous owner that did not answer
    /// when this one opened (or answered behind, and are resynced at once),
    /// and away since: they hold every write answered done before
    /// it opened (a write is answered only once every copy recorded active
    /// holds it), if not every write in flight then. Emptied once this
    /// owner answers a write done or serves data (a copy of the set may
    /// lack both), or makes a copy of record (the LSNs above a copy's own
    /// then mean this owner's writes, refused, where the set's copies may
    /// hold the older owner's under them).
    held_every_done: BTreeSet<Index>,
    /// Copies of record made since this owner opened. Once one is made,
    /// only copies active since can be the next (`Component::record`): it
    /// may hold writes in flight when every copy went away, which another
    /// copy lacks, and which reads have shown since.
    records: u64,
}

impl Component {
    /// Counts `lsn` as answered for good; `acked` rises over every LSN
    /// answered in a row.
    fn acknowledge(&mut self, lsn: Lsn) {
        self.acked_above.insert(lsn);
        while self.acked_above.remove(&(self.acked + 1)) {
            self.acked += 1;
        }
    }
}

impl Owner {
    /// An owner for an object whose components are all current up to
    /// `committed` (a new object: 0), or in the given states.
    pub fn new(statuses: Vec<Status>, committed: Lsn) -> Owner {
        let components = statuses
            .into_iter()
            .map(|status| {
                let acked = match status {
                    Status::Active => committed,
                    Status::Absent { stale, .. } | Status::Resyncing { stale, .. } => stale,
                };
                Component {
                    status,
                    acked,
                    acked_above: BTreeSet::new(),
                    tracking: BTreeSet::new(),
                    last_sent: acked,
                    unanswered: BTreeSet::new(),
                    holes: BTreeSet::new(),
                    settled: 0,
                    source: None,
                    uses: None,
                    plan: 0,
                    record: 0,
                }
            })
            .collect();
        Owner {
            components,
            last_lsn: committed,
            pending: BTreeMap::new(),
            history: BTreeMap::new(),
            history_floor: committed,
            done_lsn: committed,
            holders_needed: 1,
            plans: 0,
            restarted: None,
            returned: BTreeMap::new(),
            readmitting: None,
            held_every_done: BTreeSet::new(),
            records: 0,
        }
    }

    /// These copies, away, were recorded active under the previous owner
    /// (see `held_every_done`): until this owner answers a write, serves
    /// data or makes a copy of record, one that comes back when every other
    /// copy is away can be the copy of record.
    pub fn holding_every_write_done_before(mut self, copies: impl IntoIterator<Item = Index>) -> Owner {
        self.held_every_done.extend(copies);
        self
    }

    /// The object chose copies to serve data from (a read, a compare, a
    /// provisioning query): a copy that may lack what it served must not
    /// be the copy of record after.
    pub fn served_data(&mut self) {
        self.held_every_done.clear();
    }

    /// A write is done only once `holders` components hold it (an
    /// erasure-coded object: its k); with fewer it is refused, as a write
    /// no component holds is.
    pub fn needing_holders(mut self, holders: usize) -> Owner {
        self.holders_needed = holders.max(1);
        self
    }

    /// Numbers new writes above `start` (a new owner: above every LSN any
    /// copy holds, so none is taken for one of an older owner's). The
    /// current copies count as acknowledged up to `start`, since the LSNs
    /// between are never issued, but what was sent to them stays what they
    /// hold: a resync copying from one waits for that, not for `start`.
    pub fn numbering_from(mut self, start: Lsn) -> Owner {
        if start <= self.last_lsn {
            return self;
        }
        for component in &mut self.components {
            if component.status == Status::Active {
                component.acked = start;
            }
        }
        self.last_lsn = start;
        self.history_floor = start;
        self
    }

    /// Numbers resync plans above `base`. A component that is told to begin
    /// a plan it already has keeps that plan's progress (its
    /// synchronization bitmap, which skips blocks it holds newer writes
    /// for): a new owner must never reuse a number an older owner gave, or
    /// it would inherit the older plan's bitmap, which may mark blocks the
    /// older owner wrote there alone and never had acknowledged.
    pub fn planning_above(mut self, base: u64) -> Owner {
        self.plans = self.plans.max(base);
        self
    }

    /// Records that `component` holds complete tracking bitmaps for these
    /// stale LSNs (a new owner learns them from the component).
    pub fn set_tracking(&mut self, component: Index, stale: impl IntoIterator<Item = Lsn>) {
        self.components[component].tracking.extend(stale);
    }

    pub fn status(&self, component: Index) -> &Status {
        &self.components[component].status
    }

    pub fn statuses(&self) -> Vec<Status> {
        self.components.iter().map(|component| component.status.clone()).collect()
    }

    pub fn last_lsn(&self) -> Lsn {
        self.last_lsn
    }

    /// Whether `component` is resyncing under `plan`.
    pub fn resyncing_under(&self, component: Index, plan: u64) -> bool {
        matches!(self.components[component].status, Status::Resyncing { .. }) && self.components[component].plan == plan
    }

    /// Every LSN up to this one is durable on every component not away.
    pub fn stable(&self) -> Lsn {
        self.history_floor
    }

    /// Every LSN up to this one is durable on `component`.
    pub fn acked_up_to(&self, component: Index) -> Lsn {
        self.components[component].acked
    }

    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Every write up to this LSN that `component` declined is settled (no
    /// copy holds it): sent with each write, so its store takes writes again.
    pub fn settled(&self, component: Index) -> Lsn {
        self.components[component].settled
    }

    /// Tracking bitmaps the owner knows `component` holds.
    pub fn tracking(&self, component: Index) -> &BTreeSet<Lsn> {
        &self.components[component].tracking
    }

    fn receives_writes(&self, index: Index) -> bool {
        !matches!(self.components[index].status, Status::Absent { .. })
    }

    pub fn handle(&mut self, now: u64, input: Input, out: &mut Vec<Action>) {
        match input {
            Input::Submit { request, op } => self.submit(request, op, out),
            Input::Acked { component, lsn } => self.acked(now, component, lsn, out),
            Input::Failed { component } => self.failed(now, component, out),
            Input::Declined { component, lsn } => self.declined(now, component, lsn, out),
            Input::Tracking { .. } => {}
            Input::Back { component, committed, newest, mid_resync } => {
                if self.erasure_unavailable() {
                    self.returned_while_unavailable(component, committed, mid_resync, out);
                } else {
                    self.back(component, committed, newest, false, out);
                }
            }
            Input::Readmitted { rolled_back } => {
                self.readmitted(now, rolled_back, out);
            }
            Input::Resynced { component, plan } => self.resynced(now, component, plan, out),
        }
    }

    /// Components active now.
    pub fn active_count(&self) -> usize {
        self.components.iter().filter(|component| component.status == Status::Active).count()
    }

    /// Erasure-coded, with fewer than k components active: no chunk can
    /// be rebuilt, so nothing is resynced (see `readmit`).
    fn erasure_unavailable(&self) -> bool {
        self.holders_needed > 1 && self.active_count() < self.holders_needed
    }

    /// Every component counts as holding no more than `to`: a readmission
    /// rolls back to it. What is recorded must not exceed what the disks
    /// hold once rolled back, or no new owner finds k components holding
    /// the k-th highest recorded stale LSN. Nothing is pending, so no
    /// acknowledgement counts on what this lowers.
    fn hold_no_more_than(&mut self, to: Lsn) {
        for component in &mut self.components {
            match component.status {
                Status::Absent { stale, since } if stale > to => {
                    component.status = Status::Absent { stale: to, since };
                    component.acked = to;
                }
                // Stalled (nothing can be rebuilt): if it fails, it is
                // current only to here.
                Status::Resyncing { stale, target } if stale > to => {
                    component.status = Status::Resyncing { stale: to, target };
                }
                Status::Active if component.acked > to => {
                    component.acked = to;
                    component.acked_above.clear();
                }
                _ => {}
            }
        }
    }

    /// Whether a readmission's rollback is under way.
    pub fn readmitting(&self) -> bool {
        self.readmitting.is_some()
    }

    /// The newest LSN answered as done.
    pub fn done_lsn(&self) -> Lsn {
        self.done_lsn
    }

    fn submit(&mut self, request: u64, op: Op, out: &mut Vec<Action>) {
        let active: BTreeSet<Index> = (0..self.components.len())
            .filter(|index| matches!(self.components[*index].status, Status::Active))
            .collect();
        // Fewer than the holders a write needs: it could only be refused
        // (and an erasure-coded write would leave chunks to roll back).
        if active.len() < self.holders_needed || self.readmitting.is_some() {
            out.push(Action::Refused { request });
            return;
        }
        self.last_lsn += 1;
        let lsn = self.last_lsn;
        let mut sent = BTreeSet::new();
        for index in 0..self.components.len() {
            if self.receives_writes(index) {
                self.components[index].last_sent = lsn;
                self.components[index].unanswered.insert(lsn);
                sent.insert(index);
                out.push(Action::Send { component: index, lsn, request });
            }
        }
        self.history.insert(lsn, op.range());
        let pending = Pending {
            request,
            op,
            waiting: active,
            holders: BTreeSet::new(),
            sent,
            declined_by: BTreeSet::new(),
            refused: BTreeSet::new(),
            short_of_room: 0,
        };
        self.pending.insert(lsn, pending);
    }

    pub fn op(&self, lsn: Lsn) -> Option<&Op> {
        self.pending.get(&lsn).map(|pending| &pending.op)
    }

    fn acked(&mut self, now: u64, index: Index, lsn: Lsn, out: &mut Vec<Action>) {
        let component = &mut self.components[index];
        component.unanswered.remove(&lsn);
        if matches!(component.status, Status::Absent { .. }) || lsn <= component.acked {
            return;
        }
        // A write a readmission rolls back (one sent to a component while
        // it resynced, answered late): it counts for nothing, and no count
        // rises above what is recorded before the rollbacks (see `readmit`).
        if self.readmitting.as_ref().is_some_and(|(_, to)| lsn > *to) {
            return;
        }
        component.acknowledge(lsn);
        if let Some(pending) = self.pending.get_mut(&lsn) {
            if pending.waiting.remove(&index) {
                pending.holders.insert(index);
            }
        }
        self.complete(now, out);
        self.prune_history();
    }

    fn declined(&mut self, now: u64, index: Index, lsn: Lsn, out: &mut Vec<Action>) {
        let component = &self.components[index];
        let answered = !self.pending.contains_key(&lsn);
        if let Some(pending) = self.pending.get_mut(&lsn) {
            pending.refused.insert(index);
        }
        if matches!(component.status, Status::Absent { .. }) {
            self.components[index].unanswered.remove(&lsn);
            return;
        }
        if let Some(pending) = self.pending.get_mut(&lsn).filter(|pending| pending.waiting.contains(&index)) {
            // Settled when every active copy has answered (`complete`); a
            // source it is until then (see `holds`).
            pending.waiting.remove(&index);
            pending.declined_by.insert(index);
            pending.short_of_room += 1;
            self.components[index].holes.insert(lsn);
        } else if answered && component.status == Status::Active && lsn <= component.acked {
            // Answered before, and active since it was sent: it counts as
            // holding what every copy holds up to there (made the copy of
            // record, or resynced past it).
            self.components[index].unanswered.remove(&lsn);
        } else {
            // A copy still resyncing that misses a write: resynced again.
            self.fail_declining(now, index, lsn, out);
        }
        self.complete(now, out);
        self.prune_history();
    }

    /// `index` declined `lsn`, which another copy holds or may hold: it
    /// misses it, and holds everything only below it until resynced.
    fn fail_declining(&mut self, now: u64, index: Index, lsn: Lsn, out: &mut Vec<Action>) {
        self.mark_declining(index, lsn);
        self.failed(now, index, out);
    }

    fn mark_declining(&mut self, index: Index, lsn: Lsn) {
        tracing::warn!(component = index, lsn, "a copy has no room for a write another copy may hold");
        self.components[index].holes.insert(lsn);
    }

    /// Whether `component`, reporting `committed`, holds everything sent to
    /// it up to `ready`: it declined no write up to there that another copy
    /// may hold, and it committed `ready` or has answered every LSN sent to
    /// it above what it committed up to there (each one it did not commit,
    /// every copy declined, changing nothing: see [`Input::Declined`]).
    pub fn holds(&self, component: Index, committed: Lsn, ready: Lsn) -> bool {
        let component = &self.components[component];
        // A write it declined that another copy may hold is a hole below
        // its committed LSN.
        component.holes.range(..=ready).next().is_none()
            && (committed >= ready || component.unanswered.range(committed + 1..=ready).next().is_none())
    }

    /// Answers the operations no active component still owes, in LSN order
    /// (a client sees its writes complete in the order they were made);
    /// with none left, a readmission that waited for that may begin.
    fn complete(&mut self, now: u64, out: &mut Vec<Action>) {
        self.complete_in_order(now, out);
        if !self.returned.is_empty() {
            self.readmit(out);
        }
    }

    fn complete_in_order(&mut self, now: u64, out: &mut Vec<Action>) {
        while let Some((&lsn, pending)) = self.pending.first_key_value() {
            if !pending.waiting.is_empty() {
                break;
            }
            if !pending.declined_by.is_empty() {
                // Any copy it was sent to that did not decline it may hold
                // it (even one that failed since: the tracking bitmap it
                // will resync by may be older than this write).
                let may_hold =
                    !pending.holders.is_empty() || pending.sent.iter().any(|other| !pending.refused.contains(other));
                let pending = self.pending.get_mut(&lsn).expect("the first entry");
                let declined_by = std::mem::take(&mut pending.declined_by);
                if may_hold {
                    // All of them fail before anything more completes: a
                    // later write one of them holds must not be answered
                    // on its word.
                    for &index in &declined_by {
                        self.mark_declining(index, lsn);
                        self.mark_failed(now, index, out);
                    }
                    // As `failed` goes on: what is done is answered before
                    // a copy is taken for the copy of record.
                    self.complete(now, out);
                    self.prune_history();
                    for index in declined_by {
                        self.replan_resyncs_from(now, index, out);
                    }
                    continue;
                }
                // Nobody holds it: the copies that declined it changed
                // nothing, hold what every copy holds, and go on.
                for index in declined_by {
                    let component = &mut self.components[index];
                    component.holes.remove(&lsn);
                    component.unanswered.remove(&lsn);
                    component.settled = component.settled.max(lsn);
                    component.acknowledge(lsn);
                }
                let (_, pending) = self.pending.pop_first().expect("the first entry");
                out.push(Action::NoSpace { request: pending.request });
                continue;
            }
            let (lsn, pending) = self.pending.pop_first().expect("the first entry");
            // Holders it was not waiting for: a component that acknowledged
            // it while resyncing and is active since (or failed after that),
            // or resynced past it since it was sent. Any holder of a later
            // write holds this one too (acknowledgements count in LSN
            // order), so a write is never refused below one answered done:
            // an erasure-coded write refused there would stay on some
            // chunks of its stripe, below any LSN a readmission rolls back to.
            // Erasure coding only: copies need one holder, and a copy's
            // acknowledged LSN can stand for writes it never had (the copy
            // of record after every copy was away).
            let erasure = self.holders_needed > 1;
            let resynced_holders = (0..self.components.len())
                .filter(|_| erasure)
                .filter(|index| !pending.holders.contains(index) && !pending.refused.contains(index))
                .filter(|index| {
                    let component = &self.components[*index];
                    let acknowledged = component.acked >= lsn || component.acked_above.contains(&lsn);
                    match component.status {
                        Status::Active => acknowledged && !component.unanswered.contains(&lsn),
                        // Its chunk is there, but until its resync ends it
                        // may not count for anything (it fails back to its
                        // stale LSN, mid-resync, and cannot be readmitted).
                        Status::Resyncing { .. } => false,
                        // Durable there before it failed.
                        Status::Absent { stale, .. } => stale >= lsn && !component.holes.contains(&lsn),
                    }
                })
                .count();
            if pending.holders.len() + resynced_holders >= self.holders_needed {
                self.done_lsn = self.done_lsn.max(lsn);
                self.held_every_done.clear();
                out.push(Action::Done { request: pending.request, lsn });
            } else if erasure
                && pending.short_of_room > 0
                && pending.holders.len() + resynced_holders + pending.short_of_room >= self.holders_needed
            {
                // Too few holders because some components had no room (had
                // they taken it, it would be done): as every write refused
                // here, it is rolled back wherever it reached before the
                // object takes I/O again (a readmission or a new owner), so
                // it changes nothing, and the client learns why.
                out.push(Action::NoSpace { request: pending.request });
            } else {
                out.push(Action::Refused { request: pending.request });
            }
        }
    }

    fn prune_history(&mut self) {
        let floor = (0..self.components.len())
            .filter(|index| self.receives_writes(*index))
            .map(|index| self.components[index].acked)
            .min()
            .unwrap_or(self.last_lsn);
        while self.history.first_key_value().is_some_and(|(lsn, _)| *lsn <= floor) {
            self.history.pop_first();
        }
        self.history_floor = self.history_floor.max(floor);
    }

    fn failed(&mut self, now: u64, index: Index, out: &mut Vec<Action>) {
        if self.mark_failed(now, index, out) {
            self.complete(now, out);
            self.prune_history();
            self.replan_resyncs_from(now, index, out);
        }
    }

    /// Takes `index` for absent, and has the others track what it misses;
    /// false if it already was. Completing what waited for it is the
    /// caller's.
    fn mark_failed(&mut self, now: u64, index: Index, out: &mut Vec<Action>) -> bool {
        // A failed component is not readmitted, whatever its rollback said.
        if let Some((members, _)) = &mut self.readmitting {
            members.retain(|member| *member != index);
        }
        let stale = match self.components[index].status {
            Status::Absent { .. } => return false,
            // A resyncing component that fails is still only current to
            // where it started.
            Status::Resyncing { stale, .. } => stale,
            Status::Active => self.components[index].acked,
        };
        let component = &mut self.components[index];
        component.status = Status::Absent { stale, since: now };
        component.acked = stale;
        component.acked_above.clear();
        component.tracking.clear();
        component.unanswered.clear();
        for (lsn, pending) in self.pending.iter_mut() {
            pending.waiting.remove(&index);
            pending.declined_by.remove(&index);
            // Its acknowledgements above `stale` no longer count: nothing
            // says it holds them now.
            if *lsn > stale {
                pending.holders.remove(&index);
            }
        }
        // Every active component tracks what this one misses from now on,
        // seeded with the writes above `stale` that may have reached it. If
        // some of those have left the history (a component that failed in
        // the middle of its resync is current only to where the resync
        // began), no exact seed exists: it will resync from an older
        // tracking bitmap or by full copy.
        if stale < self.history_floor {
            tracing::info!(component = index, stale, floor = self.history_floor, "too far behind to track exactly");
            out.push(Action::Persist);
            return true;
        }
        let seed: Vec<(u64, u64)> = self.history.range(stale + 1..).map(|(_, range)| *range).collect();
        // The connection to each delivers in order, so a resync job that
        // finds the source caught up to its target finds the bitmap there.
        for other in 0..self.components.len() {
            if other != index
                && matches!(self.components[other].status, Status::Active)
                && self.components[other].tracking.insert(stale)
            {
                out.push(Action::Track { component: other, stale, seed: seed.clone() });
            }
        }
        out.push(Action::Persist);
        true
    }

    /// Resyncs that copied from `index` start again from another source
    /// (the new Resync action supersedes the old one's job).
    fn replan_resyncs_from(&mut self, now: u64, index: Index, out: &mut Vec<Action>) {
        let orphaned: Vec<(Index, Lsn)> = (0..self.components.len())
            .filter(|other| self.components[*other].source == Some(index))
            .filter_map(|other| match self.components[other].status {
                Status::Resyncing { stale, .. } => Some((other, stale)),
                _ => None,
            })
            .collect();
        for (other, stale) in orphaned {
            let component = &mut self.components[other];
            component.status = Status::Absent { stale, since: now };
            component.acked = stale;
            component.source = None;
            // Erasure-coded with fewer than k active: no chunk can be
            // rebuilt, so no new plan (one would also hide, on its disk,
            // the rows the old one rebuilt); it waits to be probed.
            if self.erasure_unavailable() {
                continue;
            }
            self.back(other, stale, stale, true, out);
        }
    }

    /// `connected`: the component's connection was never broken (a resync
    /// being planned again): what was sent to it will still arrive.
    /// Where the resync of an absent component that reports `committed`
    /// starts: at its recorded stale LSN, or lower if it holds less. Not
    /// higher even when it holds more: above its stale LSN it may hold
    /// writes no other copy has (a deposed owner's, never acknowledged), so
    /// its resync also copies what it wrote itself above this LSN.
    pub fn resync_from(&self, component: Index, committed: Lsn) -> Option<Lsn> {
        match self.components[component].status {
            Status::Absent { stale, .. } => Some(committed.min(stale).min(self.last_lsn)),
            _ => None,
        }
    }

    fn back(&mut self, index: Index, committed: Lsn, newest: Lsn, connected: bool, out: &mut Vec<Action>) {
        let Some(from) = self.resync_from(index, committed) else { return };
        // A copy that declined a write holds everything only below it.
        let committed = match self.components[index].holes.first() {
            Some(hole) => committed.min(hole - 1),
            None => committed,
        };
        let candidates: Vec<Index> = (0..self.components.len())
            .filter(|other| *other != index && matches!(self.components[*other].status, Status::Active))
            .collect();
        let Some(&first) = candidates.first() else {
            // Every other copy is away. One that has every write answered as
            // done becomes the copy of record; others wait for it. Counted
            // only up to where its resync would start: above its stale LSN
            // it may hold a deposed owner's writes under the same LSNs as
            // writes answered done here, which it does not have (a copy cut
            // off with its owner, written by it there). Or one recorded
            // active when this owner opened, before it answered a write,
            // served data or made a copy of record (`held_every_done`),
            // holding at least the lower bound it is recorded away at: it
            // holds every write answered done before, though perhaps not
            // every one in flight then, which others may hold (they
            // diverged, below).
            // A copy reporting nothing where the owner opened on written
            // data lost it (a component created again).
            let held_every_done = self.held_every_done.contains(&index)
                && matches!(self.components[index].status, Status::Absent { stale, .. } if committed >= stale)
                && (committed > 0 || self.done_lsn == 0);
            // After a copy of record, only a copy active since holds what
            // it held (writes that were in flight, and may have been read).
            if self.components[index].record != self.records {
                tracing::info!(
                    component = index,
                    committed,
                    "every copy is away; this one was away when the last copy of record was made"
                );
                return;
            }
            if committed.min(from) < self.done_lsn && !held_every_done {
                tracing::info!(
                    component = index,
                    committed,
                    done = self.done_lsn,
                    "every copy is away; this one lacks writes answered as done"
                );
                return;
            }
            tracing::warn!(component = index, committed, "every copy was away: this one is the copy of record now");
            if held_every_done {
                // Every write answered done is at or below what it holds:
                // counted so, it can be the copy of record again when it
                // comes back holding no less (the LSNs up to the open's it
                // lacks were never answered).
                self.done_lsn = self.done_lsn.min(committed.min(from));
            }
            self.held_every_done.clear();
            self.records += 1;
            self.restarted = Some((committed, self.last_lsn));
            // It may hold LSNs above any issued here (a deposed owner's,
            // cut off with it; up to `newest` if that owner was resyncing
            // it, which it now ends): new writes are numbered above them,
            // so no LSN stands for two writes and its committed LSN stays
            // that of the others that copy from it.
            let held = committed.max(newest);
            if held > self.last_lsn {
                self.last_lsn = held;
                self.history_floor = self.history_floor.max(held);
            }
            let component = &mut self.components[index];
            component.status = Status::Active;
            component.record = self.records;
            component.holes.clear();
            // The LSNs after `committed` issued before were refused: it has
            // everything that counts up to the last one.
            component.acked = self.last_lsn;
            if !connected {
                component.last_sent = committed;
            }
            component.acked_above.clear();
            component.tracking.clear();
            component.source = None;
            out.push(Action::Current { component: index });
            out.push(Action::Persist);
            return;
        };
        // Holding writes the copy of record never had: only a full copy
        // makes it the same.
        let diverged = self.restarted.is_some_and(|(basis, issued)| committed > basis && committed <= issued);
        let exact = candidates.iter().find(|other| self.components[**other].tracking.contains(&from));
        let source = match exact.filter(|_| !diverged) {
            _ if diverged => {
                tracing::warn!(component = index, from, "diverged after every copy was away: full copy");
                Source::FullCopy { source: first }
            }
            Some(source) => Source::Tracked { source: *source, tracking: from },
            None => {
                // The largest tracking LSN below `from`: a superset.
                let below = candidates
                    .iter()
                    .filter_map(|other| {
                        self.components[*other].tracking.range(..from).next_back().map(|lsn| (*lsn, *other))
                    })
                    .max();
                match below {
                    Some((tracking, source)) => {
                        tracing::info!(component = index, from, tracking, "resync from an older tracking bitmap");
                        Source::Tracked { source, tracking }
                    }
                    _ => {
                        tracing::warn!(component = index, from, "no tracking bitmap covers the absence: full copy");
                        Source::FullCopy { source: first }
                    }
                }
            }
        };
        self.held_every_done.remove(&index);
        let target = self.last_lsn;
        let ready = self.components[source.index()].last_sent;
        self.plans += 1;
        let plan = self.plans;
        let component = &mut self.components[index];
        component.status = Status::Resyncing { stale: from, target };
        component.plan = plan;
        component.last_sent = target;
        component.source = Some(source.index());
        component.uses = match source {
            Source::Tracked { tracking, .. } => Some(tracking),
            Source::FullCopy { .. } => None,
        };
        // The resync brings everything up to `target`; writes above it are
        // sent to it from now on.
        component.acked = target;
        component.acked_above.clear();
        tracing::info!(component = index, from, target, ?source, plan, "resync planned");
        out.push(Action::Resync { component: index, stale: from, target, source, ready, plan });
        out.push(Action::Persist);
    }

    /// Erasure-coded: `index` is back while fewer than k components are
    /// active. No resync can run (a chunk is rebuilt from k others), and
    /// planning one would start rows on its disk that no rollback undoes.
    /// Instead it is remembered, with the LSN it is known to hold up to,
    /// for a readmission.
    fn returned_while_unavailable(&mut self, index: Index, committed: Lsn, mid_resync: bool, out: &mut Vec<Action>) {
        let Some(from) = self.resync_from(index, committed) else { return };
        // A write it declined is above `from` (it never acknowledged it),
        // so a readmission, which rolls back to `from` or below, undoes it
        // everywhere: such a hole does not keep it out. One at or below
        // would (it would lack a write it is counted as holding).
        let lacking = self.components[index].holes.range(..=from).next().copied();
        if let Some(hole) = lacking {
            tracing::warn!(component = index, hole, from, "back lacking a write it would be readmitted with: it waits");
            self.returned.remove(&index);
            return;
        }
        if mid_resync {
            tracing::info!(component = index, committed, "back mid-resync while the object is unavailable: it waits");
            self.returned.remove(&index);
            return;
        }
        self.returned.insert(index, from);
        self.readmit(out);
    }

    /// Erasure-coded, with fewer than k components active: once the active
    /// components and the returned ones that hold every write answered
    /// done (their LSN at or above the newest such) number k, they roll
    /// back to the lowest LSN among them and become the active components.
    /// Every write above it was never answered done, and may have reached
    /// only some chunks of its stripe; after the rollback none holds it, so
    /// every stripe decodes as it stood at that LSN. Nothing is pending
    /// (what was in flight is answered first): no acknowledgement can
    /// arrive for a write the rollback undoes.
    fn readmit(&mut self, out: &mut Vec<Action>) {
        if self.holders_needed <= 1 || self.readmitting.is_some() || !self.pending.is_empty() {
            return;
        }
        let active: Vec<(Index, Lsn)> = (0..self.components.len())
            .filter(|index| self.components[*index].status == Status::Active)
            .map(|index| (index, self.components[index].acked))
            .collect();
        if active.len() >= self.holders_needed {
            self.returned.clear();
            return;
        }
        // Only absent ones: one being resynced or active since it answered
        // is no longer the component that answered.
        self.returned.retain(|index, _| matches!(self.components[*index].status, Status::Absent { .. }));
        let done = self.done_lsn;
        let qualified: Vec<(Index, Lsn)> =
            self.returned.iter().filter(|(_, held)| **held >= done).map(|(index, held)| (*index, *held)).collect();
        if active.len() + qualified.len() < self.holders_needed {
            tracing::info!(
                active = active.len(),
                returned = ?self.returned,
                done,
                needed = self.holders_needed,
                "too few components hold every write answered done to take the object back yet"
            );
            return;
        }
        let members: Vec<(Index, Lsn)> = active.into_iter().chain(qualified).collect();
        let to = members.iter().map(|(_, held)| *held).min().expect("k members");
        let components: Vec<Index> = members.iter().map(|(index, _)| *index).collect();
        tracing::warn!(?components, to, done, "readmitting components that hold every write answered done");
        self.readmitting = Some((components.clone(), to));
        // Recorded before any rollback is sent (see `Action::Readmit`).
        self.hold_no_more_than(to);
        out.push(Action::Persist);
        out.push(Action::Readmit { components, to });
    }

    /// The end of a readmission's rollback ([`Input::Readmitted`]); returns
    /// whether its components were taken for active.
    pub fn readmitted(&mut self, now: u64, rolled_back: bool, out: &mut Vec<Action>) -> bool {
        let Some((members, to)) = self.readmitting.take() else { return false };
        self.returned.clear();
        if !rolled_back || members.len() < self.holders_needed {
            // Those that did not answer fail (or are still away); the rest
            // hold nothing above `to` now, and answer again when probed.
            // Each counts as holding only up to `to` from here on (as it
            // has since the readmission began): that is at or above every
            // write answered done.
            tracing::warn!(components = ?members, to, "a readmission's rollback did not finish everywhere");
            self.hold_no_more_than(to);
            // Some of the others may have rolled back: one resyncing could
            // otherwise end its resync and be active with writes above
            // `to` that they no longer hold.
            self.fail_stalled_resyncs(now, to);
            out.push(Action::Persist);
            return false;
        }
        let last = self.last_lsn;
        for &index in &members {
            let component = &mut self.components[index];
            if !matches!(component.status, Status::Active | Status::Absent { .. }) {
                continue;
            }
            // It holds everything up to `to` and nothing above; the LSNs
            // above, issued before, were refused.
            component.status = Status::Active;
            component.record = self.records;
            component.acked = last;
            component.acked_above.clear();
            component.last_sent = to;
            component.unanswered.clear();
            component.holes.clear();
            component.source = None;
            component.uses = None;
            // A returned one's tracking bitmaps were forgotten when it
            // failed; an active one's still mark every block changed above
            // their stale LSNs, the rolled back ones among them.
        }
        self.fail_stalled_resyncs(now, to);
        self.history.clear();
        self.history_floor = self.history_floor.max(last);
        self.prune_history();
        out.push(Action::Persist);
        true
    }

    /// At the end of a readmission, components still resyncing (stalled:
    /// nothing could be rebuilt) fail, current only up to `to`: writes in
    /// flight when the object became unavailable may have reached them
    /// and be skipped by their resync as newer, though rolled back
    /// elsewhere. They are resynced anew.
    fn fail_stalled_resyncs(&mut self, now: u64, to: Lsn) {
        for component in &mut self.components {
            if let Status::Resyncing { stale, .. } = component.status {
                component.status = Status::Absent { stale: stale.min(to), since: now };
                component.acked = stale.min(to);
                component.acked_above.clear();
                component.tracking.clear();
                component.unanswered.clear();
                component.source = None;
                component.uses = None;
            }
        }
    }

    fn resynced(&mut self, now: u64, index: Index, ended: u64, out: &mut Vec<Action>) {
        let Status::Resyncing { stale, target } = self.components[index].status else { return };
        if self.components[index].plan != ended {
            return;
        }
        if self.readmitting.is_some() {
            // It may hold writes above the LSN the readmission rolls back
            // to, which no rollback reaches there: it fails, current only
            // to where it started (lowered to that LSN), and comes back.
            tracing::info!(component = index, "resync ended during a readmission: taken for failed");
            self.failed(now, index, out);
            return;
        }
        tracing::info!(component = index, stale, target, plan = ended, "resync done: the component is active");
        let records = self.records;
        let component = &mut self.components[index];
        component.status = Status::Active;
        component.record = records;
        component.source = None;
        component.holes.clear();
        component.acked = component.acked.max(target);
        let used = component.uses.take();
        // The tracking bitmaps it needed are no longer needed unless another
        // absent component went stale at the same LSN or another resync
        // copies by them.
        for lsn in [Some(stale), used].into_iter().flatten() {
            let needed = self.components.iter().any(|other| match other.status {
                Status::Absent { stale: other_stale, .. } => other_stale == lsn,
                Status::Resyncing { stale: other_stale, .. } => other_stale == lsn || other.uses == Some(lsn),
                Status::Active => false,
            });
            if !needed {
                for other in 0..self.components.len() {
                    if self.components[other].tracking.remove(&lsn) {
                        out.push(Action::Untrack { component: other, stale: lsn });
                    }
                }
            }
        }
        out.push(Action::Persist);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(copies: usize) -> Owner {
        Owner::new(vec![Status::Active; copies], 0)
    }

    fn write(owner: &mut Owner, request: u64, first: u64) -> Vec<Action> {
        let mut out = Vec::new();
        owner.handle(0, Input::Submit { request, op: Op::Write { first, count: 1 } }, &mut out);
        out
    }

    fn ack(owner: &mut Owner, component: Index, lsn: Lsn) -> Vec<Action> {
        let mut out = Vec::new();
        owner.handle(0, Input::Acked { component, lsn }, &mut out);
        out
    }

    #[test]
    fn a_write_is_done_when_every_active_component_has_it() {
        let mut owner = owner(3);
        let sent = write(&mut owner, 7, 10);
        assert_eq!(sent.len(), 3);
        assert!(ack(&mut owner, 0, 1).is_empty());
        assert!(ack(&mut owner, 2, 1).is_empty());
        assert_eq!(ack(&mut owner, 1, 1), vec![Action::Done { request: 7, lsn: 1 }]);
    }

    /// Component 0 is away from LSN 1; LSN 2 is answered done on component
    /// 1 alone, which then fails too. Component 0 comes back holding an LSN
    /// 2 of its own (a deposed owner's write): it is not the copy of record,
    /// and waits for component 1, which is.
    #[test]
    fn a_copy_back_with_writes_above_its_stale_lsn_is_not_the_copy_of_record_over_writes_answered_done() {
        let mut owner = Owner::new(vec![Status::Absent { stale: 1, since: 0 }, Status::Active], 1);
        write(&mut owner, 1, 0);
        assert_eq!(ack(&mut owner, 1, 2), vec![Action::Done { request: 1, lsn: 2 }]);
        let mut out = Vec::new();
        owner.handle(10, Input::Failed { component: 1 }, &mut out);
        out.clear();
        owner.handle(20, Input::Back { component: 0, committed: 2, newest: 2, mid_resync: false }, &mut out);
        assert!(
            !out.iter().any(|action| matches!(action, Action::Current { .. })),
            "a copy lacking the write answered done became the copy of record: {out:?}"
        );
        assert_eq!(owner.status(0), &Status::Absent { stale: 1, since: 0 });
        out.clear();
        owner.handle(30, Input::Back { component: 1, committed: 2, newest: 2, mid_resync: false }, &mut out);
        assert_eq!(owner.status(1), &Status::Active, "{out:?}");
    }

    /// Every copy fails after LSN 1 is done; component 0 comes back first
    /// holding up to LSN 9 (a deposed owner's writes, made while it was cut
    /// off with it: committed, or written by a resync that owner began) and
    /// becomes the copy of record: the next write is numbered above 9, not
    /// 2, which it holds already for another write.
    #[test]
    fn writes_after_a_copy_of_record_holding_later_lsns_are_numbered_above_them() {
        for (committed, newest) in [(9, 9), (1, 9)] {
            let mut owner = owner(2);
            write(&mut owner, 1, 0);
            ack(&mut owner, 0, 1);
            assert_eq!(ack(&mut owner, 1, 1), vec![Action::Done { request: 1, lsn: 1 }]);
            let mut out = Vec::new();
            owner.handle(10, Input::Failed { component: 1 }, &mut out);
            owner.handle(10, Input::Failed { component: 0 }, &mut out);
            out.clear();
            owner.handle(20, Input::Back { component: 0, committed, newest, mid_resync: false }, &mut out);
            assert!(out.contains(&Action::Current { component: 0 }), "{out:?}");
            let sent = write(&mut owner, 2, 3);
            assert_eq!(sent, vec![Action::Send { component: 0, lsn: 10, request: 2 }], "committed {committed}");
            assert_eq!(ack(&mut owner, 0, 10), vec![Action::Done { request: 2, lsn: 10 }]);
        }
    }

    /// An owner opened at committed LSN 300 with copy 0 (recorded active,
    /// not answering) away at its lower bound 44, and copy 2 likewise if
    /// there are three; copy 1 is current and then fails.
    fn opened_with_copies_away(copies: usize) -> Owner {
        let mut statuses = vec![Status::Absent { stale: 44, since: 0 }; copies];
        statuses[1] = Status::Active;
        let away: Vec<Index> = (0..copies).filter(|index| *index != 1).collect();
        let mut owner = Owner::new(statuses, 300).numbering_from(300).holding_every_write_done_before(away);
        fail(&mut owner, 1);
        owner
    }

    fn fail(owner: &mut Owner, component: Index) {
        owner.handle(10, Input::Failed { component }, &mut Vec::new());
    }

    fn made_current(out: &[Action], component: Index) -> bool {
        out.contains(&Action::Current { component })
    }

    /// A copy recorded active when the owner opened, which did not answer,
    /// holds every write answered done before: the only one back, it is
    /// the copy of record, if it holds at least the lower bound it is
    /// recorded away at, and until the owner serves data (which it may
    /// lack: a write in flight at the open, on the copy that answered).
    #[test]
    fn a_copy_recorded_active_at_open_is_the_copy_of_record_until_the_owner_serves_data() {
        let mut owner = opened_with_copies_away(2);
        assert!(made_current(&back(&mut owner, 0, 250, false), 0));
        let mut owner = opened_with_copies_away(2);
        assert!(!made_current(&back(&mut owner, 0, 10, false), 0), "below its lower bound, it lost data");
        let mut owner = opened_with_copies_away(2);
        owner.served_data();
        assert!(!made_current(&back(&mut owner, 0, 250, false), 0), "taken back after data was served");
    }

    /// Once a copy of record was made, the others recorded active at the
    /// open are not taken for one: the LSNs above a copy's own mean this
    /// owner's (refused) writes now, where they may hold the older owner's
    /// under them, which a resync from the copy of record would miss.
    #[test]
    fn after_a_copy_of_record_no_other_copy_recorded_active_at_open_becomes_one() {
        let mut owner = opened_with_copies_away(3);
        assert!(made_current(&back(&mut owner, 0, 250, false), 0));
        fail(&mut owner, 0);
        assert!(!made_current(&back(&mut owner, 2, 300, false), 2), "a second copy of record from the open");
    }

    /// A copy of record that held less than the copy that answered at the
    /// open: that one, back, holds writes it lacks under the same LSNs
    /// (in flight at the open): only a full copy makes it the same.
    #[test]
    fn the_copy_current_at_open_comes_back_to_a_full_copy_from_a_copy_of_record_recorded_active() {
        let mut owner = opened_with_copies_away(2);
        assert!(made_current(&back(&mut owner, 0, 250, false), 0));
        // An exact tracking bitmap: only divergence calls for a full copy.
        owner.set_tracking(0, [300]);
        let out = back(&mut owner, 1, 300, false);
        assert!(
            out.iter().any(|action| matches!(
                action,
                Action::Resync { component: 1, source: Source::FullCopy { source: 0 }, .. }
            )),
            "{out:?}"
        );
    }

    /// A copy recorded active at the open taken for the copy of record,
    /// below the open's committed LSN, fails and comes back holding what
    /// it held: it is the copy of record again (the copy current at the
    /// open, away when it was taken, is not).
    #[test]
    fn a_copy_of_record_recorded_active_at_open_is_taken_back_holding_what_it_held() {
        let mut opened = opened_with_copies_away(2);
        assert!(made_current(&back(&mut opened, 0, 250, false), 0));
        opened.served_data();
        fail(&mut opened, 0);
        assert!(!made_current(&back(&mut opened, 1, 300, false), 1));
        assert!(made_current(&back(&mut opened, 0, 250, false), 0), "the copy of record, back, was refused");
    }

    /// A copy away when a copy of record was made is not the next one: it
    /// may lack writes that were in flight when every copy went away, which
    /// the copy of record holds, and reads may have shown since. The copy
    /// of record itself, back, is.
    #[test]
    fn a_copy_away_when_a_copy_of_record_was_made_is_not_the_next_one() {
        let mut opened = opened_with_copies_away(2);
        assert!(made_current(&back(&mut opened, 0, 310, false), 0));
        fail(&mut opened, 0);
        assert!(!made_current(&back(&mut opened, 1, 300, false), 1), "the copy current at the open, after a record");
        let mut fresh = owner(2);
        fail(&mut fresh, 0);
        fail(&mut fresh, 1);
        assert!(made_current(&back(&mut fresh, 0, 0, false), 0));
        fail(&mut fresh, 0);
        assert!(!made_current(&back(&mut fresh, 1, 0, false), 1), "a copy away when the record was made");
        assert!(made_current(&back(&mut fresh, 0, 0, false), 0), "the copy of record itself, back");
    }

    #[test]
    fn writes_complete_in_lsn_order() {
        let mut owner = owner(2);
        write(&mut owner, 1, 0);
        write(&mut owner, 2, 1);
        ack(&mut owner, 0, 2);
        assert!(ack(&mut owner, 1, 2).is_empty(), "LSN 1 is still owed");
        let done = [ack(&mut owner, 0, 1), ack(&mut owner, 1, 1)].concat();
        assert_eq!(done, vec![Action::Done { request: 1, lsn: 1 }, Action::Done { request: 2, lsn: 2 }]);
    }

    #[test]
    fn a_failed_component_is_absent_at_its_last_acknowledged_lsn_and_the_others_track_it() {
        let mut owner = owner(3);
        write(&mut owner, 1, 5);
        for component in 0..3 {
            ack(&mut owner, component, 1);
        }
        write(&mut owner, 2, 6);
        write(&mut owner, 3, 7);
        ack(&mut owner, 0, 2);
        ack(&mut owner, 1, 2);
        ack(&mut owner, 0, 3);
        ack(&mut owner, 1, 3);
        let mut out = Vec::new();
        owner.handle(100, Input::Failed { component: 2 }, &mut out);
        assert_eq!(owner.status(2), &Status::Absent { stale: 1, since: 100 });
        // Writes 2 and 3 may have reached the other two before tracking
        // starts: they seed it.
        for component in [0, 1] {
            assert!(out.contains(&Action::Track { component, stale: 1, seed: vec![(6, 1), (7, 1)] }), "{out:?}");
        }
        assert!(
            out.contains(&Action::Done { request: 2, lsn: 2 }) && out.contains(&Action::Done { request: 3, lsn: 3 })
        );
        // Degraded: new writes go to the two that are left.
        let sent = write(&mut owner, 4, 8);
        assert_eq!(sent.len(), 2);
    }

    #[test]
    fn a_returning_component_resyncs_from_a_tracking_bitmap_for_exactly_its_stale_lsn() {
        let mut owner = owner(3);
        write(&mut owner, 1, 5);
        for component in 0..3 {
            ack(&mut owner, component, 1);
        }
        let mut out = Vec::new();
        owner.handle(0, Input::Failed { component: 2 }, &mut out);
        owner.handle(0, Input::Tracking { component: 1, stale: 1 }, &mut out);
        owner.handle(0, Input::Tracking { component: 0, stale: 1 }, &mut out);
        write(&mut owner, 2, 6);
        ack(&mut owner, 0, 2);
        ack(&mut owner, 1, 2);
        out.clear();
        owner.handle(0, Input::Back { component: 2, committed: 1, newest: 1, mid_resync: false }, &mut out);
        assert_eq!(
            out[0],
            Action::Resync {
                component: 2,
                stale: 1,
                target: 2,
                source: Source::Tracked { source: 0, tracking: 1 },
                ready: 2,
                plan: 1
            }
        );
        // New writes reach it during the resync; clients wait only for the
        // active two.
        let sent = write(&mut owner, 3, 7);
        assert_eq!(sent.len(), 3);
        ack(&mut owner, 0, 3);
        assert_eq!(ack(&mut owner, 1, 3), vec![Action::Done { request: 3, lsn: 3 }]);
        out.clear();
        owner.handle(0, Input::Resynced { component: 2, plan: 1 }, &mut out);
        assert_eq!(owner.status(2), &Status::Active);
        assert!(out.contains(&Action::Untrack { component: 0, stale: 1 }));
        assert!(out.contains(&Action::Untrack { component: 1, stale: 1 }));
    }

    #[test]
    fn without_a_tracking_bitmap_it_falls_back_to_a_full_copy() {
        let mut owner = Owner::new(vec![Status::Active, Status::Absent { stale: 3, since: 0 }], 9);
        let mut out = Vec::new();
        owner.handle(0, Input::Back { component: 1, committed: 3, newest: 3, mid_resync: false }, &mut out);
        assert_eq!(
            out[0],
            Action::Resync {
                component: 1,
                stale: 3,
                target: 9,
                source: Source::FullCopy { source: 0 },
                ready: 9,
                plan: 1
            }
        );
    }

    #[test]
    fn a_new_owner_numbering_above_its_copies_waits_for_what_the_source_holds_not_for_its_start() {
        // The current copy holds 9; a copy mid-resync under the deposed
        // owner wrote up to 12, so new writes are numbered from 13. No write
        // may ever come: the resync must not wait for LSN 12 on the source
        // (seed 167 of the object simulation hung there forever).
        let statuses = vec![Status::Active, Status::Absent { stale: 5, since: 0 }];
        let mut owner = Owner::new(statuses, 9).numbering_from(12);
        owner.set_tracking(0, [5]);
        let mut out = Vec::new();
        owner.handle(0, Input::Back { component: 1, committed: 5, newest: 5, mid_resync: false }, &mut out);
        assert_eq!(
            out[0],
            Action::Resync {
                component: 1,
                stale: 5,
                target: 12,
                source: Source::Tracked { source: 0, tracking: 5 },
                ready: 9,
                plan: 1
            }
        );
        // The first new write is 13 and goes to both; it is done when the
        // active copy has it (the LSNs skipped count as acknowledged).
        assert!(write(&mut owner, 1, 0).contains(&Action::Send { component: 1, lsn: 13, request: 1 }));
        assert!(ack(&mut owner, 1, 13).is_empty());
        assert_eq!(ack(&mut owner, 0, 13), vec![Action::Done { request: 1, lsn: 13 }]);
    }

    fn decline(owner: &mut Owner, component: Index, lsn: Lsn) -> Vec<Action> {
        let mut out = Vec::new();
        owner.handle(0, Input::Declined { component, lsn }, &mut out);
        out
    }

    #[test]
    fn a_write_the_only_copy_has_no_room_for_is_refused_and_the_copy_goes_on() {
        let mut owner = owner(1);
        write(&mut owner, 1, 0);
        write(&mut owner, 2, 1);
        // The second fits (an overwrite, say), the first does not.
        assert!(ack(&mut owner, 0, 2).is_empty(), "waits for the first in LSN order");
        assert_eq!(
            decline(&mut owner, 0, 1),
            vec![Action::NoSpace { request: 1 }, Action::Done { request: 2, lsn: 2 }]
        );
        assert_eq!(owner.status(0), &Status::Active);
        assert_eq!(owner.acked_up_to(0), 2);
        assert!(write(&mut owner, 3, 2).contains(&Action::Send { component: 0, lsn: 3, request: 3 }));
        assert_eq!(ack(&mut owner, 0, 3), vec![Action::Done { request: 3, lsn: 3 }]);
    }

    #[test]
    fn a_copy_with_no_room_for_a_write_the_others_take_has_failed() {
        let mut owner = owner(2);
        write(&mut owner, 1, 0);
        // Settled once the other copy answers.
        assert!(decline(&mut owner, 0, 1).is_empty());
        assert_eq!(owner.status(0), &Status::Active);
        let out = ack(&mut owner, 1, 1);
        assert_eq!(owner.status(0), &Status::Absent { stale: 0, since: 0 });
        let track =
            out.iter().position(|action| action == &Action::Track { component: 1, stale: 0, seed: vec![(0, 1)] });
        let done = out.iter().position(|action| action == &Action::Done { request: 1, lsn: 1 });
        let persist = out.iter().position(|action| action == &Action::Persist);
        assert!(track.is_some() && persist.is_some() && persist < done, "absence recorded before the answer: {out:?}");
        // The last copy taking writes declines for all.
        write(&mut owner, 2, 5);
        assert_eq!(decline(&mut owner, 1, 2), vec![Action::NoSpace { request: 2 }]);
        assert_eq!(owner.status(1), &Status::Active);
    }

    #[test]
    fn a_write_every_copy_declines_is_refused_and_every_copy_goes_on() {
        let mut owner = owner(2);
        write(&mut owner, 1, 0);
        write(&mut owner, 2, 1);
        assert!(decline(&mut owner, 1, 1).is_empty());
        assert!(ack(&mut owner, 0, 2).is_empty());
        assert_eq!(
            decline(&mut owner, 0, 1),
            vec![Action::NoSpace { request: 1 }],
            "the second write still waits for copy 1"
        );
        assert_eq!(ack(&mut owner, 1, 2), vec![Action::Done { request: 2, lsn: 2 }]);
        assert_eq!(owner.statuses(), vec![Status::Active, Status::Active]);
        assert_eq!((owner.acked_up_to(0), owner.acked_up_to(1)), (2, 2));
    }

    #[test]
    fn the_last_copy_declining_a_write_a_failed_copy_holds_has_failed_too() {
        let mut owner = owner(2);
        write(&mut owner, 1, 0);
        ack(&mut owner, 0, 1);
        let mut out = Vec::new();
        owner.handle(0, Input::Failed { component: 0 }, &mut out);
        // Copy 0 holds LSN 1 (it failed after it): copy 1, which does not,
        // cannot go on as current.
        let out = decline(&mut owner, 1, 1);
        assert_eq!(owner.status(1), &Status::Absent { stale: 0, since: 0 });
        assert!(out.contains(&Action::Done { request: 1, lsn: 1 }), "{out:?}");
    }

    #[test]
    fn a_write_fewer_components_hold_than_needed_is_refused() {
        // A 2+1 erasure-coded object needs two chunks of a row; copies need one.
        for (needed, expected) in [(2, Action::Refused { request: 2 }), (1, Action::Done { request: 2, lsn: 2 })] {
            let mut owner = owner(3).needing_holders(needed);
            write(&mut owner, 1, 0);
            let done = [ack(&mut owner, 0, 1), ack(&mut owner, 1, 1), ack(&mut owner, 2, 1)].concat();
            assert_eq!(done, vec![Action::Done { request: 1, lsn: 1 }]);
            // Component 0 takes write 2; the other two fail before they do.
            write(&mut owner, 2, 0);
            let mut out = ack(&mut owner, 0, 2);
            owner.handle(100, Input::Failed { component: 1 }, &mut out);
            owner.handle(100, Input::Failed { component: 2 }, &mut out);
            assert_eq!(answers(&out), vec![&expected], "{needed} holders needed");
        }
    }

    /// The answers to clients among `out`, in order.
    fn answers(out: &[Action]) -> Vec<&Action> {
        out.iter()
            .filter(|action| matches!(action, Action::Done { .. } | Action::Refused { .. } | Action::NoSpace { .. }))
            .collect()
    }

    fn back(owner: &mut Owner, component: Index, committed: Lsn, mid_resync: bool) -> Vec<Action> {
        let mut out = Vec::new();
        owner.handle(200, Input::Back { component, committed, newest: committed, mid_resync }, &mut out);
        out
    }

    /// The plan and the source of the resync `out` starts for `component`.
    fn resync_of(out: &[Action], component: Index) -> (u64, Index) {
        out.iter()
            .find_map(|action| match action {
                Action::Resync { component: target, plan, source, .. } if *target == component => {
                    Some((*plan, source.index()))
                }
                _ => None,
            })
            .expect("a resync of the component")
    }

    /// The plan of the resync `out` starts for `component`.
    fn resync_plan(out: &[Action], component: Index) -> u64 {
        resync_of(out, component).0
    }

    /// A 2+1 erasure-coded owner with write 1 done on all three.
    fn raid5_written_everywhere() -> Owner {
        let mut owner = owner(3).needing_holders(2);
        write(&mut owner, 1, 0);
        for component in 0..3 {
            ack(&mut owner, component, 1);
        }
        owner
    }

    /// A 2+1 erasure-coded owner: write 1 done everywhere, then component 0
    /// alone takes write 2 (refused) as 1 and 2 fail, both holding write 1.
    fn two_of_three_away() -> Owner {
        let mut owner = raid5_written_everywhere();
        write(&mut owner, 2, 0);
        let mut out = ack(&mut owner, 0, 2);
        owner.handle(100, Input::Failed { component: 1 }, &mut out);
        owner.handle(100, Input::Failed { component: 2 }, &mut out);
        assert!(out.contains(&Action::Refused { request: 2 }));
        owner
    }

    #[test]
    fn erasure_coded_with_fewer_than_k_active_a_write_is_refused_before_it_is_sent() {
        let mut owner = two_of_three_away();
        assert_eq!(write(&mut owner, 3, 0), vec![Action::Refused { request: 3 }]);
    }

    #[test]
    fn erasure_coded_with_fewer_than_k_active_components_holding_every_done_write_are_readmitted_after_a_rollback() {
        let mut owner = two_of_three_away();
        // Component 1 holds write 1, the newest answered done: with 0 it
        // makes two, rolled back to 1 (0's chunk of the refused write 2
        // goes). No resync is planned: none could rebuild a chunk.
        let out = back(&mut owner, 1, 1, false);
        assert_eq!(out, vec![Action::Persist, Action::Readmit { components: vec![0, 1], to: 1 }]);
        assert_eq!(owner.status(1), &Status::Absent { stale: 1, since: 100 });
        assert_eq!(write(&mut owner, 3, 0), vec![Action::Refused { request: 3 }], "no write while it rolls back");
        let mut out = Vec::new();
        owner.handle(300, Input::Readmitted { rolled_back: true }, &mut out);
        assert_eq!(out, vec![Action::Persist]);
        assert_eq!(owner.statuses()[..2], [Status::Active, Status::Active]);
        // Writes go on above every LSN issued (write 3 was refused before
        // it took one); the third is resynced from the two (its chunks
        // rebuilt), from where it stood.
        let sent = write(&mut owner, 4, 0);
        assert_eq!(sent.len(), 2, "{sent:?}");
        assert!(sent.iter().all(|action| matches!(action, Action::Send { lsn: 3, .. })), "{sent:?}");
        let done = [ack(&mut owner, 0, 3), ack(&mut owner, 1, 3)].concat();
        assert_eq!(done, vec![Action::Done { request: 4, lsn: 3 }]);
        let out = back(&mut owner, 2, 1, false);
        assert!(out.iter().any(|action| matches!(action, Action::Resync { component: 2, stale: 1, .. })), "{out:?}");
    }

    #[test]
    fn erasure_coded_a_component_that_lacks_a_done_write_or_is_mid_resync_is_not_readmitted() {
        let mut owner = two_of_three_away();
        // Component 2 comes back holding nothing (its disk was replaced,
        // say): it lacks write 1, answered done.
        assert!(back(&mut owner, 2, 0, false).is_empty());
        // Component 1 holds write 1, but in the middle of a resync.
        assert!(back(&mut owner, 1, 1, true).is_empty());
        assert!(owner.statuses()[1..].iter().all(|status| matches!(status, Status::Absent { .. })));
        // Once it is clean, it is.
        assert_eq!(
            back(&mut owner, 1, 1, false),
            vec![Action::Persist, Action::Readmit { components: vec![0, 1], to: 1 }]
        );
    }

    #[test]
    fn erasure_coded_a_write_every_component_declines_is_refused_for_want_of_space_and_all_go_on() {
        let mut owner = raid5_written_everywhere();
        write(&mut owner, 2, 0);
        assert!(decline(&mut owner, 0, 2).is_empty());
        assert!(decline(&mut owner, 1, 2).is_empty());
        assert_eq!(decline(&mut owner, 2, 2), vec![Action::NoSpace { request: 2 }]);
        assert_eq!(owner.statuses(), vec![Status::Active; 3]);
        // The next writes tell each component its refusal is settled.
        assert!((0..3).all(|component| owner.settled(component) == 2));
        write(&mut owner, 3, 0);
        let done: Vec<Action> = (0..3).flat_map(|component| ack(&mut owner, component, 3)).collect();
        assert_eq!(done, vec![Action::Done { request: 3, lsn: 3 }]);
    }

    #[test]
    fn erasure_coded_a_write_k_components_hold_is_done_and_the_one_with_no_room_has_failed() {
        let mut owner = raid5_written_everywhere();
        write(&mut owner, 2, 0);
        assert!(decline(&mut owner, 2, 2).is_empty());
        ack(&mut owner, 0, 2);
        let out = ack(&mut owner, 1, 2);
        assert!(out.contains(&Action::Done { request: 2, lsn: 2 }), "{out:?}");
        assert_eq!(owner.status(2), &Status::Absent { stale: 1, since: 0 });
        // It misses write 2: resynced from where it stood before it.
        let out = back(&mut owner, 2, 1, false);
        assert!(out.iter().any(|action| matches!(action, Action::Resync { component: 2, stale: 1, .. })), "{out:?}");
    }

    #[test]
    fn erasure_coded_a_write_too_few_components_had_room_for_is_refused_for_want_of_space_then_rolled_back() {
        let mut owner = raid5_written_everywhere();
        write(&mut owner, 2, 0);
        ack(&mut owner, 0, 2);
        assert!(decline(&mut owner, 1, 2).is_empty());
        // One holder of two needed: not done; the client learns why (the
        // write is rolled back before the object takes I/O again).
        let out = decline(&mut owner, 2, 2);
        assert_eq!(answers(&out), vec![&Action::NoSpace { request: 2 }]);
        assert_eq!(owner.status(0), &Status::Active);
        assert!(owner.statuses()[1..].iter().all(|status| matches!(status, Status::Absent { stale: 1, .. })));
        // The two that had no room hold write 1, answered done, so either
        // makes k with component 0: rolled back to 1, write 2 goes.
        let out = back(&mut owner, 1, 1, false);
        assert_eq!(out, vec![Action::Persist, Action::Readmit { components: vec![0, 1], to: 1 }]);
    }

    #[test]
    fn erasure_coded_a_write_too_few_components_could_hold_even_with_room_is_refused_as_unavailable() {
        let mut owner = raid5_written_everywhere();
        write(&mut owner, 2, 0);
        assert!(decline(&mut owner, 2, 2).is_empty());
        let mut out = Vec::new();
        owner.handle(100, Input::Failed { component: 0 }, &mut out);
        owner.handle(100, Input::Failed { component: 1 }, &mut out);
        // Room on component 2 would not have made it done: not for want of space.
        assert_eq!(answers(&out), vec![&Action::Refused { request: 2 }]);
    }

    #[test]
    fn erasure_coded_a_resyncing_component_with_no_room_does_not_make_a_refused_write_one_for_want_of_space() {
        let mut owner = raid5_written_everywhere();
        let mut out = Vec::new();
        owner.handle(100, Input::Failed { component: 2 }, &mut out);
        back(&mut owner, 2, 1, false);
        assert!(matches!(owner.status(2), Status::Resyncing { .. }));
        write(&mut owner, 2, 0);
        // Resyncing, it would not have counted as a holder with room.
        decline(&mut owner, 2, 2);
        ack(&mut owner, 0, 2);
        let mut out = Vec::new();
        owner.handle(300, Input::Failed { component: 1 }, &mut out);
        assert_eq!(answers(&out), vec![&Action::Refused { request: 2 }]);
    }

    #[test]
    fn erasure_coded_a_component_back_lacking_a_write_at_or_below_what_it_would_be_readmitted_with_waits() {
        let mut owner = two_of_three_away();
        // As if component 1 had declined write 1, answered done on 0 and 2.
        owner.components[1].holes.insert(1);
        assert!(back(&mut owner, 1, 1, false).is_empty());
        assert!(matches!(owner.status(1), Status::Absent { .. }));
    }

    /// RAID-5 (2+1): write 1 on all three, write 2 acknowledged by
    /// component 1 alone, then `failing` fail (at 100): write 2 is refused.
    fn second_write_held_by_one(failing: &[Index]) -> Owner {
        let mut owner = raid5_written_everywhere();
        write(&mut owner, 2, 0);
        let mut out = ack(&mut owner, 1, 2);
        for &component in failing {
            owner.handle(100, Input::Failed { component }, &mut out);
        }
        assert!(out.contains(&Action::Refused { request: 2 }), "{out:?}");
        owner
    }

    #[test]
    fn erasure_coded_a_readmission_counts_every_component_only_up_to_where_it_rolls_back_before_it_is_sent() {
        // Component 1 fails too (away at 2), first.
        let mut owner = second_write_held_by_one(&[1, 0, 2]);
        assert_eq!(owner.status(1), &Status::Absent { stale: 2, since: 100 });
        back(&mut owner, 0, 1, false);
        // Components 0 and 1 hold write 1, answered done: they roll back to
        // it. Component 1's disk will not hold write 2 any more, so the
        // states to record first count it only up to 1; were the owner
        // deposed after the rollback, a new owner going by 2 would find no
        // component holding that much.
        let out = back(&mut owner, 1, 2, false);
        assert_eq!(out, vec![Action::Persist, Action::Readmit { components: vec![0, 1], to: 1 }]);
        assert_eq!(owner.status(1), &Status::Absent { stale: 1, since: 100 });
    }

    /// RAID-5 (2+1): component 2 resyncing, its resync stalled (the other
    /// active one failed, fewer than k active), and a readmission of that
    /// one with the source under way. Returns the owner and the resync's
    /// plan.
    fn readmitting_with_a_stalled_resync() -> (Owner, u64) {
        let mut owner = raid5_written_everywhere();
        let mut out = Vec::new();
        owner.handle(100, Input::Failed { component: 2 }, &mut out);
        let (plan, source) = resync_of(&back(&mut owner, 2, 0, false), 2);
        let other = 1 - source;
        let mut out = Vec::new();
        owner.handle(150, Input::Failed { component: other }, &mut out);
        assert!(matches!(owner.status(2), Status::Resyncing { .. }));
        let out = back(&mut owner, other, 1, false);
        assert!(out.iter().any(|action| matches!(action, Action::Readmit { .. })), "{out:?}");
        (owner, plan)
    }

    #[test]
    fn erasure_coded_a_resync_ending_during_a_readmission_fails_its_component() {
        let (mut owner, plan) = readmitting_with_a_stalled_resync();
        // The resync ends meanwhile: no rollback reaches component 2, which
        // may hold writes above where the others roll back to, so it fails.
        let mut out = Vec::new();
        owner.handle(200, Input::Resynced { component: 2, plan }, &mut out);
        assert_eq!(owner.status(2), &Status::Absent { stale: 0, since: 200 });
    }

    #[test]
    fn erasure_coded_a_readmission_that_fails_fails_the_stalled_resyncs_too() {
        let (mut owner, plan) = readmitting_with_a_stalled_resync();
        let mut out = Vec::new();
        owner.handle(200, Input::Readmitted { rolled_back: false }, &mut out);
        // Some components may have rolled back: a resync ending later must
        // not make component 2 active with writes they no longer hold.
        assert_eq!(owner.status(2), &Status::Absent { stale: 0, since: 200 });
        owner.handle(300, Input::Resynced { component: 2, plan }, &mut out);
        assert_eq!(owner.status(2), &Status::Absent { stale: 0, since: 200 });
    }

    #[test]
    fn erasure_coded_an_active_component_failing_mid_readmission_counts_only_up_to_where_it_rolls_back() {
        // Component 1 stays active, acknowledged up to 2.
        let mut owner = second_write_held_by_one(&[0, 2]);
        let out = back(&mut owner, 0, 1, false);
        assert_eq!(out, vec![Action::Persist, Action::Readmit { components: vec![1, 0], to: 1 }]);
        // A late answer for write 2 (one sent while it resynced, say)
        // counts for nothing now. Component 1 may have rolled write 2 back
        // before it failed.
        ack(&mut owner, 1, 2);
        let mut out = Vec::new();
        owner.handle(300, Input::Failed { component: 1 }, &mut out);
        assert_eq!(owner.status(1), &Status::Absent { stale: 1, since: 300 });
    }

    #[test]
    fn erasure_coded_a_readmission_whose_rollback_fails_somewhere_takes_nobody_back() {
        let mut owner = two_of_three_away();
        back(&mut owner, 1, 1, false);
        let mut out = Vec::new();
        owner.handle(300, Input::Failed { component: 0 }, &mut out);
        owner.handle(300, Input::Readmitted { rolled_back: true }, &mut out);
        assert!(
            owner.statuses().iter().all(|status| matches!(status, Status::Absent { .. })),
            "{:?}",
            owner.statuses()
        );
        // Component 0 may have rolled back before it failed: it, like the
        // others, counts only up to where the rollback went.
        assert_eq!(owner.status(0), &Status::Absent { stale: 1, since: 300 });
        assert_eq!(write(&mut owner, 3, 0), vec![Action::Refused { request: 3 }]);
    }

    #[test]
    fn erasure_coded_a_write_a_component_acknowledged_while_resyncing_counts_it_once_it_is_active() {
        let mut owner = owner(3).needing_holders(2);
        let mut out = Vec::new();
        owner.handle(100, Input::Failed { component: 2 }, &mut out);
        let out = back(&mut owner, 2, 0, false);
        let plan = resync_plan(&out, 2);
        // Sent to the two active ones and to the one resyncing, which
        // acknowledges it, then finishes its resync.
        assert_eq!(write(&mut owner, 1, 0).len(), 3);
        assert!(ack(&mut owner, 2, 1).is_empty());
        let mut out = Vec::new();
        owner.handle(200, Input::Resynced { component: 2, plan }, &mut out);
        assert_eq!(owner.status(2), &Status::Active);
        // One of the two it waited for fails: the other and the one
        // resynced hold it, k of them.
        owner.handle(300, Input::Failed { component: 0 }, &mut out);
        let out = ack(&mut owner, 1, 1);
        assert!(out.contains(&Action::Done { request: 1, lsn: 1 }), "{out:?}");
    }

    #[test]
    fn erasure_coded_a_resync_whose_source_fails_leaving_fewer_than_k_active_is_not_planned_again() {
        let mut owner = owner(3).needing_holders(2);
        let mut out = Vec::new();
        owner.handle(100, Input::Failed { component: 2 }, &mut out);
        let out = back(&mut owner, 2, 0, false);
        let (_, source) = resync_of(&out, 2);
        let mut out = Vec::new();
        owner.handle(300, Input::Failed { component: source }, &mut out);
        assert!(!out.iter().any(|action| matches!(action, Action::Resync { .. })), "{out:?}");
        assert!(matches!(owner.status(2), Status::Absent { .. }));
    }

    #[test]
    fn erasure_coded_a_write_is_never_refused_below_one_answered_done() {
        let mut owner = owner(3).needing_holders(2);
        let mut out = Vec::new();
        owner.handle(100, Input::Failed { component: 2 }, &mut out);
        // Write 1 goes to the two active ones only.
        assert_eq!(write(&mut owner, 1, 0).len(), 2);
        // Component 2 comes back and is resynced past it.
        let out = back(&mut owner, 2, 0, false);
        let plan = resync_plan(&out, 2);
        assert!(ack(&mut owner, 0, 1).is_empty());
        let mut out = Vec::new();
        owner.handle(200, Input::Resynced { component: 2, plan }, &mut out);
        // Write 2 goes to all three; two acknowledge it; the one that
        // never acknowledged write 1 fails.
        assert_eq!(write(&mut owner, 2, 0).len(), 3);
        let mut out = [ack(&mut owner, 0, 2), ack(&mut owner, 2, 2)].concat();
        owner.handle(300, Input::Failed { component: 1 }, &mut out);
        // Component 2 holds write 1 by its resync: both are done.
        assert_eq!(answers(&out), vec![&Action::Done { request: 1, lsn: 1 }, &Action::Done { request: 2, lsn: 2 }]);
    }

    #[test]
    fn with_no_active_component_io_is_refused() {
        let mut owner = owner(1);
        let mut out = Vec::new();
        owner.handle(0, Input::Failed { component: 0 }, &mut out);
        assert_eq!(write(&mut owner, 1, 0), vec![Action::Refused { request: 1 }]);
    }
}
