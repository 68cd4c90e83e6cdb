//! A host's side of the hierarchy: heartbeats up, watching down.
//!
//! A leaf sends a heartbeat to its branch every `heartbeat_interval`. A
//! branch sends one summary to the root instead (its own liveness and any
//! children it found failed). The root watches the branch hosts; a branch
//! watches its children. A watched host silent for `suspect_after` is
//! suspected and probed every `probe_interval`; any answer clears it. Silent
//! for `fail_after`, it is failed: a branch reports it in a summary sent at
//! once, the root reports it to the manager. Suspicion and probes keep a
//! few lost messages or a short stall from flapping membership.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::tree::{Role, Tree};
use crate::{HostId, Millis};

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub heartbeat_interval: Millis,
    pub suspect_after: Millis,
    pub fail_after: Millis,
    pub probe_interval: Millis,
}

impl Default for AgentConfig {
    /// A report every 1.05 s: 5% under one message per host per second, so
    /// probes and the re-reports that follow tree changes keep the total
    /// under one. A failure is confirmed after 3.5 s of silence, the last
    /// second of it probed.
    fn default() -> Self {
        AgentConfig { heartbeat_interval: 1050, suspect_after: 2500, fail_after: 3500, probe_interval: 250 }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Leaf → branch.
    Heartbeat {
        epoch: u64,
    },
    /// Branch → root: the branch is alive; these children failed.
    Summary {
        epoch: u64,
        failed: Vec<HostId>,
    },
    Probe {
        nonce: u64,
    },
    ProbeReply {
        nonce: u64,
    },
}

#[derive(Clone, Debug)]
pub enum Input {
    /// The tree changed (from the catalog).
    Tree(Arc<Tree>),
    /// Start probing this watched host now (a new manager's hint that the
    /// previous root, whose leadership it lost, is probably gone).
    Suspect(HostId),
    Received {
        from: HostId,
        message: Message,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    Send {
        to: HostId,
        message: Message,
    },
    /// The root found these hosts failed: the manager decides.
    Failed(HostId),
    /// A watched host became suspect (for metrics and logs).
    Suspected(HostId),
    /// A suspect answered after all.
    Cleared(HostId),
}

#[derive(Clone, Debug)]
struct Watch {
    last_heard: Millis,
    suspected: bool,
    last_probe: Option<Millis>,
    /// Probes sent since it became suspect.
    probes: u32,
}

/// Probes that must go unanswered before a silent host is failed: silence
/// alone is not enough (the watcher may have been the one paused, or a
/// heartbeat lost just before a short stall).
const PROBES_BEFORE_FAILURE: u32 = 2;

pub struct Agent {
    me: HostId,
    config: AgentConfig,
    tree: Arc<Tree>,
    role: Option<Role>,
    watched: BTreeMap<HostId, Watch>,
    /// A child was just found failed: the summary goes up now, not at the
    /// next period.
    report_now: bool,
    /// Hosts this agent found failed that the tree still has it watch, with
    /// when the root last reported them: a report can be lost (a dropped
    /// summary, no manager during a hand-over), so it is repeated until
    /// the tree lets them go or they speak again.
    reported: BTreeMap<HostId, Millis>,
    /// At the root: hosts a branch reported failed, which the root probes
    /// itself before it reports them to the manager. A branch's report
    /// can be stale: one cut off from its children finds them failed, and
    /// its summaries reach the root when the cut heals.
    verifying: BTreeMap<HostId, Watch>,
    last_report: Option<Millis>,
    /// When `tick` last ran: a long gap means this host was paused.
    last_tick: Option<Millis>,
    next_nonce: u64,
}

impl Agent {
    pub fn new(me: HostId, config: AgentConfig) -> Agent {
        Agent {
            me,
            config,
            tree: Arc::new(Tree::default()),
            role: None,
            watched: BTreeMap::new(),
            report_now: false,
            reported: BTreeMap::new(),
            verifying: BTreeMap::new(),
            last_report: None,
            last_tick: None,
            next_nonce: 0,
        }
    }

    pub fn role(&self) -> Option<&Role> {
        self.role.as_ref()
    }

    pub fn suspects(&self) -> Vec<HostId> {
        self.watched.iter().filter(|(_, watch)| watch.suspected).map(|(host, _)| *host).collect()
    }

