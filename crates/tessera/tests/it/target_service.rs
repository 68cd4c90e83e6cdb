//! The iSCSI target service (issue 8).
//! - The discovery VIP: one target host binds it; discovery through it
//!   lists every target at the VIP; a login through it is redirected to the
//!   target's host; when its owner is killed, another host takes the VIP in
//!   the catalog, binds it, and discovery and logins work through it again.
//! - Target ownership balanced with site affinity, as hosts leave and join.
//!
//! Needs libiscsi-bin (`scripts/test` installs it).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::harness::{exclusive, free_port, which, TestCluster};

const VIP_IP: &str = "127.0.0.200";
const TARGETS: [&str; 3] =
    ["iqn.2026-11.org.tessera.test:vip-a", "iqn.2026-11.org.tessera.test:vip-b", "iqn.2026-11.org.tessera.test:vip-c"];
/// Rounds of kill-and-take-over (`TESSERA_VIP_ROUNDS`, default 1;
/// `bench/vip.sh` runs more and reports the times).
fn rounds() -> usize {
    std::env::var("TESSERA_VIP_ROUNDS").ok().and_then(|rounds| rounds.parse().ok()).unwrap_or(1)
}

fn tool(name: &str) -> String {
    which(name)
        .unwrap_or_else(|| panic!("this test needs {name} (Debian package libiscsi-bin; scripts/test installs it)"))
}

fn run(cluster: &TestCluster, program: &str, args: &[&str]) -> std::process::Output {
    cluster.run_bounded(std::process::Command::new(tool(program)).args(args), Duration::from_secs(60))
}

