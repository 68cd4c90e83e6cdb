//! Who owns each iSCSI target, balanced with site affinity (issue 8; spec:
//! iscsi.md, "Target service"). Pure: the node's target service applies
//! what [`plan`] decides through the catalog.
//!
//! A target's owner is the host a login through the discovery VIP is sent
//! to. A target may be affine to a site. [`plan`] decides every owner in
//! the spec's order:
//! 1. the **site objective**: for each site, the targets affine to it are
//!    spread over that site's live target hosts;
//! 2. then the **cluster objective**: the targets with no affinity (and
//!    those whose site has no live target host, until one returns) are
//!    spread over every live target host.
//!
//! Within each objective per-host counts end up differing by at most one,
//! with the fewest moves: a target stays with its owner unless the owner
//! is gone, is outside the target's site, or holds more than its share.

use std::collections::{BTreeMap, BTreeSet};

/// A live host that may own targets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    pub id: u64,
    pub site: Option<String>,
}

/// A target as the balance sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    pub owner: Option<u64>,
    /// The site the target is affine to.
    pub site: Option<String>,
}

/// The owner every target should have.
pub fn plan(hosts: &[Host], targets: &[Target]) -> BTreeMap<String, u64> {
    let mut owners = BTreeMap::new();
    if hosts.is_empty() {
        return owners;
    }
    let sites: BTreeSet<&str> = hosts.iter().filter_map(|host| host.site.as_deref()).collect();
    let mut cluster_targets = Vec::new();
    let mut site_targets: BTreeMap<&str, Vec<&Target>> = BTreeMap::new();
    for target in targets {
        match target.site.as_deref() {
            Some(site) if sites.contains(site) => site_targets.entry(site).or_default().push(target),
            _ => cluster_targets.push(target),
        }
    }
    for (site, targets) in site_targets {
        let members: Vec<u64> =
            hosts.iter().filter(|host| host.site.as_deref() == Some(site)).map(|host| host.id).collect();
        spread(&members, &targets, &mut owners);
    }
    let everyone: Vec<u64> = hosts.iter().map(|host| host.id).collect();
    spread(&everyone, &cluster_targets, &mut owners);
    owners
}