    /// Handles one input at time `now`; call [`Agent::tick`] too.
    pub fn handle(&mut self, now: Millis, input: Input, out: &mut Vec<Output>) {
        match input {
            Input::Tree(tree) => self.set_tree(now, tree),
            Input::Suspect(host) => {
                if let Some(watch) = self.watched.get_mut(&host) {
                    watch.last_heard = watch.last_heard.min(now.saturating_sub(self.config.suspect_after));
                }
            }
            Input::Received { from, message } => match message {
                Message::Heartbeat { .. } => self.heard(from, now, out),
                Message::Summary { failed, .. } => {
                    self.heard(from, now, out);
                    if self.role.as_ref().is_some_and(|role| role.is_root) {
                        for host in failed {
                            self.verify(now, host, out);
                        }
                    }
                }
                Message::Probe { nonce } => out.push(Output::Send { to: from, message: Message::ProbeReply { nonce } }),
                Message::ProbeReply { .. } => self.heard(from, now, out),
            },
        }
    }

    /// A branch reported `host` failed: the root probes it, and reports it
    /// to the manager only if it does not answer either.
    fn verify(&mut self, now: Millis, host: HostId, out: &mut Vec<Output>) {
        if host == self.me || self.reported.contains_key(&host) || self.verifying.contains_key(&host) {
            return;
        }
        if let Some(watch) = self.watched.get_mut(&host) {
            // Watched here too: suspected now, failed as any silent one.
            watch.last_heard = watch.last_heard.min(now.saturating_sub(self.config.suspect_after));
            return;
        }
        self.verifying.insert(host, Watch { last_heard: now, suspected: true, last_probe: None, probes: 0 });
        out.push(Output::Suspected(host));
    }

    fn heard(&mut self, from: HostId, now: Millis, out: &mut Vec<Output>) {
        if self.verifying.remove(&from).is_some() {
            out.push(Output::Cleared(from));
        }
        if self.reported.remove(&from).is_some() {
            // Found failed, yet it speaks (it was paused, or it came back
            // and is in the tree again): watch it afresh, if this host
            // watches it (the root also fails hosts branches reported).
            if self.role.as_ref().is_some_and(|role| role.watches.contains(&from)) {
                self.watched.insert(from, Watch { last_heard: now, suspected: false, last_probe: None, probes: 0 });
            }
            return;
        }
        if let Some(watch) = self.watched.get_mut(&from) {
            watch.last_heard = watch.last_heard.max(now);
            if watch.suspected {
                watch.suspected = false;
                watch.last_probe = None;
                watch.probes = 0;
                out.push(Output::Cleared(from));
            }
        }
    }

    fn set_tree(&mut self, now: Millis, tree: Arc<Tree>) {
        if tree.epoch < self.tree.epoch {
            return; // an older tree delivered late
        }
        let role = tree.role(self.me);
        let watches = role.as_ref().map(|role| role.watches.clone()).unwrap_or_default();
        // Newly watched hosts get a full grace period; hosts still watched
        // keep their history.
        // Hosts found failed stay failed while the tree still has them
        // here; the rest are forgotten.
        let mut watched = BTreeMap::new();
        self.reported.retain(|host, _| watches.contains(host));
        for host in watches {
            if self.reported.contains_key(&host) {
                continue;
            }
            let watch = self.watched.remove(&host).unwrap_or(Watch {
                last_heard: now,
                suspected: false,
                last_probe: None,
                probes: 0,
            });
            watched.insert(host, watch);
        }
        self.watched = watched;
        // Only the root verifies branches' reports, and only of hosts in
        // the tree.
        if !role.as_ref().is_some_and(|role| role.is_root) {
            self.verifying.clear();
        }
        self.verifying.retain(|host, _| tree.role(*host).is_some());
        let was_root = self.role.as_ref().is_some_and(|role| role.is_root);
        if role.as_ref().map(|role| role.parent) != self.role.as_ref().map(|role| role.parent) && !was_root {
            // A new parent should hear from us at once.
            self.last_report = None;
        }
        self.role = role;
        self.tree = tree;
    }