fn tessera(cluster: &TestCluster, host: u64, args: &[&str]) -> String {
    let mut command = std::process::Command::new(crate::harness::binary());
    let output =
        cluster.run_bounded(command.args(args).args(["--admin", &cluster.admin(host)]), Duration::from_secs(60));
    assert!(output.status.success(), "tessera {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The VIP's owner and epoch as the catalog records them.
fn vip_owner(cluster: &TestCluster) -> Option<(u64, u64)> {
    let vip = cluster.status()?.vip?;
    Some((vip.owner?, vip.epoch))
}

/// Discovery through the VIP: every target, each at the VIP's portal.
fn discovers_every_target(cluster: &TestCluster, vip: &str) -> Result<(), String> {
    let output = run(cluster, "iscsi-ls", &[&format!("iscsi://{vip}")]);
    let listed = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        return Err(format!("iscsi-ls failed: {listed}{}", String::from_utf8_lossy(&output.stderr)));
    }
    for target in TARGETS {
        if !listed.lines().any(|line| line.contains(&format!("Target:{target}")) && line.contains(vip)) {
            return Err(format!("{target} is not listed at {vip}: {listed}"));
        }
    }
    Ok(())
}

fn redirected(cluster: &TestCluster, hosts: &[u64]) -> f64 {
    hosts.iter().map(|host| cluster.metric(*host, "iscsi_vip_logins_redirected_total").unwrap_or(0.0)).sum()
}

#[test]
fn the_vip_moves_to_another_host_when_its_owner_is_killed_and_logins_through_it_are_redirected() {
    let _exclusive = exclusive();
    tool("iscsi-ls");
    let port = free_port(&["127.0.0.11", "127.0.0.12", "127.0.0.13", VIP_IP]);
    let vip = format!("{VIP_IP}:{port}");
    let mut cluster = TestCluster::start_configured(3, &[("vip", &vip)], |config| {
        config.roles = vec!["storage".into(), "target".into()];
        config.iscsi_port = port;
    });
    cluster.wait_healthy(Duration::from_secs(60));
    for (index, target) in TARGETS.iter().enumerate() {
        let volume = format!("v{index}");
        tessera(&cluster, 1, &["volume", "create", &volume, "--size", "16MiB", "--policy", "raid1:2"]);
        tessera(&cluster, 1, &["target", "create", target, "--lun", &format!("0={volume}")]);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut owner, mut epoch) = loop {
        if let (Some(owner), Ok(())) = (vip_owner(&cluster), discovers_every_target(&cluster, &vip)) {
            break owner;
        }
        assert!(Instant::now() < deadline, "no host bound the VIP {vip}\n{}", cluster.report());
        std::thread::sleep(Duration::from_millis(200));
    };
    let status = cluster.status().unwrap();
    assert!(status.vip.as_ref().is_some_and(|vip_status| vip_status.address == vip), "{:?}", status.vip);

    let mut takeovers = Vec::new();
    for round in 0..rounds() {
        // A login through the VIP lands on a target's host: the owner
        // answered with a redirection, and libiscsi followed it.
        let before = redirected(&cluster, &cluster.running());
        for target in TARGETS {
            let url = format!("iscsi://{vip}/{target}/0");
            let output = run(&cluster, "iscsi-inq", &[&url]);
            let text = String::from_utf8_lossy(&output.stdout);
            assert!(output.status.success() && text.contains("Vendor:TESSERA"), "{url}: {text}");
        }
        assert!(
            redirected(&cluster, &cluster.running()) >= before + TARGETS.len() as f64,
            "the logins through the VIP were not redirected"
        );

        cluster.kill(owner);
        let killed = Instant::now();
        let deadline = killed + Duration::from_secs(60);
        let (new_owner, new_epoch) = loop {
            if let Some((new_owner, new_epoch)) = vip_owner(&cluster).filter(|(new_owner, _)| *new_owner != owner) {
                if discovers_every_target(&cluster, &vip).is_ok() {
                    break (new_owner, new_epoch);
                }
            }
            assert!(Instant::now() < deadline, "the VIP did not move off killed host {owner}\n{}", cluster.report());
            std::thread::sleep(Duration::from_millis(100));
        };
        let took = killed.elapsed();
        assert!(new_epoch > epoch, "a new owner takes a new epoch ({epoch} → {new_epoch})");
        println!("round {round}: host {owner} killed; host {new_owner} bound the VIP and discovery works in {took:?}");
        takeovers.push(took);
        // The returning host does not take the VIP back from a live owner.
        cluster.start_host(owner);
        cluster.wait_healthy(Duration::from_secs(60));
        assert_eq!(vip_owner(&cluster).map(|(owner, _)| owner), Some(new_owner), "the VIP stays with its owner");
        (owner, epoch) = (new_owner, new_epoch);
    }
    takeovers.sort();
    println!(
        "VIP takeover (kill -9 to discovery through the VIP working) over {} rounds: p50 {:?}, worst {:?}",
        takeovers.len(),
        takeovers[takeovers.len() / 2],
        takeovers[takeovers.len() - 1]
    );
}

/// Target owners as `tessera target ls --json` reports them: name →
/// (owner, site affinity).
fn owners(cluster: &TestCluster, host: u64) -> BTreeMap<String, (Option<u64>, Option<String>)> {
    let listed: Vec<node::targets::TargetStatus> =
        serde_json::from_str(&tessera(cluster, host, &["target", "ls", "--json"])).unwrap();
    listed.into_iter().map(|target| (target.name, (target.owner, target.site))).collect()
}

/// Whether the owners are balanced over the `live` hosts (id → site):
/// affine targets owned in their site, counts within each objective
/// differing by at most one. Says what is wrong if not.
fn balanced(
    owners: &BTreeMap<String, (Option<u64>, Option<String>)>,
    live: &BTreeMap<u64, &str>,
) -> Result<(), String> {
    let mut objectives: BTreeMap<Option<String>, BTreeMap<u64, usize>> = BTreeMap::new();
    for (name, (owner, site)) in owners {
        let owner = owner.ok_or_else(|| format!("{name} has no owner"))?;
        let owner_site = live.get(&owner).ok_or_else(|| format!("{name} is owned by host {owner}, not a live one"))?;
        if let Some(site) = site {
            if *owner_site != site {
                return Err(format!("{name} is affine to {site} but owned by host {owner} of {owner_site}"));
            }
        }
        let load = objectives.entry(site.clone()).or_insert_with(|| {
            live.iter()
                .filter(|(_, host_site)| site.as_deref().is_none_or(|site| **host_site == site))
                .map(|(id, _)| (*id, 0))
                .collect()
        });
        *load.entry(owner).or_default() += 1;
    }
    for (site, load) in objectives {
        let (low, high) = (load.values().min().copied().unwrap_or(0), load.values().max().copied().unwrap_or(0));
        if high - low > 1 {
            return Err(format!("objective {site:?} is unbalanced: {load:?}"));
        }
    }
    Ok(())
}

#[test]
fn target_owners_stay_balanced_within_their_site_and_the_cluster_as_hosts_leave_and_join() {
    let _exclusive = exclusive();
    let sites = ["east", "east", "west", "west"];
    let port = free_port(&["127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14"]);
    let mut cluster = TestCluster::start_in_sites(4, &[], &sites, |config| {
        config.roles = vec!["storage".into(), "target".into()];
        config.iscsi_port = port;
    });
    cluster.wait_healthy(Duration::from_secs(60));
    let all: BTreeMap<u64, &str> = (1..=4).map(|id| (id, sites[id as usize - 1])).collect();
    tessera(&cluster, 1, &["volume", "create", "shared", "--size", "16MiB", "--policy", "raid1:2"]);
    // 12 targets: 3 affine to east, 3 to west, 6 to neither.
    for index in 0..12 {
        let name = format!("iqn.2026-11.org.tessera.test:t{index:02}");
        let mut args = vec!["target", "create", &name, "--lun", "0=shared"];
        let site = match index % 4 {
            0 => Some("east"),
            1 => Some("west"),
            _ => None,
        };
        if let Some(site) = site {
            args.extend(["--site", site]);
        }
        tessera(&cluster, 1 + index % 4, &args);
    }
    let settled = |cluster: &TestCluster, live: &BTreeMap<u64, &str>, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let host = *live.keys().next().unwrap();
            let owners = owners(cluster, host);
            match balanced(&owners, live) {
                Ok(()) => return owners,
                Err(problem) if Instant::now() > deadline => panic!("{what}: {problem}\n{owners:#?}"),
                Err(_) => std::thread::sleep(Duration::from_millis(300)),
            }
        }
    };
    let created = settled(&cluster, &all, "after creating the targets");
    assert_eq!(created.len(), 12);
    println!("created: {created:?}");
    // A host of the west site leaves: its targets go to the other west host
    // (affine ones) or anywhere (the rest), balanced again.
    cluster.kill(4);
    let three: BTreeMap<u64, &str> = all.iter().filter(|(id, _)| **id != 4).map(|(id, site)| (*id, *site)).collect();
    let after_kill = settled(&cluster, &three, "after host 4 was killed");
    let kept = created.iter().filter(|(name, (owner, _))| *owner != Some(4) && after_kill[*name].0 == *owner).count();
    let survivors = created.values().filter(|(owner, _)| *owner != Some(4)).count();
    println!("after host 4 left: {after_kill:?}; {kept} of {survivors} targets of the live hosts kept their owner");
    // It returns: the hosts hand it its share back on their own.
    cluster.start_host(4);
    cluster.wait_healthy(Duration::from_secs(60));
    let rejoined = settled(&cluster, &all, "after host 4 came back");
    assert!(rejoined.values().any(|(owner, _)| *owner == Some(4)), "the returning host owns its share: {rejoined:?}");
    // `tessera target balance` finds nothing to move in a balanced cluster.
    let output = tessera(&cluster, 2, &["target", "balance"]);
    assert!(output.contains("nothing moved"), "{output}");
    // Logins through any portal still work for every target (active-active).
    let url = format!("iscsi://127.0.0.14:{port}/iqn.2026-11.org.tessera.test:t01/0");
    let output = run(&cluster, "iscsi-inq", &[&url]);
    assert!(output.status.success(), "{url}: {}", String::from_utf8_lossy(&output.stderr));
}
