//! `tessera up`: a whole cluster on this machine.
//!
//! Each host is a `tessera node` child process on its own loopback address
//! (127.0.0.1, 127.0.0.2, …). The data directory holds the bootstrap config
//! (`config/`), and per host its `node.toml`, data and `node.log`; running
//! `up` again on the same directory restarts the same cluster.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use catalog::bootstrap::{BootstrapConfig, ConfigDir, SeedHost};
use node::status::ClusterStatus;

use crate::admin::{render_status, Target};

/// How long `up` waits for the cluster to become healthy.
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(120);
/// Restarts of one crashed host allowed per minute before `up` gives up on it.
const RESTARTS_PER_MINUTE_MAX: usize = 5;
const HOSTS_MAX: u32 = 32;
/// The discovery VIP's address in a local cluster (hosts are 127.0.0.1-32).
const LOCAL_VIP_IP: &str = "127.0.0.100";

struct Host {
    seed: SeedHost,
    config_path: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
    restarts: Vec<Instant>,
    /// When an exited node is started again.
    restart_at: Option<Instant>,
}

/// How long an exited node stays down before `up` starts it again, as a
/// rebooting host would: long enough for the cluster to notice (a host is
/// marked down about 3.5 s after it goes silent), so what a failure looks
/// like can be watched with `tessera status`.
const RESTART_DELAY: Duration = Duration::from_secs(10);

/// Creates the bootstrap config of a new local cluster, or checks the
/// existing one matches what was asked.
fn bootstrap(data: &Path, hosts: u32, base_port: u16, iscsi_port: u16) -> Result<BootstrapConfig> {
    let config_dir = ConfigDir::new(fsio::real(), data.join("config"));
    if let Some((version, config)) = config_dir.latest()? {
        if config.hosts.len() != hosts as usize {
            bail!(
                "{} holds a {}-host cluster; run `tessera up --hosts {}` or use another --data directory",
                data.display(),
                config.hosts.len(),
                config.hosts.len()
            );
        }
        println!("Reusing the cluster in {} (config v{version}).", data.display());
        return Ok(config);
    }
    let admin_port = base_port.checked_add(80).context("--base-port is too high")?;
    let mut local =
        BootstrapConfig::local(format!("{:016x}", rand::random::<u64>()), hosts as u64, 1, base_port, admin_port);
    // The discovery VIP, on a loopback address no host uses.
    local.settings.insert(node::vip::VIP_SETTING.into(), format!("{LOCAL_VIP_IP}:{iscsi_port}"));
    let (_, config) = config_dir.update(|config| *config = local.clone())?;
    config.validate().map_err(anyhow::Error::msg)?;
    println!("Created a {hosts}-host cluster {} in {}.", config.cluster_id, data.display());
    Ok(config)
}

fn write_node_configs(data: &Path, config: &BootstrapConfig, iscsi_port: u16) -> Result<Vec<Host>> {
    let mut hosts = Vec::new();
    for seed in &config.hosts {
        let dir = data.join(&seed.name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let config_path = dir.join("node.toml");
        if !config_path.exists() {
            let node_config = node::NodeConfig { iscsi_port, ..node::NodeConfig::new(seed.id, "data", "../config") };
            std::fs::write(&config_path, node_config.to_toml())
                .with_context(|| format!("writing {}", config_path.display()))?;
        }
        hosts.push(Host {
            seed: seed.clone(),
            config_path,
            log_path: dir.join("node.log"),
            child: None,
            restarts: Vec::new(),
            restart_at: None,
        });
    }
    Ok(hosts)
}

fn check_ports_free(config: &BootstrapConfig, iscsi_port: u16) -> Result<()> {
    for host in &config.hosts {
        let ip = host.address.rsplit_once(':').map(|(ip, _)| ip).unwrap_or("127.0.0.1");
        let iscsi = format!("{ip}:{iscsi_port}");
        for address in [&host.address, &host.admin_address, &iscsi] {
            if let Err(error) = std::net::TcpListener::bind(address) {
                bail!("{address} is not free ({error}): is another `tessera up` running? Stop it, or pass --base-port");
            }
        }
    }
    if let Some(vip) = config.settings.get(node::vip::VIP_SETTING) {
        if let Err(error) = std::net::TcpListener::bind(vip) {
            bail!("the discovery VIP {vip} is not free ({error}): is another `tessera up` running?");
        }
    }
    Ok(())
}

fn spawn(host: &mut Host) -> Result<()> {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&host.log_path)
        .with_context(|| format!("opening {}", host.log_path.display()))?;
    let mut command = Command::new(std::env::current_exe().context("finding the tessera binary")?);
    command
        .args(["node", "--config"])
        .arg(&host.config_path)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: Ctrl-C reaches `up`, which stops the
        // hosts in order, rather than every process at once.
        .process_group(0);
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no
    // memory of ours; it makes the child get SIGTERM if `up` dies, so no
    // node outlives it. `up` spawns only from its main thread.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let child = command.spawn().with_context(|| format!("starting {}", host.seed.name))?;
    host.child = Some(child);
    Ok(())
}

