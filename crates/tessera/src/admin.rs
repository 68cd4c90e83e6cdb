//! Talking to a running cluster's admin API.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use node::status::ClusterStatus;

#[derive(clap::Args)]
pub struct Target {
    /// Admin API address (host:port) of any node. Default: the hosts of
    /// the cluster in --data, else 127.0.0.1:7480 … 127.0.0.5:7480.
    #[arg(long, env = "TESSERA_ADMIN", global = true)]
    pub admin: Option<String>,
    /// Data directory of a `tessera up` cluster, to find its hosts.
    #[arg(long, default_value = "tessera-data", global = true)]
    pub data: PathBuf,
}

impl Target {
    /// Admin addresses to try, in order.
    fn endpoints(&self) -> Vec<String> {
        if let Some(admin) = &self.admin {
            return vec![admin.clone()];
        }
        let config_dir = catalog::bootstrap::ConfigDir::new(fsio::real(), self.data.join("config"));
        if let Ok(Some((_, config))) = config_dir.latest() {
            return config.hosts.iter().map(|host| host.admin_address.clone()).collect();
        }
        (1..=5).map(|host| format!("127.0.0.{host}:7480")).collect()
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(2)).timeout(Duration::from_secs(10)).build()
}

/// Sends a request to the first endpoint that answers at all.
fn request(target: &Target, method: &str, path: &str, body: Option<serde_json::Value>) -> Result<serde_json::Value> {
    let agent = agent();
    let mut failures = Vec::new();
    for endpoint in target.endpoints() {
        let url = format!("http://{endpoint}{path}");
        let call = agent.request(method, &url);
        let response = match &body {
            Some(body) => call.send_json(body.clone()),
            None => call.call(),
        };
        match response {
            Ok(response) => return response.into_json().with_context(|| format!("{url} returned malformed JSON")),
            Err(ureq::Error::Status(code, response)) => {
                let text = response.into_string().unwrap_or_default();
                let message = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|value| value.get("error").and_then(|error| error.as_str()).map(String::from))
                    .unwrap_or(text);
                bail!("{url}: HTTP {code}: {message}");
            }
            Err(error) => failures.push(format!("{endpoint}: {error}")),
        }
    }
    Err(anyhow!(
        "no Tessera node answered (is the cluster running? `tessera up` starts one):\n  {}",
        failures.join("\n  ")
    ))
}

pub fn fetch_status(target: &Target) -> Result<ClusterStatus> {
    let value = request(target, "GET", "/api/v1/status", None)?;
    serde_json::from_value(value).context("status reply did not match this version of tessera")
}

pub fn status(target: &Target, json: bool) -> Result<()> {
    let status = fetch_status(target)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render_status(&status));
    }
    Ok(())
}

