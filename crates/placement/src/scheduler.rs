//! One host's scheduler: leaf for its own buckets, branch for its children,
//! root for the cluster, as the tree says.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use hierarchy::{HostId, Millis, Tree};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::{choose, shortlist, Bucket, BucketId, Candidate, PlacementError, Request};

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Branch hosts the root asks per request (`None`: all).
    pub sample_branches: Option<usize>,
    /// Leaves a branch asks per request (`None`: all).
    pub sample_leaves: Option<usize>,
    /// How long a branch waits for its leaves before answering with what it has.
    pub branch_timeout: Millis,
    /// How long the root waits for the branches.
    pub root_timeout: Millis,
    /// Candidates a branch forwards, per bucket the request wants.
    pub shortlist_per_bucket: usize,
    /// Requests the root works on at once; more are refused (`Busy`).
    pub in_flight_max: usize,
    /// The root resends an unacknowledged grant after this long.
    pub commit_retry: Millis,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            sample_branches: None,
            sample_leaves: None,
            branch_timeout: 100,
            root_timeout: 250,
            shortlist_per_bucket: 4,
            in_flight_max: 4096,
            commit_retry: 500,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SchedulerMessage {
    /// Parent → child: answer for your subtree (asking every child, not a
    /// sample, when `everyone`).
    Query {
        request: Request,
        everyone: bool,
        /// The root asking, and its incarnation: leaves stamp their answers
        /// with the commits from it they had applied.
        root: HostId,
        incarnation: u64,
    },
    /// Child → parent.
    Answer { request_id: u64, candidates: Vec<Candidate> },
    /// Root → leaf: `bytes` of `bucket` are granted; count them as used.
    /// Sequences are per root incarnation: a root that restarts counts from
    /// one again, and must not be taken for a duplicate of its past self.
    /// `floor`: every sequence up to it was acknowledged (by this leaf or
    /// an earlier incarnation of it) and will not be sent again.
    Commit { incarnation: u64, sequence: u64, floor: u64, bucket: BucketId, bytes: u64 },
    /// Leaf → root, with the leaf's incarnation.
    CommitAck { sequence: u64, incarnation: u64 },
}