fn tail_of(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn stop_all(hosts: &mut [Host]) {
    for host in hosts.iter_mut() {
        if let Some(child) = &host.child {
            // SAFETY: kill() on the pid of a child we started and have not
            // reaped, so the pid cannot have been reused.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    for host in hosts.iter_mut() {
        let Some(mut child) = host.child.take() else {
            continue;
        };
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                _ => {
                    eprintln!("{} did not stop in time; killing it", host.seed.name);
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
    }
}

fn print_summary(data: &Path, config: &BootstrapConfig, status: &ClusterStatus, urls: &[String]) {
    let first = &config.hosts[0];
    println!();
    println!("Tessera is up: {} hosts, cluster {}.", config.hosts.len(), config.cluster_id);
    println!();
    print!("{}", render_status(status));
    println!();
    println!("  Dashboard:  http://{}/", first.admin_address);
    println!("  Metrics:    http://{}/metrics", first.admin_address);
    println!("  Status:     tessera status      (from this directory; or --admin {})", first.admin_address);
    println!("  Logs:       {}/host-N/node.log", data.display());
    println!("  Data:       {}", data.display());
    println!("  Volumes:    tessera volume ls; tessera volume create db --size 10GiB --policy raid1:2");
    println!("  Targets:    tessera target ls; tessera target create iqn.2026-11.org.example:db --lun 0=db");
    println!();
    println!("The default volume is served over iSCSI at:");
    for url in urls {
        println!("  {url}");
    }
    let vip = config.settings.get(node::vip::VIP_SETTING);
    if let Some(vip) = vip {
        println!();
        println!("Discovery VIP (logins are redirected to the target's host): iscsi://{vip}");
    }
    if let Some(url) = urls.first() {
        let portal = url.trim_start_matches("iscsi://").split('/').next().unwrap_or("");
        println!();
        println!("  Try:        iscsi-ls -s iscsi://{}", vip.map(String::as_str).unwrap_or(portal));
        println!("              qemu-img info {url}");
    }
    println!("Press Ctrl-C to stop the cluster (running `tessera up` again restarts it with its data).");
}

pub fn run(hosts: u32, data: &Path, base_port: u16, iscsi_port: u16) -> Result<()> {
    if hosts == 0 || hosts > HOSTS_MAX {
        bail!("--hosts must be between 1 and {HOSTS_MAX}");
    }
    std::fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
    let data = data.canonicalize()?;
    let config = bootstrap(&data, hosts, base_port, iscsi_port)?;
    check_ports_free(&config, iscsi_port)?;
    let mut hosts = write_node_configs(&data, &config, iscsi_port)?;
    for host in hosts.iter_mut() {
        spawn(host)?;
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let result = runtime.block_on(supervise(&data, &config, &mut hosts));
    println!("Stopping the cluster…");
    stop_all(&mut hosts);
    println!("Stopped. Data is kept in {}.", data.display());
    result
}

async fn supervise(data: &Path, config: &BootstrapConfig, hosts: &mut [Host]) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let target = Target { admin: None, data: data.to_path_buf() };
    let progress = indicatif::ProgressBar::new_spinner();
    progress.enable_steady_tick(Duration::from_millis(120));
    progress.set_message("waiting for the cluster to become healthy…");
    let started = Instant::now();
    let mut healthy = false;
    loop {
        tokio::select! {
            _ = terminate.recv() => { progress.finish_and_clear(); return Ok(()); }
            _ = interrupt.recv() => { progress.finish_and_clear(); return Ok(()); }
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        for host in hosts.iter_mut() {
            if host.restart_at.is_some_and(|at| Instant::now() >= at) {
                host.restart_at = None;
                progress.suspend(|| eprintln!("restarting {}", host.seed.name));
                spawn(host)?;
            }
            let Some(child) = host.child.as_mut() else {
                continue;
            };
            if let Ok(Some(exit)) = child.try_wait() {
                host.child = None;
                progress.suspend(|| {
                    eprintln!(
                        "{} exited ({exit}); last lines of {}:\n{}",
                        host.seed.name,
                        host.log_path.display(),
                        tail_of(&host.log_path, 15)
                    );
                });
                host.restarts.retain(|when| when.elapsed() < Duration::from_secs(60));
                if host.restarts.len() >= RESTARTS_PER_MINUTE_MAX {
                    progress.suspend(|| eprintln!("{} keeps failing; not restarting it again", host.seed.name));
                    continue;
                }
                host.restarts.push(Instant::now());
                progress.suspend(|| eprintln!("{} will be restarted in {} s", host.seed.name, RESTART_DELAY.as_secs()));
                host.restart_at = Some(Instant::now() + RESTART_DELAY);
            }
        }
        if !healthy {
            let asked = Target { admin: target.admin.clone(), data: target.data.clone() };
            let status = tokio::task::spawn_blocking(move || crate::admin::fetch_status(&asked)).await?;
            match status {
                Ok(status) if status.healthy => {
                    progress.set_message("creating the default volume and target…");
                    let target = Target { admin: target.admin.clone(), data: target.data.clone() };
                    let copies = config.hosts.len();
                    let urls =
                        tokio::task::spawn_blocking(move || crate::admin::ensure_default_target(&target, copies))
                            .await?;
                    match urls {
                        Ok(urls) => {
                            healthy = true;
                            progress.finish_and_clear();
                            print_summary(data, config, &status, &urls);
                        }
                        Err(error) => {
                            progress.set_message(format!("creating the default volume and target… {error:#}"))
                        }
                    }
                }
                Ok(status) => progress.set_message(format!(
                    "waiting for the cluster to become healthy… {}",
                    status.problems.first().cloned().unwrap_or_default()
                )),
                Err(_) => progress.set_message("waiting for the cluster to become healthy… (starting)"),
            }
            if !healthy && started.elapsed() > HEALTHY_TIMEOUT {
                progress.finish_and_clear();
                for host in hosts.iter() {
                    eprintln!("--- {} ({}):\n{}", host.seed.name, host.log_path.display(), tail_of(&host.log_path, 10));
                }
                bail!("the cluster did not become healthy within {HEALTHY_TIMEOUT:?}");
            }
        }
    }
}