    /// Advances time: heartbeats, probes, failures. Returns when it next
    /// needs to run.
    pub fn tick(&mut self, now: Millis, out: &mut Vec<Output>) -> Millis {
        // If this host itself was paused (a stall, a long GC, a suspended
        // VM) it heard nothing for a while through no fault of the watched
        // hosts: give each a fresh window rather than fail them all.
        if self.last_tick.is_some_and(|last| now.saturating_sub(last) >= self.config.suspect_after) {
            for watch in self.watched.values_mut() {
                watch.last_heard = watch.last_heard.max(now.saturating_sub(self.config.heartbeat_interval));
            }
            for watch in self.verifying.values_mut() {
                watch.last_heard = now;
                watch.probes = 0;
            }
        }
        self.last_tick = Some(now);
        let Some(role) = self.role.clone() else { return now + self.config.heartbeat_interval };
        let mut confirmed = Vec::new();
        let mut next = now + self.config.heartbeat_interval;
        for (host, watch) in self.watched.iter_mut() {
            let silence = now.saturating_sub(watch.last_heard);
            if silence >= self.config.fail_after && watch.probes >= PROBES_BEFORE_FAILURE {
                confirmed.push(*host);
                continue;
            }
            if silence >= self.config.suspect_after {
                if !watch.suspected {
                    watch.suspected = true;
                    out.push(Output::Suspected(*host));
                }
                probe_when_due(*host, watch, now, self.config.probe_interval, &mut self.next_nonce, out);
                next = next.min(now + self.config.probe_interval);
            } else {
                next = next.min(watch.last_heard + self.config.suspect_after);
            }
            next = next.min(watch.last_heard + self.config.fail_after);
        }
        // Hosts a branch reported: failed once the root's own probes went
        // unanswered, each for a full probe interval, for as long as the
        // probing of a host it watches itself lasts (`fail_after` less
        // `suspect_after`; its `last_heard` is when the report came).
        let window = self.config.fail_after.saturating_sub(self.config.suspect_after);
        for (host, watch) in self.verifying.iter_mut() {
            let answered_by = watch.last_probe.map(|last| last + self.config.probe_interval);
            if watch.probes >= PROBES_BEFORE_FAILURE
                && now >= watch.last_heard + window
                && answered_by.is_some_and(|by| now >= by)
            {
                confirmed.push(*host);
                continue;
            }
            probe_when_due(*host, watch, now, self.config.probe_interval, &mut self.next_nonce, out);
            next = next.min(watch.last_probe.unwrap_or(now) + self.config.probe_interval);
        }
        for host in confirmed {
            self.watched.remove(&host);
            self.verifying.remove(&host);
            self.reported.insert(host, now);
            if role.is_root {
                out.push(Output::Failed(host));
            } else {
                self.report_now = true;
            }
        }
        // A report can be lost: the root repeats its own every period; a
        // branch repeats them in every summary.
        if role.is_root {
            for (host, last) in self.reported.iter_mut() {
                if now >= *last + self.config.heartbeat_interval {
                    *last = now;
                    out.push(Output::Failed(*host));
                }
                next = next.min(*last + self.config.heartbeat_interval);
            }
        }
        if let Some(parent) = role.parent {
            let due = self.last_report.is_none_or(|last| now >= last + self.config.heartbeat_interval);
            // A failure goes up at once, not at the next period.
            if due || self.report_now {
                self.report_now = false;
                let message = if role.is_branch {
                    Message::Summary { epoch: self.tree.epoch, failed: self.reported.keys().copied().collect() }
                } else {
                    Message::Heartbeat { epoch: self.tree.epoch }
                };
                out.push(Output::Send { to: parent, message });
                self.last_report = Some(now);
            }
            next = next.min(self.last_report.unwrap_or(now) + self.config.heartbeat_interval);
        }
        next.max(now + 1)
    }
}

/// Probes `host` if its last probe is `interval` old, or it has none.
fn probe_when_due(
    host: HostId,
    watch: &mut Watch,
    now: Millis,
    interval: Millis,
    nonce: &mut u64,
    out: &mut Vec<Output>,
) {
    if watch.last_probe.is_none_or(|last| now >= last + interval) {
        watch.last_probe = Some(now);
        watch.probes += 1;
        *nonce += 1;
        out.push(Output::Send { to: host, message: Message::Probe { nonce: *nonce } });
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::tree::Branch;

    /// Root 1 (branch of 2, 3); branch 4 (children 5, 6).
    fn tree() -> Arc<Tree> {
        let mut tree = Tree { epoch: 1, root: Some(1), branches: BTreeMap::new() };
        tree.branches.insert(1, Branch { site: None, children: BTreeSet::from([2, 3]) });
        tree.branches.insert(4, Branch { site: None, children: BTreeSet::from([5, 6]) });
        Arc::new(tree)
    }

    fn config() -> AgentConfig {
        AgentConfig { heartbeat_interval: 1000, ..AgentConfig::default() }
    }

    fn agent(me: HostId) -> Agent {
        let mut agent = Agent::new(me, config());
        agent.handle(0, Input::Tree(tree()), &mut Vec::new());
        agent
    }

    #[test]
    fn leaves_heartbeat_and_branches_summarize_once_per_period() {
        let mut leaf = agent(5);
        let mut out = Vec::new();
        leaf.tick(0, &mut out);
        assert_eq!(out, vec![Output::Send { to: 4, message: Message::Heartbeat { epoch: 1 } }]);
        out.clear();
        leaf.tick(500, &mut out);
        assert!(out.is_empty(), "nothing before the period is up");
        let mut branch = agent(4);
        branch.tick(0, &mut out);
        assert_eq!(out, vec![Output::Send { to: 1, message: Message::Summary { epoch: 1, failed: vec![] } }]);
    }

    #[test]
    fn silence_leads_to_suspicion_probes_then_failure() {
        let mut branch = agent(4);
        let mut out = Vec::new();
        for now in (0..=2000).step_by(1000) {
            branch.handle(now, Input::Received { from: 5, message: Message::Heartbeat { epoch: 1 } }, &mut out);
            branch.handle(now, Input::Received { from: 6, message: Message::Heartbeat { epoch: 1 } }, &mut out);
            branch.tick(now, &mut out);
        }
        out.clear();
        // Host 6 goes quiet at 2000; host 5 keeps going.
        let mut failed_at = None;
        for now in (2100..8000).step_by(100) {
            if now % 1000 == 0 {
                branch.handle(now, Input::Received { from: 5, message: Message::Heartbeat { epoch: 1 } }, &mut out);
            }
            branch.tick(now, &mut out);
            if out.contains(&Output::Send { to: 1, message: Message::Summary { epoch: 1, failed: vec![6] } }) {
                failed_at = Some(now);
                break;
            }
        }
        assert!(out.contains(&Output::Suspected(6)));
        assert!(out.iter().any(|output| matches!(output, Output::Send { to: 6, message: Message::Probe { .. } })));
        assert!(!out.contains(&Output::Suspected(5)));
        assert_eq!(failed_at, Some(2000 + 3500), "failed exactly fail_after after the last heartbeat");
    }

    #[test]
    fn a_probe_answer_clears_suspicion() {
        let mut root = agent(1);
        let mut out = Vec::new();
        root.tick(2600, &mut out); // every watched host is now suspect
        assert!(out.contains(&Output::Suspected(4)));
        root.handle(2700, Input::Received { from: 4, message: Message::ProbeReply { nonce: 1 } }, &mut out);
        assert!(out.contains(&Output::Cleared(4)));
        out.clear();
        for now in (2650..=3600).step_by(50) {
            root.tick(now, &mut out);
        }
        assert!(!out.contains(&Output::Failed(4)), "{out:?}");
        assert!(out.contains(&Output::Failed(2)), "the root's own silent children fail");
    }

    #[test]
    fn a_hinted_host_is_probed_at_once_and_failed_sooner() {
        let mut root = Agent::new(1, config());
        let mut out = Vec::new();
        root.handle(10_000, Input::Tree(tree()), &mut out);
        root.handle(10_100, Input::Suspect(4), &mut out);
        root.tick(10_100, &mut out);
        assert!(out.contains(&Output::Suspected(4)));
        assert!(!out.contains(&Output::Suspected(2)), "only the hinted host");
        out.clear();
        for now in (10_150..=10_100 + 1000).step_by(50) {
            root.tick(now, &mut out);
        }
        assert!(out.contains(&Output::Failed(4)), "fail_after - suspect_after after the hint: {out:?}");
    }

    #[test]
    fn a_host_that_was_paused_does_not_fail_those_it_watches() {
        let mut branch = agent(4);
        let mut out = Vec::new();
        branch.tick(1000, &mut out);
        // Paused from 1000 to 6000: its children's heartbeats wait unread.
        branch.tick(6000, &mut out);
        assert!(!out.iter().any(|output| matches!(output, Output::Send { message: Message::Summary { failed, .. }, .. } if !failed.is_empty())), "{out:?}");
        branch.handle(6001, Input::Received { from: 5, message: Message::Heartbeat { epoch: 1 } }, &mut out);
        out.clear();
        // Host 6 really is gone: it fails a window later.
        let mut failed = false;
        for now in (6100..12000).step_by(100) {
            if now % 1000 == 0 {
                branch.handle(now, Input::Received { from: 5, message: Message::Heartbeat { epoch: 1 } }, &mut out);
            }
            branch.tick(now, &mut out);
            failed |= out.iter().any(|output| matches!(output, Output::Send { message: Message::Summary { failed, .. }, .. } if failed == &vec![6]));
        }
        assert!(failed);
    }

    /// A host a branch reports failed is failed once it does not answer the
    /// root's own probes either.
    #[test]
    fn the_root_forwards_failures_from_summaries_once_its_own_probes_go_unanswered() {
        let mut root = agent(1);
        let mut out = Vec::new();
        root.handle(10, Input::Received { from: 4, message: Message::Summary { epoch: 1, failed: vec![6] } }, &mut out);
        assert_eq!(out, vec![Output::Suspected(6)]);
        let mut probes = 0;
        let mut failed_at = None;
        for now in (10..2000).step_by(10) {
            out.clear();
            root.tick(now, &mut out);
            probes += out
                .iter()
                .filter(|output| matches!(output, Output::Send { to: 6, message: Message::Probe { .. } }))
                .count();
            if failed_at.is_none() && out.contains(&Output::Failed(6)) {
                failed_at = Some(now);
            }
        }
        // Probed as long as a host it watches is before it fails: 1 s, a
        // probe every 250 ms.
        let window = config().fail_after - config().suspect_after;
        assert_eq!(probes as u64, window / config().probe_interval, "probes before the failure");
        let failed_at = failed_at.expect("host 6 was not failed");
        assert!((10 + window..=10 + window + 250).contains(&failed_at), "failed at {failed_at}");
    }

    /// A stale report (a branch cut off from the host, its summary arriving
    /// when the cut heals) does not fail a host that answers the root.
    #[test]
    fn a_host_a_branch_reports_failed_that_answers_the_roots_probe_is_not_failed() {
        let mut root = agent(1);
        let mut out = Vec::new();
        root.handle(10, Input::Received { from: 4, message: Message::Summary { epoch: 1, failed: vec![6] } }, &mut out);
        root.tick(20, &mut out);
        let nonce = out
            .iter()
            .find_map(|output| match output {
                Output::Send { to: 6, message: Message::Probe { nonce } } => Some(*nonce),
                _ => None,
            })
            .expect("host 6 probed");
        root.handle(30, Input::Received { from: 6, message: Message::ProbeReply { nonce } }, &mut out);
        assert!(out.contains(&Output::Cleared(6)), "{out:?}");
        out.clear();
        for now in (40..5000).step_by(10) {
            root.tick(now, &mut out);
        }
        assert!(!out.contains(&Output::Failed(6)), "{out:?}");
    }

    /// A host that stops being root stops verifying the reports it got as
    /// root: it fails no host for them.
    #[test]
    fn a_root_that_hands_its_role_over_stops_verifying_reports() {
        let mut root = agent(1);
        let mut out = Vec::new();
        root.handle(10, Input::Received { from: 4, message: Message::Summary { epoch: 1, failed: vec![6] } }, &mut out);
        assert!(out.contains(&Output::Suspected(6)), "{out:?}");
        let mut moved = (*tree()).clone();
        moved.epoch = 2;
        moved.root = Some(4);
        root.handle(20, Input::Tree(Arc::new(moved)), &mut out);
        out.clear();
        for now in (20..3000).step_by(10) {
            root.tick(now, &mut out);
        }
        assert!(!out.contains(&Output::Failed(6)), "{out:?}");
        assert!(
            !out.iter().any(|output| matches!(output, Output::Send { to: 6, message: Message::Probe { .. } })),
            "{out:?}"
        );
    }

    fn summarized(out: &[Output], host: HostId) -> bool {
        out.iter().any(|output| {
            matches!(output, Output::Send { message: Message::Summary { failed, .. }, .. } if failed.contains(&host))
        })
    }

    #[test]
    fn a_failure_is_reported_again_until_the_tree_lets_the_host_go() {
        let mut branch = agent(4);
        let mut out = Vec::new();
        branch.tick(0, &mut out);
        let mut reports = Vec::new();
        for now in (100..20_000).step_by(100) {
            if now % 1000 == 0 {
                branch.handle(now, Input::Received { from: 5, message: Message::Heartbeat { epoch: 1 } }, &mut out);
            }
            out.clear();
            branch.tick(now, &mut out);
            if summarized(&out, 6) {
                reports.push(now);
            }
        }
        // Every report may be lost: it rides every summary from then on.
        assert_eq!(reports[0], 3500);
        assert!(reports.len() >= 15, "{reports:?}");
        assert!(reports.windows(2).all(|pair| pair[1] - pair[0] <= 1100), "{reports:?}");
        // The manager took it out: no more reports.
        let mut tree = (*tree()).clone();
        tree.epoch = 2;
        tree.branches.get_mut(&4).unwrap().children.remove(&6);
        branch.handle(20_000, Input::Tree(Arc::new(tree)), &mut out);
        out.clear();
        for now in (20_100..40_000).step_by(100) {
            branch.tick(now, &mut out);
        }
        assert!(!summarized(&out, 6), "{out:?}");
    }

    #[test]
    fn a_failed_host_that_speaks_again_is_watched_again() {
        let mut branch = agent(4);
        let mut out = Vec::new();
        branch.tick(0, &mut out);
        for now in (100..=3500).step_by(100) {
            branch.handle(now, Input::Received { from: 5, message: Message::Heartbeat { epoch: 1 } }, &mut out);
            branch.tick(now, &mut out);
        }
        assert!(summarized(&out, 6), "host 6 failed");
        // It was only paused: it heartbeats again.
        branch.handle(3600, Input::Received { from: 6, message: Message::Heartbeat { epoch: 1 } }, &mut out);
        out.clear();
        for now in (3700..9000).step_by(100) {
            if now % 1000 == 0 {
                for child in [5, 6] {
                    branch.handle(
                        now,
                        Input::Received { from: child, message: Message::Heartbeat { epoch: 1 } },
                        &mut out,
                    );
                }
            }
            branch.tick(now, &mut out);
        }
        assert!(!summarized(&out, 6), "not reported again: {out:?}");
        // And when it goes quiet for good, it fails again.
        for now in (9000..14_000).step_by(100) {
            if now % 1000 == 0 {
                branch.handle(now, Input::Received { from: 5, message: Message::Heartbeat { epoch: 1 } }, &mut out);
            }
            branch.tick(now, &mut out);
        }
        assert!(summarized(&out, 6), "{out:?}");
    }

    #[test]
    fn a_watcher_paused_briefly_after_a_lost_heartbeat_probes_before_failing() {
        let mut branch = agent(4);
        let mut out = Vec::new();
        for child in [5, 6] {
            branch.handle(1000, Input::Received { from: child, message: Message::Heartbeat { epoch: 1 } }, &mut out);
        }
        branch.tick(1000, &mut out);
        branch.tick(2500, &mut out);
        // Host 6's heartbeat at 2000 was lost; the branch stalls from 2500
        // to 4600 (too short to look like a pause) with 6 unheard for 3.6 s.
        out.clear();
        branch.tick(4600, &mut out);
        assert!(!summarized(&out, 6), "failed on silence alone: {out:?}");
        assert!(out.iter().any(|output| matches!(output, Output::Send { to: 6, message: Message::Probe { .. } })));
        branch.handle(4610, Input::Received { from: 6, message: Message::ProbeReply { nonce: 1 } }, &mut out);
        for now in (4700..6000).step_by(100) {
            branch.tick(now, &mut out);
        }
        assert!(!summarized(&out, 6), "{out:?}");
        assert!(out.contains(&Output::Cleared(6)));
    }
}