pub fn render_status(status: &ClusterStatus) -> String {
    let mut out = String::new();
    let health = if status.healthy { "healthy" } else { "DEGRADED" };
    out.push_str(&format!(
        "Cluster {}: {health} ({} hosts, hierarchy epoch {})\n",
        status.cluster_id,
        status.hosts.len(),
        status.tree_epoch
    ));
    let log = &status.log;
    match &log.leader {
        Some(leader) => out.push_str(&format!(
            "Shared log: leader {} (host {leader}, term {}), commit index {}, tail {}, snapshot mark {}, {} live entries ({} bytes, {} on disk)\n",
            log.leader_name.as_deref().unwrap_or("?"),
            log.term,
            log.commit_index.map(|index| index.to_string()).unwrap_or_else(|| "-".into()),
            log.tail,
            log.snapshot_mark,
            log.live_entries,
            log.live_bytes,
            log.disk_bytes,
        )),
        None => out.push_str("Shared log: NO LEADER\n"),
    }
    if let Some(vip) = &status.vip {
        match (&vip.owner, &vip.owner_name) {
            (Some(owner), name) => out.push_str(&format!(
                "Discovery VIP: {} on {} (host {owner}, epoch {})\n",
                vip.address,
                name.as_deref().unwrap_or("?"),
                vip.epoch
            )),
            (None, _) => out.push_str(&format!("Discovery VIP: {} (NOT BOUND)\n", vip.address)),
        }
    }
    out.push('\n');
    let row = |cells: [&str; 9]| {
        format!(
            "{:<10} {:>3}  {:<18} {:<18} {:<20} {:<13} {:<10} {:<10} {}\n",
            cells[0], cells[1], cells[2], cells[3], cells[4], cells[5], cells[6], cells[7], cells[8]
        )
    };
    out.push_str(&row(["HOST", "ID", "ADDRESS", "ADMIN", "ROLES", "STATE", "LOG", "HIERARCHY", "PARENT"]));
    for host in &status.hosts {
        let parent = host.parent.map(|parent| parent.to_string()).unwrap_or_else(|| "-".into());
        out.push_str(&row([
            &host.name,
            &host.id.to_string(),
            &host.address,
            &host.admin_address,
            &host.roles.join(","),
            &host.state,
            host.log_role.as_deref().unwrap_or("-"),
            host.tree_role.as_deref().unwrap_or("-"),
            &parent,
        ]));
    }
    if !log.gc_clients.is_empty() {
        out.push_str("\nGC clients (progress / lag behind the tail):\n");
        for client in &log.gc_clients {
            out.push_str(&format!("  {:<24} {:>10} / {}\n", client.name, client.progress, client.lag));
        }
    }
    if !status.objects.is_empty() {
        out.push_str(&format!("\nObjects ({}):\n", status.objects.len()));
        out.push_str(&render_objects(&status.objects));
    }
    if !status.problems.is_empty() {
        out.push_str("\nProblems:\n");
        for problem in &status.problems {
            out.push_str(&format!("  - {problem}\n"));
        }
    }
    out
}

pub fn place(target: &Target, asked: serde_json::Value) -> Result<()> {
    let chosen = request(target, "POST", "/api/v1/placement", Some(asked))?;
    for candidate in chosen.as_array().cloned().unwrap_or_default() {
        println!(
            "host {} disk {}  site {}  fault domain {}  {} of {} bytes free",
            candidate["bucket"]["host"],
            candidate["bucket"]["disk"],
            candidate["site"].as_str().unwrap_or("-"),
            candidate["fault_domain"].as_str().unwrap_or("-"),
            candidate["free_bytes"],
            candidate["capacity_bytes"],
        );
    }
    Ok(())
}