/// Spreads `targets` over `hosts` so counts differ by at most one, moving
/// as few as it can.
fn spread(hosts: &[u64], targets: &[&Target], owners: &mut BTreeMap<String, u64>) {
    let mut held: BTreeMap<u64, Vec<&str>> = hosts.iter().map(|host| (*host, Vec::new())).collect();
    let mut pool: Vec<&str> = Vec::new();
    for target in targets {
        match target.owner.and_then(|owner| held.get_mut(&owner)) {
            Some(names) => names.push(&target.name),
            None => pool.push(&target.name),
        }
    }
    // Quotas: everyone gets `base`; the `extra` hosts holding the most
    // already (ties: lower id) may keep one more.
    let (base, extra) = (targets.len() / hosts.len(), targets.len() % hosts.len());
    let mut by_load: Vec<u64> = hosts.to_vec();
    by_load.sort_by_key(|host| (std::cmp::Reverse(held[host].len()), *host));
    let quota: BTreeMap<u64, usize> =
        by_load.iter().enumerate().map(|(rank, host)| (*host, base + usize::from(rank < extra))).collect();
    for (host, names) in held.iter_mut() {
        names.sort_unstable();
        while names.len() > quota[host] {
            pool.push(names.pop().expect("more than the quota"));
        }
    }
    pool.sort_unstable();
    for name in pool {
        let host = *held
            .iter()
            .filter(|(host, names)| names.len() < quota[host])
            .min_by_key(|(host, names)| (names.len(), **host))
            .map(|(host, _)| host)
            .expect("the quotas add up to the targets");
        held.get_mut(&host).expect("a host").push(name);
    }
    for (host, names) in held {
        for name in names {
            owners.insert(name.to_string(), host);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn host(id: u64, site: &str) -> Host {
        Host { id, site: Some(site.into()) }
    }

    fn counts(owners: &BTreeMap<String, u64>, names: impl Fn(&str) -> bool) -> BTreeMap<u64, usize> {
        let mut counts = BTreeMap::new();
        for (name, owner) in owners {
            if names(name) {
                *counts.entry(*owner).or_default() += 1;
            }
        }
        counts
    }

    #[test]
    fn twelve_targets_on_two_sites_half_affine_balance_within_each_objective() {
        let hosts = vec![host(1, "a"), host(2, "a"), host(3, "b"), host(4, "b"), host(5, "b")];
        let targets: Vec<Target> = (0..12)
            .map(|index| Target {
                name: format!("t{index:02}"),
                owner: Some(1),
                site: match index % 4 {
                    0 => Some("a".into()),
                    1 => Some("b".into()),
                    _ => None,
                },
            })
            .collect();
        let owners = plan(&hosts, &targets);
        assert_eq!(owners.len(), 12);
        for target in &targets {
            let owner = owners[&target.name];
            if let Some(site) = &target.site {
                assert_eq!(hosts.iter().find(|host| host.id == owner).unwrap().site.as_ref(), Some(site));
            }
        }
        let affine_to = |site: &'static str| {
            let targets = targets.clone();
            move |name: &str| targets.iter().any(|target| target.name == name && target.site.as_deref() == Some(site))
        };
        // Site a: 3 targets over hosts 1, 2; site b: 3 over 3, 4, 5.
        let a = counts(&owners, affine_to("a"));
        assert_eq!(a.values().copied().collect::<BTreeSet<_>>(), BTreeSet::from([1, 2]), "{a:?}");
        let b = counts(&owners, affine_to("b"));
        assert_eq!(b, BTreeMap::from([(3, 1), (4, 1), (5, 1)]));
        // The other 6 over all 5 hosts: one host has 2.
        let free = counts(&owners, |name| targets.iter().any(|target| target.name == name && target.site.is_none()));
        assert_eq!(free.values().sum::<usize>(), 6);
        assert!(free.values().max().unwrap() - free.values().min().unwrap() <= 1 && free.len() == 5, "{free:?}");
    }

    #[test]
    fn a_balanced_assignment_is_left_alone_and_a_lost_host_moves_only_its_targets() {
        let hosts = vec![host(1, "a"), host(2, "a"), host(3, "a")];
        let targets: Vec<Target> =
            (0..7).map(|index| Target { name: format!("t{index}"), owner: None, site: None }).collect();
        let owners = plan(&hosts, &targets);
        let placed: Vec<Target> =
            targets.iter().map(|target| Target { owner: Some(owners[&target.name]), ..target.clone() }).collect();
        assert_eq!(plan(&hosts, &placed), owners, "a balanced plan is stable");
        let survivors = vec![host(1, "a"), host(3, "a")];
        let after = plan(&survivors, &placed);
        for target in &placed {
            if target.owner != Some(2) {
                assert_eq!(after[&target.name], target.owner.unwrap(), "{} moved needlessly", target.name);
            }
        }
    }

    proptest! {
        /// Any hosts, sites and current owners: every target gets a live
        /// owner, affine ones (with a live host in their site) one of that
        /// site, counts within each objective differ by at most one, and a
        /// second plan changes nothing.
        #[test]
        fn plans_are_balanced_affine_and_stable(
            sites in proptest::collection::vec(0u8..3, 1..8),
            targets in proptest::collection::vec((proptest::option::of(0u8..4), proptest::option::of(0u64..10)), 0..40),
        ) {
            let hosts: Vec<Host> = sites.iter().enumerate()
                .map(|(index, site)| Host { id: index as u64 + 1, site: Some(format!("s{site}")) })
                .collect();
            let targets: Vec<Target> = targets.iter().enumerate()
                .map(|(index, (site, owner))| Target {
                    name: format!("t{index:02}"),
                    owner: *owner,
                    site: site.map(|site| format!("s{site}")),
                })
                .collect();
            let owners = plan(&hosts, &targets);
            prop_assert_eq!(owners.len(), targets.len());
            let site_of = |id: u64| hosts.iter().find(|host| host.id == id).and_then(|host| host.site.clone());
            let mut groups: BTreeMap<Option<String>, Vec<&Target>> = BTreeMap::new();
            for target in &targets {
                let owner = owners[&target.name];
                prop_assert!(site_of(owner).is_some(), "owner {} is not a live host", owner);
                let served = target.site.as_ref().filter(|site| hosts.iter().any(|host| host.site.as_ref() == Some(*site)));
                if let Some(site) = served {
                    prop_assert_eq!(site_of(owner), Some(site.clone()));
                }
                groups.entry(served.cloned()).or_default().push(target);
            }
            for (site, members) in groups {
                let eligible: Vec<u64> = hosts.iter()
                    .filter(|host| site.is_none() || host.site == site)
                    .map(|host| host.id)
                    .collect();
                let mut load: BTreeMap<u64, usize> = eligible.iter().map(|id| (*id, 0)).collect();
                for target in members {
                    *load.get_mut(&owners[&target.name]).unwrap() += 1;
                }
                let (low, high) = (load.values().min().unwrap(), load.values().max().unwrap());
                prop_assert!(high - low <= 1, "site {:?}: {:?}", site, load);
            }
            let placed: Vec<Target> = targets.iter()
                .map(|target| Target { owner: Some(owners[&target.name]), ..target.clone() })
                .collect();
            prop_assert_eq!(plan(&hosts, &placed), owners);
        }
    }
}
