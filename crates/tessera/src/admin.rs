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
