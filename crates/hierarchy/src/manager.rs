//! The management node's side: places hosts in the tree and mutates it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::tree::{Branch, Tree};
use crate::HostId;

#[derive(Clone, Debug)]
pub struct ManagerConfig {
    /// Hosts one branch aggregates, its own included. Why 32: a branch's
    /// summary stays one small message, and 5,000 hosts need ~160 branches.
    pub fanout: usize,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig { fanout: 32 }
    }
}

/// What the manager knows of a host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    pub site: Option<String>,
}

/// Places hosts in the tree and repairs it. It holds only live hosts: a
/// failed host leaves the tree, a returning one is placed again.
#[derive(Clone, Debug)]
pub struct Manager {
    config: ManagerConfig,
    tree: Tree,
    hosts: BTreeMap<HostId, HostInfo>,
    /// The host the manager runs on: it takes the root role when it can, so
    /// the root's reports to the manager cost no message.
    home: Option<HostId>,
}

impl Manager {
    /// A manager taking over `tree` (from the catalog) on host `home`.
    pub fn new(config: ManagerConfig, tree: Tree, hosts: BTreeMap<HostId, HostInfo>, home: Option<HostId>) -> Manager {
        let mut manager = Manager { config, tree, hosts, home };
        // Hosts the tree has but the manager does not know (say, records
        // from an older catalog) are dropped; known hosts missing from the
        // tree are placed.
        let stale: Vec<HostId> =
            manager.tree.hosts().into_iter().filter(|host| !manager.hosts.contains_key(host)).collect();
        let mut changed = false;
        for host in stale {
            changed |= manager.detach(host);
        }
        let missing: Vec<HostId> = manager.hosts.keys().copied().filter(|host| !manager.tree.contains(*host)).collect();
        for host in missing {
            manager.attach(host);
            changed = true;
        }
        changed |= manager.settle_root();
        if changed {
            manager.tree.epoch += 1;
        }
        manager
    }

    pub fn tree(&self) -> &Tree {
        &self.tree
    }

    pub fn hosts(&self) -> &BTreeMap<HostId, HostInfo> {
        &self.hosts
    }

    /// A host registered or came back. Returns whether the tree changed.
    pub fn host_up(&mut self, host: HostId, info: HostInfo) -> bool {
        let site_changed = self.hosts.get(&host).is_some_and(|known| known.site != info.site);
        self.hosts.insert(host, info);
        let mut changed = false;
        if site_changed {
            changed |= self.detach(host);
        }
        if !self.tree.contains(host) {
            self.attach(host);
            changed = true;
        }
        changed |= self.settle_root();
        self.bump(changed)
    }

    /// A host failed (confirmed). Returns whether the tree changed.
    pub fn host_down(&mut self, host: HostId) -> bool {
        self.hosts.remove(&host);
        let changed = self.detach(host) | self.settle_root();
        self.bump(changed)
    }

    /// The manager moved to `home` (a new log leader). The caller should
    /// hint the previous root (`Input::Suspect`) to the new root's agent.
    pub fn take_over(&mut self, home: HostId) -> bool {
        self.home = Some(home);
        let changed = self.settle_root();
        self.bump(changed)
    }

    fn bump(&mut self, changed: bool) -> bool {
        if changed {
            self.tree.epoch += 1;
        }
        changed
    }

    /// Attaches a host: to the fullest-but-not-full branch of its site (so
    /// branches fill up and there are few), else as a new branch.
    fn attach(&mut self, host: HostId) {
        let site = self.hosts.get(&host).and_then(|info| info.site.clone());
        let capacity = self.config.fanout.saturating_sub(1).max(1);
        let target = self
            .tree
            .branches
            .iter()
            .filter(|(_, branch)| branch.site == site && branch.children.len() < capacity)
            .max_by_key(|(id, branch)| (branch.children.len(), std::cmp::Reverse(**id)))
            .map(|(id, _)| *id);
        match target {
            Some(branch) => {
                self.tree.branches.get_mut(&branch).expect("found above").children.insert(host);
            }
            None => {
                self.tree.branches.insert(host, Branch { site, children: BTreeSet::new() });
            }
        }
    }

    /// Takes a host out of the tree. A branch's role passes to one of its
    /// children (the lowest id), which keeps the others.
    fn detach(&mut self, host: HostId) -> bool {
        if let Some(branch) = self.tree.branches.remove(&host) {
            let mut children = branch.children;
            if let Some(successor) = children.pop_first() {
                self.tree.branches.insert(successor, Branch { site: branch.site, children });
            }
            return true;
        }
        if let Some(parent) = self.tree.branch_of(host) {
            self.tree.branches.get_mut(&parent).expect("found above").children.remove(&host);
            return true;
        }
        false
    }