#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    Send {
        to: HostId,
        message: SchedulerMessage,
    },
    /// The root's answer to a request made with [`Scheduler::place`].
    Placed {
        request_id: u64,
        result: Result<Vec<Candidate>, PlacementError>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Requester {
    Client,
    Parent(HostId),
}

struct Pending {
    requester: Requester,
    request: Request,
    /// Whether children were sampled (a failed sampled attempt is retried
    /// asking everyone).
    sampled: bool,
    waiting: BTreeSet<HostId>,
    candidates: Vec<Candidate>,
    deadline: Millis,
}

struct Grant {
    bucket: BucketId,
    bytes: u64,
    sent: Millis,
    /// When the leaf confirmed it, and the leaf's incarnation. An answer
    /// measured before then may still arrive until every request started
    /// before then has timed out, so the grant is kept that long.
    acked: Option<(Millis, u64)>,
}

/// Commits applied from one root: everything up to `watermark`, plus some
/// above it that arrived out of order.
#[derive(Default)]
struct Applied {
    watermark: u64,
    above: BTreeSet<u64>,
}

/// Roots a leaf remembers commits from; the oldest is forgotten first.
const ROOTS_REMEMBERED_MAX: usize = 16;

pub struct Scheduler {
    me: HostId,
    /// Identifies this process's run as a root (grants' sequences restart
    /// with it).
    incarnation: u64,
    config: SchedulerConfig,
    tree: Arc<Tree>,
    buckets: BTreeMap<BucketId, Bucket>,
    rng: StdRng,
    /// By request id (ids are unique cluster-wide; the root issues them).
    pending: BTreeMap<u64, Pending>,
    deadlines: BTreeSet<(Millis, u64)>,
    /// The root rescans grants for retransmission no more often than this.
    next_grant_scan: Millis,
    /// Root: grants not yet acknowledged, or acknowledged too recently for
    /// every answer to reflect them, by (leaf host, sequence).
    grants: BTreeMap<(HostId, u64), Grant>,
    next_sequence: BTreeMap<HostId, u64>,
    /// Leaf: commits applied, per granting root incarnation.
    applied: BTreeMap<(HostId, u64), Applied>,
}

impl Scheduler {
    /// `incarnation` must differ between runs of the same host (a start
    /// time will do); `seed` drives the random sampling of children.
    pub fn new(me: HostId, config: SchedulerConfig, incarnation: u64, seed: u64) -> Scheduler {
        Scheduler {
            me,
            incarnation,
            config,
            tree: Arc::new(Tree::default()),
            buckets: BTreeMap::new(),
            rng: StdRng::seed_from_u64(seed ^ me),
            pending: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            next_grant_scan: 0,
            grants: BTreeMap::new(),
            next_sequence: BTreeMap::new(),
            applied: BTreeMap::new(),
        }
    }

    pub fn set_tree(&mut self, tree: Arc<Tree>) {
        if tree.epoch >= self.tree.epoch {
            self.tree = tree;
        }
    }

    /// This host's buckets as it measures them (free space from its disks).
    pub fn set_buckets(&mut self, buckets: Vec<Bucket>) {
        self.buckets = buckets.into_iter().map(|bucket| (bucket.id, bucket)).collect();
    }

    pub fn buckets(&self) -> impl Iterator<Item = &Bucket> {
        self.buckets.values()
    }

    pub fn is_root(&self) -> bool {
        self.tree.root == Some(self.me)
    }

    pub fn in_flight(&self) -> usize {
        self.pending.values().filter(|pending| pending.requester == Requester::Client).count()
    }

    /// Places a request; the answer comes as [`Output::Placed`].
    pub fn place(&mut self, now: Millis, request: Request, out: &mut Vec<Output>) {
        let request_id = request.id;
        if !self.is_root() {
            out.push(Output::Placed { request_id, result: Err(PlacementError::NotRoot { root: self.tree.root }) });
            return;
        }
        if self.in_flight() >= self.config.in_flight_max {
            out.push(Output::Placed { request_id, result: Err(PlacementError::Busy) });
            return;
        }
        self.start(now, Requester::Client, request, true, (self.me, self.incarnation), out);
    }

    pub fn handle(&mut self, now: Millis, from: HostId, message: SchedulerMessage, out: &mut Vec<Output>) {
        match message {
            SchedulerMessage::Query { request, everyone, root, incarnation } => {
                self.start(now, Requester::Parent(from), request, !everyone, (root, incarnation), out)
            }
            SchedulerMessage::Answer { request_id, candidates } => {
                // An answer after the deadline (or from a host not asked) is dropped.
                if let Some(pending) =
                    self.pending.get_mut(&request_id).filter(|pending| pending.waiting.contains(&from))
                {
                    pending.waiting.remove(&from);
                    pending.candidates.extend(candidates);
                    if pending.waiting.is_empty() {
                        self.finish(now, request_id, out);
                    }
                }
            }
            SchedulerMessage::Commit { incarnation, sequence, floor, bucket, bytes } => {
                if !self.applied.contains_key(&(from, incarnation)) && self.applied.len() >= ROOTS_REMEMBERED_MAX {
                    self.applied.pop_first();
                }
                let applied = self.applied.entry((from, incarnation)).or_default();
                // Below the floor everything was applied, here or before a
                // restart (and then counted in what the disks report).
                if floor > applied.watermark {
                    applied.watermark = floor;
                    applied.above = applied.above.split_off(&(floor + 1));
                }
                while applied.above.remove(&(applied.watermark + 1)) {
                    applied.watermark += 1;
                }
                if sequence > applied.watermark && applied.above.insert(sequence) {
                    if let Some(local) = self.buckets.get_mut(&bucket) {
                        local.free_bytes = local.free_bytes.saturating_sub(bytes);
                    }
                    while applied.above.remove(&(applied.watermark + 1)) {
                        applied.watermark += 1;
                    }
                }
                let incarnation = self.incarnation;
                out.push(Output::Send { to: from, message: SchedulerMessage::CommitAck { sequence, incarnation } });
            }
            SchedulerMessage::CommitAck { sequence, incarnation } => {
                if let Some(grant) = self.grants.get_mut(&(from, sequence)) {
                    grant.acked.get_or_insert((now, incarnation));
                }
            }
        }
    }

    /// Whom this host asks, as its role in the tree says: every child, or
    /// a random sample as configured. The root asks only branches of the
    /// request's site (a branch aggregates one site).
    fn children(&mut self, request: &Request, sample: bool) -> Vec<HostId> {
        let Some(branch) = self.tree.branches.get(&self.me) else { return Vec::new() };
        let same_site = |site: &Option<String>| request.site.is_none() || request.site == *site;
        let mut leaves: Vec<HostId> =
            if same_site(&branch.site) { branch.children.iter().copied().collect() } else { Vec::new() };
        if let Some(size) = self.config.sample_leaves.filter(|_| sample) {
            leaves.shuffle(&mut self.rng);
            leaves.truncate(size);
        }
        if self.tree.root == Some(self.me) {
            let mut branches: Vec<HostId> = self
                .tree
                .branches
                .iter()
                .filter(|(host, other)| **host != self.me && same_site(&other.site))
                .map(|(host, _)| *host)
                .collect();
            if let Some(size) = self.config.sample_branches.filter(|_| sample) {
                branches.shuffle(&mut self.rng);
                branches.truncate(size);
            }
            leaves.extend(branches);
        }
        leaves
    }

    fn samples(&self) -> bool {
        self.config.sample_branches.is_some() || self.config.sample_leaves.is_some()
    }

    /// This host's buckets with room for the request, stamped with the
    /// commits from the asking root applied so far.
    fn local_candidates(&self, request: &Request, root: (HostId, u64)) -> Vec<Candidate> {
        let applied = self.applied.get(&root).map_or(0, |applied| applied.watermark);
        let incarnation = self.incarnation;
        self.buckets
            .values()
            .map(|bucket| Candidate { applied, incarnation, ..Candidate::from_bucket(bucket) })
            .filter(|c| c.free_bytes >= request.bytes)
            .collect()
    }

    /// Starts answering for this host's subtree; `may_sample` is false when
    /// every child must be asked.
    fn start(
        &mut self,
        now: Millis,
        requester: Requester,
        request: Request,
        may_sample: bool,
        root: (HostId, u64),
        out: &mut Vec<Output>,
    ) {
        let key = request.id;
        if self.pending.contains_key(&key) {
            return; // a duplicate query
        }
        let sample = may_sample && self.samples();
        let candidates = self.local_candidates(&request, root);
        let children = self.children(&request, sample);
        let timeout = if self.is_root() && requester == Requester::Client {
            self.config.root_timeout
        } else {
            self.config.branch_timeout
        };
        for child in &children {
            out.push(Output::Send {
                to: *child,
                message: SchedulerMessage::Query {
                    request: request.clone(),
                    everyone: !sample,
                    root: root.0,
                    incarnation: root.1,
                },
            });
        }
        let waiting: BTreeSet<HostId> = children.into_iter().collect();
        let done = waiting.is_empty();
        self.pending
            .insert(key, Pending { requester, request, sampled: sample, waiting, candidates, deadline: now + timeout });
        self.deadlines.insert((now + timeout, key));
        if done {
            self.finish(now, key, out);
        }
    }

    fn finish(&mut self, now: Millis, key: u64, out: &mut Vec<Output>) {
        let Some(pending) = self.pending.remove(&key) else { return };
        self.deadlines.remove(&(pending.deadline, key));
        let request = pending.request;
        match pending.requester {
            Requester::Parent(parent) => {
                let keep = self.config.shortlist_per_bucket * request.count.max(1);
                let candidates = shortlist(&request, pending.candidates, keep);
                out.push(Output::Send {
                    to: parent,
                    message: SchedulerMessage::Answer { request_id: request.id, candidates },
                });
            }
            Requester::Client => {
                let mut candidates = pending.candidates;
                // What this root granted and the leaf had not applied when
                // it measured its answer is not in the answer: count it as
                // used. A grant a leaf acknowledged is in what any later
                // incarnation of that leaf measures.
                for candidate in candidates.iter_mut() {
                    let host = candidate.bucket.host;
                    let later: u64 = self
                        .grants
                        .range((host, candidate.applied + 1)..=(host, u64::MAX))
                        .filter(|(_, grant)| {
                            grant.bucket == candidate.bucket
                                && grant.acked.is_none_or(|(_, leaf)| candidate.incarnation <= leaf)
                        })
                        .map(|(_, grant)| grant.bytes)
                        .sum();
                    candidate.free_bytes = candidate.free_bytes.saturating_sub(later);
                }
                let result = choose(&request, &candidates);
                if result.is_err() && pending.sampled {
                    // The sample was unlucky: ask everyone before saying no.
                    self.start(now, Requester::Client, request, false, (self.me, self.incarnation), out);
                    return;
                }
                if let Ok(chosen) = &result {
                    for candidate in chosen {
                        let host = candidate.bucket.host;
                        let sequence = self.next_sequence.entry(host).or_insert(0);
                        *sequence += 1;
                        let sequence = *sequence;
                        self.grants.insert(
                            (host, sequence),
                            Grant { bucket: candidate.bucket, bytes: request.bytes, sent: now, acked: None },
                        );
                        let message = SchedulerMessage::Commit {
                            incarnation: self.incarnation,
                            sequence,
                            floor: self.floor(host),
                            bucket: candidate.bucket,
                            bytes: request.bytes,
                        };
                        if host == self.me {
                            self.handle(now, self.me, message, out);
                        } else {
                            out.push(Output::Send { to: host, message });
                        }
                    }
                }
                out.push(Output::Placed { request_id: request.id, result });
            }
        }
    }

    /// Every sequence to `host` up to this one was acknowledged.
    fn floor(&self, host: HostId) -> u64 {
        let unacked = self
            .grants
            .range((host, 0)..=(host, u64::MAX))
            .find(|(_, grant)| grant.acked.is_none())
            .map(|((_, sequence), _)| *sequence);
        match unacked {
            Some(sequence) => sequence - 1,
            None => self.next_sequence.get(&host).copied().unwrap_or(0),
        }
    }

    /// Timeouts and retransmissions. Returns when it next needs to run.
    pub fn tick(&mut self, now: Millis, out: &mut Vec<Output>) -> Option<Millis> {
        while let Some(&(deadline, key)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            self.finish(now, key, out);
        }
        if now >= self.next_grant_scan && !self.grants.is_empty() {
            self.next_grant_scan = now + self.config.commit_retry / 2;
            // Every request started before the ack has finished by now.
            let forget_before = now.saturating_sub(self.config.root_timeout + 1);
            self.grants.retain(|_, grant| grant.acked.is_none_or(|(acked, _)| acked >= forget_before));
            let floors: BTreeMap<HostId, u64> =
                self.next_sequence.keys().map(|host| (*host, self.floor(*host))).collect();
            for ((host, sequence), grant) in self.grants.iter_mut() {
                if grant.acked.is_none() && now >= grant.sent + self.config.commit_retry {
                    grant.sent = now;
                    out.push(Output::Send {
                        to: *host,
                        message: SchedulerMessage::Commit {
                            incarnation: self.incarnation,
                            sequence: *sequence,
                            floor: floors.get(host).copied().unwrap_or(0),
                            bucket: grant.bucket,
                            bytes: grant.bytes,
                        },
                    });
                }
            }
        }
        let next_deadline = self.deadlines.first().map(|(deadline, _)| *deadline);
        let next_scan = (!self.grants.is_empty()).then_some(self.next_grant_scan);
        next_deadline.into_iter().chain(next_scan).min()
    }
}