pub fn list_tasks(target: &Target) -> Result<()> {
    let tasks = request(target, "GET", "/api/v1/tasks", None)?;
    let tasks = tasks.as_array().cloned().unwrap_or_default();
    if tasks.is_empty() {
        println!("The task queue is empty.");
    }
    for task in tasks {
        println!(
            "{:<28} {:>8}  {:<16} {}",
            task["id"].as_str().unwrap_or("?"),
            task["position"],
            task["kind"].as_str().unwrap_or("?"),
            task["detail"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

pub fn add_task(target: &Target, kind: &str, detail: &str) -> Result<()> {
    let task = request(target, "POST", "/api/v1/tasks", Some(serde_json::json!({ "kind": kind, "detail": detail })))?;
    println!("{}", task["id"].as_str().unwrap_or("?"));
    Ok(())
}

pub fn remove_task(target: &Target, id: &str) -> Result<()> {
    request(target, "DELETE", &format!("/api/v1/tasks/{id}"), None)?;
    println!("removed {id}");
    Ok(())
}

/// `1GiB`, `512MiB`, `64KiB`, `10GB`, or plain bytes.
pub fn parse_size(text: &str) -> Result<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().with_context(|| format!("{text:?} is not a size (e.g. 1GiB, 512MiB)"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        other => bail!("unknown size unit {other:?} in {text:?} (KiB, MiB, GiB, TiB, KB, MB, GB, TB)"),
    };
    number.checked_mul(scale).with_context(|| format!("{text:?} is too large"))
}

fn human_bytes(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", units[unit])
    }
}

/// `[#######.............]  35%  12.0 MiB to go at 40.0 MiB/s, ETA 0.3 s`
pub fn progress_bar(resync: &node::status::ResyncProgress) -> Option<String> {
    if resync.bytes_to_go == 0 {
        return None;
    }
    let total = resync.bytes_to_go + resync.bytes_copied;
    let done = resync.bytes_copied as f64 / total.max(1) as f64;
    let width = 20;
    let filled = ((done * width as f64).round() as usize).min(width);
    let eta = match resync.eta_seconds {
        Some(eta) => format!("ETA {eta:.1} s"),
        None => "ETA -".into(),
    };
    Some(format!(
        "[{}{}] {:>3.0}%  {} to go at {}/s, {eta}",
        "#".repeat(filled),
        ".".repeat(width - filled),
        done * 100.0,
        human_bytes(resync.bytes_to_go),
        human_bytes(resync.bytes_per_second as u64),
    ))
}

fn render_objects(objects: &[node::status::ObjectStatus]) -> String {
    let mut out =
        format!("{:<20} {:<8} {:>10} {:>6} {:<10} {}\n", "NAME", "POLICY", "SIZE", "OWNER", "HEALTH", "COMPONENTS");
    for object in objects {
        let components: Vec<String> = object
            .components
            .iter()
            .map(|component| match component.stale_lsn {
                Some(stale) => format!("host {}: {} (LSN {stale})", component.host, component.state),
                None => format!("host {}: {}", component.host, component.state),
            })
            .collect();
        out.push_str(&format!(
            "{:<20} {:<8} {:>10} {:>6} {:<10} {}\n",
            object.name,
            object.policy,
            human_bytes(object.size_bytes),
            object.owner,
            object.health,
            components.join(", ")
        ));
        if let Some(bar) = object.resync.as_ref().and_then(progress_bar) {
            out.push_str(&format!("  resync {bar}\n"));
        }
    }
    out
}

pub fn create_object(target: &Target, name: &str, size_bytes: u64, policy: &str) -> Result<()> {
    let body = serde_json::json!({ "name": name, "policy": policy, "size_bytes": size_bytes });
    let created = request(target, "POST", "/api/v1/objects", Some(body))?;
    let object: node::status::ObjectStatus =
        serde_json::from_value(created).context("create reply did not match this version of tessera")?;
    let hosts: Vec<String> = object.components.iter().map(|component| component.host.to_string()).collect();
    println!(
        "created {} ({}, {}), components on hosts {}, owner host {}",
        object.name,
        object.policy,
        human_bytes(object.size_bytes),
        hosts.join(", "),
        object.owner
    );
    Ok(())
}

pub fn list_objects(target: &Target, json: bool) -> Result<()> {
    let value = request(target, "GET", "/api/v1/objects", None)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let objects: Vec<node::status::ObjectStatus> =
        serde_json::from_value(value).context("object list did not match this version of tessera")?;
    if objects.is_empty() {
        println!("No objects. Create one with `tessera object create NAME --size 1GiB`.");
    } else {
        print!("{}", render_objects(&objects));
    }
    Ok(())
}

pub fn show_object(target: &Target, name: &str, json: bool) -> Result<()> {
    let value = request(target, "GET", &format!("/api/v1/objects/{name}"), None)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let object: node::status::ObjectStatus =
        serde_json::from_value(value).context("object reply did not match this version of tessera")?;
    println!("Object {} (id {:#x})", object.name, object.id);
    println!("  policy {}, size {} ({} bytes)", object.policy, human_bytes(object.size_bytes), object.size_bytes);
    println!("  owner host {} at epoch {}; {}", object.owner, object.owner_epoch, object.health);
    for (index, component) in object.components.iter().enumerate() {
        let stale = component.stale_lsn.map(|lsn| format!(", has every write up to LSN {lsn}")).unwrap_or_default();
        println!(
            "  component {index} ({:#x}) on host {} disk {}: {}{stale}",
            component.id, component.host, component.disk, component.state
        );
    }
    match &object.resync {
        Some(resync) => {
            if let Some(bar) = progress_bar(resync) {
                println!("  resync {bar}");
            }
            println!(
                "  resync so far: {} copied in {} resyncs, {} full copies; {} corrupt blocks repaired",
                human_bytes(resync.bytes_copied_total),
                resync.resyncs_done,
                resync.full_copies,
                resync.blocks_repaired
            );
        }
        None => println!("  (the owner did not answer: no live figures)"),
    }
    Ok(())
}

pub fn remove_object(target: &Target, name: &str) -> Result<()> {
    let removed = request(target, "DELETE", &format!("/api/v1/objects/{name}"), None)?;
    println!("removed {name}");
    for leftover in removed["leftovers"].as_array().cloned().unwrap_or_default() {
        println!("  not deleted yet: {}", leftover.as_str().unwrap_or("?"));
    }
    Ok(())
}

pub fn create_volume(
    target: &Target,
    name: &str,
    size_bytes: u64,
    policy: &str,
    object_size: Option<u64>,
    encrypted: bool,
) -> Result<()> {
    let body = serde_json::json!({
        "name": name, "policy": policy, "size_bytes": size_bytes, "object_size": object_size, "encrypted": encrypted
    });
    let created = request(target, "POST", "/api/v1/volumes", Some(body))?;
    let volume: node::VolumeRecord =
        serde_json::from_value(created).context("create reply did not match this version of tessera")?;
    println!(
        "created volume {} ({}, {}{}) over {} objects of {}",
        volume.name,
        volume.policy,
        human_bytes(volume.size_bytes),
        if volume.encrypted { ", encrypted at rest" } else { "" },
        volume.objects.len(),
        human_bytes(volume.object_size)
    );
    Ok(())
}

pub fn list_volumes(target: &Target, json: bool) -> Result<()> {
    let value = request(target, "GET", "/api/v1/volumes", None)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let volumes: Vec<node::targets::VolumeStatus> =
        serde_json::from_value(value).context("volume list did not match this version of tessera")?;
    if volumes.is_empty() {
        println!("No volumes. Create one with `tessera volume create NAME --size 10GiB`.");
    }
    for volume in volumes {
        println!(
            "{:<24} {:>10}  {:<8} {:>3} objects  {}{}",
            volume.name,
            human_bytes(volume.size_bytes),
            volume.policy,
            volume.objects.len(),
            volume.health,
            if volume.encrypted { "  encrypted" } else { "" }
        );
    }
    Ok(())
}

pub fn grow_volume(target: &Target, name: &str, size_bytes: u64) -> Result<()> {
    let body = serde_json::json!({ "size_bytes": size_bytes });
    let grown = request(target, "POST", &format!("/api/v1/volumes/{name}/grow"), Some(body))?;
    let volume: node::VolumeRecord =
        serde_json::from_value(grown).context("grow reply did not match this version of tessera")?;
    println!("volume {} is now {} over {} objects", volume.name, human_bytes(volume.size_bytes), volume.objects.len());
    Ok(())
}

pub fn remove_volume(target: &Target, name: &str) -> Result<()> {
    request(target, "DELETE", &format!("/api/v1/volumes/{name}"), None)?;
    println!("removed volume {name} and its objects");
    Ok(())
}

/// `0=db` pairs.
pub fn parse_luns(luns: &[String]) -> Result<Vec<(u64, String)>> {
    luns.iter()
        .map(|pair| {
            let (lun, volume) = pair.split_once('=').with_context(|| format!("{pair:?} is not LUN=VOLUME"))?;
            let lun: u64 = lun.trim().parse().with_context(|| format!("{lun:?} is not a LUN number"))?;
            Ok((lun, volume.trim().to_string()))
        })
        .collect()
}

pub fn create_target(
    target: &Target,
    name: &str,
    luns: Vec<(u64, String)>,
    chap: Option<node::ChapRecord>,
    initiators: Vec<String>,
    site: Option<String>,
) -> Result<()> {
    let body = serde_json::json!({ "name": name, "luns": luns, "chap": chap, "initiators": initiators, "site": site });
    let created = request(target, "POST", "/api/v1/targets", Some(body))?;
    let status: Option<node::targets::TargetStatus> =
        serde_json::from_value(created).context("create reply did not match this version of tessera")?;
    println!("created target {name}");
    if let Some(owner) = status.as_ref().and_then(|status| status.owner) {
        println!("  owned by host {owner} (logins through the discovery VIP go there)");
    }
    for url in status.map(|status| status.urls).unwrap_or_default() {
        println!("  {url}");
    }
    Ok(())
}

pub fn list_targets(target: &Target, json: bool) -> Result<()> {
    let value = request(target, "GET", "/api/v1/targets", None)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let targets: Vec<node::targets::TargetStatus> =
        serde_json::from_value(value).context("target list did not match this version of tessera")?;
    if targets.is_empty() {
        println!("No targets. Create one with `tessera target create IQN --lun 0=VOLUME`.");
    }
    for target in targets {
        let luns: Vec<String> = target.luns.iter().map(|(lun, volume)| format!("{lun}={volume}")).collect();
        let owner = target.owner.map(|owner| format!("  owner host {owner}")).unwrap_or_default();
        let site = target.site.as_ref().map(|site| format!("  site {site}")).unwrap_or_default();
        let chap = if target.chap { "  (CHAP)" } else { "" };
        println!("{}  LUNs {}{owner}{site}{chap}", target.name, luns.join(", "));
        for url in target.urls {
            println!("  {url}");
        }
    }
    Ok(())
}

pub fn balance_targets(target: &Target) -> Result<()> {
    let value = request(target, "POST", "/api/v1/targets/balance", None)?;
    let moves: Vec<node::targets::OwnerMove> =
        serde_json::from_value(value).context("balance reply did not match this version of tessera")?;
    if moves.is_empty() {
        println!("Target owners are balanced; nothing moved.");
    }
    for moved in &moves {
        let from = moved.from.map(|from| format!("host {from}")).unwrap_or_else(|| "no owner".into());
        println!("{}: {from} -> host {} (owner epoch {})", moved.target, moved.to, moved.epoch);
    }
    let targets: Vec<node::targets::TargetStatus> =
        serde_json::from_value(request(target, "GET", "/api/v1/targets", None)?)?;
    let mut counts: std::collections::BTreeMap<u64, usize> = std::collections::BTreeMap::new();
    for target in targets.iter().filter_map(|target| target.owner) {
        *counts.entry(target).or_default() += 1;
    }
    let counts: Vec<String> = counts.iter().map(|(host, count)| format!("host {host}: {count}")).collect();
    println!("Targets owned: {}", counts.join(", "));
    Ok(())
}

pub fn remove_target(target: &Target, name: &str) -> Result<()> {
    request(target, "DELETE", &format!("/api/v1/targets/{name}"), None)?;
    println!("removed target {name}");
    Ok(())
}

/// The volume and target `tessera up` serves.
pub const DEFAULT_VOLUME: &str = "vol0";
pub const DEFAULT_TARGET: &str = "iqn.2026-11.org.tessera:vol0";

/// Creates the default 1 GiB volume (mirrored when there are two or more
/// hosts) and its target unless they exist; returns the target's URLs,
/// the first host's first.
pub fn ensure_default_target(target: &Target, hosts: usize) -> Result<Vec<String>> {
    let volumes: Vec<node::targets::VolumeStatus> =
        serde_json::from_value(request(target, "GET", "/api/v1/volumes", None)?)?;
    if !volumes.iter().any(|volume| volume.name == DEFAULT_VOLUME) {
        let policy = if hosts >= 2 { "raid1:2" } else { "none" };
        let body = serde_json::json!({
            "name": DEFAULT_VOLUME, "policy": policy, "size_bytes": 1u64 << 30, "object_size": 256u64 << 20
        });
        request(target, "POST", "/api/v1/volumes", Some(body))?;
    }
    let targets: Vec<node::targets::TargetStatus> =
        serde_json::from_value(request(target, "GET", "/api/v1/targets", None)?)?;
    let found = match targets.into_iter().find(|t| t.name == DEFAULT_TARGET) {
        Some(found) => found,
        None => {
            let body = serde_json::json!({ "name": DEFAULT_TARGET, "luns": [[0, DEFAULT_VOLUME]] });
            let created = request(target, "POST", "/api/v1/targets", Some(body))?;
            serde_json::from_value::<Option<node::targets::TargetStatus>>(created)?
                .context("the target was created but not listed")?
        }
    };
    let mut urls = found.urls;
    urls.sort();
    Ok(urls)
}