    /// Makes sure exactly one live branch host is root: the manager's home
    /// if it is in the tree (promoted to a branch if it was a leaf), else
    /// the current root if alive, else the lowest branch.
    fn settle_root(&mut self) -> bool {
        let before = self.tree.root;
        if let Some(home) = self.home.filter(|home| self.hosts.contains_key(home)) {
            if !self.tree.branches.contains_key(&home) {
                self.detach(home);
                let site = self.hosts[&home].site.clone();
                self.tree.branches.insert(home, Branch { site, children: BTreeSet::new() });
            }
            self.tree.root = Some(home);
        } else if !self.tree.root.is_some_and(|root| self.tree.branches.contains_key(&root)) {
            self.tree.root = self.tree.branches.keys().next().copied();
        }
        self.tree.root != before
    }

    /// The tree's invariants, plus: every known host is in it, no unknown
    /// host is, and a branch's children share its site.
    pub fn check(&self) -> Result<(), String> {
        self.tree.check()?;
        let in_tree = self.tree.hosts();
        let known: BTreeSet<HostId> = self.hosts.keys().copied().collect();
        if in_tree != known {
            return Err(format!("tree holds {in_tree:?}, live hosts are {known:?}"));
        }
        for (id, branch) in &self.tree.branches {
            if branch.children.len() + 1 > self.config.fanout.max(2) {
                return Err(format!("branch {id} aggregates {} hosts", branch.children.len() + 1));
            }
            for child in &branch.children {
                if self.hosts[child].site != branch.site {
                    return Err(format!("host {child} sits under branch {id} of another site"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn info(site: u8) -> HostInfo {
        HostInfo { site: Some(format!("site-{site}")) }
    }

    #[test]
    fn a_small_cluster_has_one_branch_at_the_root() {
        let mut manager = Manager::new(ManagerConfig::default(), Tree::default(), BTreeMap::new(), Some(1));
        for host in 1..=3 {
            manager.host_up(host, HostInfo { site: None });
        }
        manager.check().unwrap();
        let tree = manager.tree();
        assert_eq!(tree.root, Some(1));
        assert_eq!(tree.branches.len(), 1);
        assert_eq!(tree.role(2).unwrap().parent, Some(1));
        assert_eq!(tree.role(1).unwrap().watches, vec![2, 3]);
    }

    #[test]
    fn a_failed_branch_passes_its_role_to_a_child() {
        let config = ManagerConfig { fanout: 4 };
        let mut manager = Manager::new(config, Tree::default(), BTreeMap::new(), Some(1));
        for host in 1..=10 {
            manager.host_up(host, info(0));
        }
        manager.check().unwrap();
        let victim = *manager.tree().branches.keys().find(|branch| Some(**branch) != manager.tree().root).unwrap();
        let orphans = manager.tree().branches[&victim].children.clone();
        let epoch = manager.tree().epoch;
        assert!(manager.host_down(victim));
        manager.check().unwrap();
        assert!(manager.tree().epoch > epoch);
        for orphan in orphans {
            assert!(manager.tree().contains(orphan), "host {orphan} lost its place");
        }
    }

    #[test]
    fn the_root_follows_the_manager() {
        let mut manager = Manager::new(ManagerConfig { fanout: 4 }, Tree::default(), BTreeMap::new(), Some(1));
        for host in 1..=6 {
            manager.host_up(host, info(0));
        }
        manager.host_down(1);
        manager.check().unwrap();
        assert_ne!(manager.tree().root, Some(1));
        manager.take_over(5);
        manager.check().unwrap();
        assert_eq!(manager.tree().root, Some(5));
        assert!(manager.tree().role(5).unwrap().is_branch);
    }

    #[derive(Clone, Debug)]
    enum Event {
        Up(u8, u8),
        Down(u8),
        TakeOver(u8),
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            5 => (0u8..60, 0u8..3).prop_map(|(host, site)| Event::Up(host, site)),
            3 => (0u8..60).prop_map(Event::Down),
            1 => (0u8..60).prop_map(Event::TakeOver),
        ]
    }

    proptest! {
        #[test]
        fn invariants_hold_under_any_sequence(events in proptest::collection::vec(event(), 1..200), fanout in 2usize..8) {
            let mut manager = Manager::new(ManagerConfig { fanout }, Tree::default(), BTreeMap::new(), None);
            for event in events {
                let epoch = manager.tree().epoch;
                let before = manager.tree().clone();
                let changed = match event {
                    Event::Up(host, site) => manager.host_up(host as u64, info(site)),
                    Event::Down(host) => manager.host_down(host as u64),
                    Event::TakeOver(host) => manager.take_over(host as u64),
                };
                prop_assert!(manager.check().is_ok(), "{:?}", manager.check());
                prop_assert_eq!(changed, manager.tree().epoch == epoch + 1);
                if !changed {
                    prop_assert_eq!(&before, manager.tree());
                }
                // A restarted manager on the same records builds an equal tree.
                let reloaded = Manager::new(ManagerConfig { fanout }, manager.tree().clone(), manager.hosts().clone(), None);
                prop_assert!(reloaded.check().is_ok());
            }
        }
    }
}
