//! The tree: who is root, which hosts are branches, whose children are whose.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::HostId;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Branch {
    /// The site this branch aggregates (`None`: hosts without a site).
    pub site: Option<String>,
    /// The leaves it aggregates, besides its own host.
    pub children: BTreeSet<HostId>,
}

/// The hierarchy, as the catalog records it. Every change bumps `epoch`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tree {
    pub epoch: u64,
    /// The root host; it is always also a branch host.
    pub root: Option<HostId>,
    /// Branch hosts and what they aggregate.
    pub branches: BTreeMap<HostId, Branch>,
}

/// A host's place in the tree.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Role {
    pub is_root: bool,
    pub is_branch: bool,
    /// Where this host reports: its branch (a leaf) or the root (a branch).
    pub parent: Option<HostId>,
    /// Whom this host watches: its children (a branch), plus every other
    /// branch host (the root).
    pub watches: Vec<HostId>,
}

impl Role {
    pub fn describe(&self) -> &'static str {
        match (self.is_root, self.is_branch) {
            (true, _) => "root",
            (false, true) => "branch",
            (false, false) => "leaf",
        }
    }
}

impl Tree {
    /// Every host in the tree.
    pub fn hosts(&self) -> BTreeSet<HostId> {
        let mut hosts = BTreeSet::new();
        for (branch, info) in &self.branches {
            hosts.insert(*branch);
            hosts.extend(info.children.iter().copied());
        }
        hosts
    }

    /// Whether a host has a place (the root is always a branch host, so it
    /// counts only as one).
    pub fn contains(&self, host: HostId) -> bool {
        self.branches.contains_key(&host) || self.branch_of(host).is_some()
    }

    /// The branch a leaf belongs to (not for branch hosts).
    pub fn branch_of(&self, host: HostId) -> Option<HostId> {
        self.branches.iter().find(|(_, branch)| branch.children.contains(&host)).map(|(id, _)| *id)
    }

    /// A host's role; `None` if the host is not in the tree.
    pub fn role(&self, host: HostId) -> Option<Role> {
        if let Some(branch) = self.branches.get(&host) {
            let is_root = self.root == Some(host);
            let mut watches: Vec<HostId> = branch.children.iter().copied().collect();
            if is_root {
                watches.extend(self.branches.keys().copied().filter(|other| *other != host));
            }
            return Some(Role { is_root, is_branch: true, parent: if is_root { None } else { self.root }, watches });
        }
        let branch = self.branch_of(host)?;
        Some(Role { is_root: false, is_branch: false, parent: Some(branch), watches: Vec::new() })
    }

    /// The parent of every host but the root, in one pass.
    pub fn parents(&self) -> BTreeMap<HostId, HostId> {
        let mut parents = BTreeMap::new();
        for (branch, info) in &self.branches {
            if self.root != Some(*branch) {
                if let Some(root) = self.root {
                    parents.insert(*branch, root);
                }
            }
            for child in &info.children {
                parents.insert(*child, *branch);
            }
        }
        parents
    }

    /// Checks the tree's invariants; says which one fails.
    pub fn check(&self) -> Result<(), String> {
        let hosts = self.hosts();
        if hosts.is_empty() {
            return if self.root.is_none() { Ok(()) } else { Err("a root outside the tree".into()) };
        }
        let Some(root) = self.root else { return Err("hosts but no root".into()) };
        if !self.branches.contains_key(&root) {
            return Err(format!("root {root} is not a branch host"));
        }
        let mut seen = BTreeSet::new();
        for (branch, info) in &self.branches {
            if !seen.insert(*branch) {
                return Err(format!("host {branch} appears twice"));
            }
            for child in &info.children {
                if !seen.insert(*child) {
                    return Err(format!("host {child} appears twice"));
                }
                if self.branches.contains_key(child) {
                    return Err(format!("branch host {child} is also a child of {branch}"));
                }
            }
        }
        let parents = self.parents();
        for host in &hosts {
            let has_parent = parents.contains_key(host);
            if *host == root && has_parent {
                return Err("the root has a parent".into());
            }
            if *host != root && !has_parent {
                return Err(format!("host {host} has no parent"));
            }
        }
        Ok(())
    }
}
