//! `tessera`: the command-line tool and the node daemon's entry point.
//!
//! `tessera up` runs a whole local cluster; `tessera node` runs one host of
//! a real cluster; the other commands talk to a running cluster's admin API.

mod admin;
mod up;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

/// mimalloc rather than glibc's malloc: every I/O allocates and frees a
/// few buffers, often on different threads (a block read on a component
/// thread is freed on the iSCSI connection's), and glibc's per-thread
/// arenas then shrink and regrow their heaps (`sysmalloc` and its page
/// faults were 12% of a node's CPU under 4 KiB random reads). Measured
/// side by side by bench/allocator.sh (bench/RESULTS.md).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "tessera", version, about = "Tessera: pooled block storage and memory for a cluster of hosts")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Runs one host of a cluster.
    Node {
        /// The node's config file (node.toml).
        #[arg(long)]
        config: PathBuf,
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// Starts a local cluster of node processes on 127.0.0.x and keeps it
    /// running until Ctrl-C. Restarting reuses the data directory.
    Up {
        /// Number of hosts (node processes).
        #[arg(long, default_value_t = 3)]
        hosts: u32,
        /// Where the cluster keeps its data and logs.
        #[arg(long, default_value = "tessera-data")]
        data: PathBuf,
        /// Node-to-node port; the admin API listens on this plus 80.
        #[arg(long, default_value_t = 7400)]
        base_port: u16,
        /// The port every host's iSCSI target service listens on.
        #[arg(long, default_value_t = 3260)]
        iscsi_port: u16,
    },
    /// Shows the cluster's health, hosts and shared log.
    Status {
        /// Machine-readable JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: admin::Target,
    },
    /// Reads or updates a bootstrap config directory.
    ClusterConfig {
        #[command(subcommand)]
        command: ClusterConfigCommand,
    },
    /// Asks the hierarchical scheduler where to put something (it only
    /// answers; nothing is reserved beyond the scheduler's own ledger).
    Place {
        /// Buckets (disks) wanted.
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Bytes needed on each.
        #[arg(long, default_value_t = 1 << 30)]
        bytes: u64,
        #[arg(long)]
        distinct_hosts: bool,
        #[arg(long)]
        distinct_fault_domains: bool,
        #[arg(long)]
        site: Option<String>,
        #[command(flatten)]
        target: admin::Target,
    },
    /// Creates, lists, shows or removes objects (replicated block
    /// address spaces).
    Object {
        #[command(subcommand)]
        command: ObjectCommand,
        #[command(flatten)]
        target: admin::Target,
    },
    /// Creates, lists, grows or removes volumes (LUN storage over objects).
    Volume {
        #[command(subcommand)]
        command: VolumeCommand,
        #[command(flatten)]
        target: admin::Target,
    },
    /// Creates, lists or removes iSCSI targets.
    #[command(name = "target")]
    IscsiTarget {
        #[command(subcommand)]
        command: TargetCommand,
        #[command(flatten)]
        target: admin::Target,
    },
    /// Lists, adds or removes jobs in the cluster task queue.
    Task {
        #[command(subcommand)]
        command: TaskCommand,
        #[command(flatten)]
        target: admin::Target,
    },
}

#[derive(Subcommand)]
enum ClusterConfigCommand {
    /// Prints the latest version.
    Show {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Sets settings (KEY=VALUE) in a new version.
    Set {
        #[arg(long)]
        dir: PathBuf,
        /// Commit each KEY=VALUE as its own version.
        #[arg(long)]
        each: bool,
        #[arg(required = true)]
        settings: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ObjectCommand {
    /// Creates an object; its components go on distinct hosts.
    Create {
        name: String,
        /// Size, e.g. 1GiB, 512MiB, 4096 (bytes; a multiple of 4 KiB).
        #[arg(long)]
        size: String,
        /// none, raid1:2, raid1:3, raid5:2+1, raid5:3+1, raid5:4+1 or raid6:4+2 (one component per
        /// copy or chunk, each on its own host).
        #[arg(long, default_value = "raid1:2")]
        policy: String,
    },
    /// Lists objects with their health.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Shows one object: components, states, resync progress.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Deletes an object and its components.
    Rm { name: String },
}

#[derive(Subcommand)]
enum VolumeCommand {
    /// Creates a volume over ceil(size / object size) objects.
    Create {
        name: String,
        /// Size, e.g. 10GiB (a multiple of 4 KiB).
        #[arg(long)]
        size: String,
        /// none, raid1:2, raid1:3, raid5:2+1, raid5:3+1, raid5:4+1 or raid6:4+2 (one component per
        /// copy or chunk, each on its own host).
        #[arg(long, default_value = "raid1:2")]
        policy: String,
        /// Size of each backend object (default 256GiB).
        #[arg(long)]
        object_size: Option<String>,
        /// Encrypt the volume at rest (XTS-AES-256, a key per object kept in the catalog): its
        /// disks hold no plaintext, and SANITIZE CRYPTO ERASE makes all of it unreadable at once.
        #[arg(long)]
        encrypted: bool,
    },
    /// Lists volumes with their health.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Grows a volume to a new size.
    Grow {
        name: String,
        #[arg(long)]
        size: String,
    },
    /// Removes a volume (no target may use it) and its objects.
    Rm { name: String },
}

#[derive(Subcommand)]
enum TargetCommand {
    /// Creates a target serving volumes as LUNs.
    Create {
        /// The target's iSCSI name, e.g. iqn.2026-11.org.example:db.
        name: String,
        /// LUN=VOLUME, e.g. 0=db; repeat for more LUNs.
        #[arg(long = "lun", required = true)]
        luns: Vec<String>,
        /// CHAP user initiators must log in as.
        #[arg(long, requires = "chap_secret")]
        chap_user: Option<String>,
        /// CHAP secret (12-16384 characters); prefer the environment.
        #[arg(long, env = "TESSERA_CHAP_SECRET", hide_env_values = true)]
        chap_secret: Option<String>,
        /// Mutual CHAP: the user and secret the target answers with.
        #[arg(long, requires = "mutual_chap_secret")]
        mutual_chap_user: Option<String>,
        #[arg(long, env = "TESSERA_MUTUAL_CHAP_SECRET", hide_env_values = true)]
        mutual_chap_secret: Option<String>,
        /// Initiator names allowed to log in (default: any).
        #[arg(long = "initiator")]
        initiators: Vec<String>,
        /// The site the target is affine to: its owner (where logins
        /// through the discovery VIP go) is a host of that site.
        #[arg(long)]
        site: Option<String>,
    },
    /// Moves target owners now so each host owns its share (site-affine
    /// targets within their site first, then the rest over the cluster);
    /// hosts also do this on their own when hosts join or leave.
    Balance,
    /// Lists targets with their URLs.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Removes a target (its volumes stay).
    Rm { name: String },
}

#[derive(Subcommand)]
enum TaskCommand {
    /// Lists the queue in order.
    Ls,
    /// Adds a task.
    Add { kind: String, detail: Option<String> },
    /// Removes a task by id.
    Rm { id: String },
}

fn main() {
    let cli = Cli::parse();
    if let Err(error) = run(cli) {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Node { config, log_format } => {
            node::init_logging(match log_format {
                LogFormat::Text => node::LogFormat::Text,
                LogFormat::Json => node::LogFormat::Json,
            });
            let config = node::NodeConfig::load(&config)?;
            runtime()?.block_on(node::run(config)).map_err(anyhow::Error::msg)
        }
        Command::Up { hosts, data, base_port, iscsi_port } => up::run(hosts, &data, base_port, iscsi_port),
        Command::Status { json, target } => admin::status(&target, json),
        Command::ClusterConfig { command } => cluster_config(command),
        Command::Place { count, bytes, distinct_hosts, distinct_fault_domains, site, target } => admin::place(
            &target,
            serde_json::json!({
                "count": count,
                "bytes": bytes,
                "distinct_hosts": distinct_hosts,
                "distinct_fault_domains": distinct_fault_domains,
                "site": site,
            }),
        ),
        Command::Volume { command, target } => match command {
            VolumeCommand::Create { name, size, policy, object_size, encrypted } => {
                let object_size = object_size.as_deref().map(admin::parse_size).transpose()?;
                admin::create_volume(&target, &name, admin::parse_size(&size)?, &policy, object_size, encrypted)
            }
            VolumeCommand::Ls { json } => admin::list_volumes(&target, json),
            VolumeCommand::Grow { name, size } => admin::grow_volume(&target, &name, admin::parse_size(&size)?),
            VolumeCommand::Rm { name } => admin::remove_volume(&target, &name),
        },
        Command::IscsiTarget { command, target } => match command {
            TargetCommand::Create {
                name,
                luns,
                chap_user,
                chap_secret,
                mutual_chap_user,
                mutual_chap_secret,
                initiators,
                site,
            } => {
                let luns = admin::parse_luns(&luns)?;
                let chap = chap_user.zip(chap_secret).map(|(user, secret)| node::ChapRecord {
                    user,
                    secret,
                    mutual_user: mutual_chap_user,
                    mutual_secret: mutual_chap_secret,
                });
                admin::create_target(&target, &name, luns, chap, initiators, site)
            }
            TargetCommand::Balance => admin::balance_targets(&target),
            TargetCommand::Ls { json } => admin::list_targets(&target, json),
            TargetCommand::Rm { name } => admin::remove_target(&target, &name),
        },
        Command::Object { command, target } => match command {
            ObjectCommand::Create { name, size, policy } => {
                admin::create_object(&target, &name, admin::parse_size(&size)?, &policy)
            }
            ObjectCommand::Ls { json } => admin::list_objects(&target, json),
            ObjectCommand::Show { name, json } => admin::show_object(&target, &name, json),
            ObjectCommand::Rm { name } => admin::remove_object(&target, &name),
        },
        Command::Task { command, target } => match command {
            TaskCommand::Ls => admin::list_tasks(&target),
            TaskCommand::Add { kind, detail } => admin::add_task(&target, &kind, detail.as_deref().unwrap_or("")),
            TaskCommand::Rm { id } => admin::remove_task(&target, &id),
        },
    }
}

fn cluster_config(command: ClusterConfigCommand) -> Result<()> {
    match command {
        ClusterConfigCommand::Show { dir } => {
            let config_dir = catalog::bootstrap::ConfigDir::new(fsio::real(), dir.clone());
            match config_dir.latest()? {
                Some((version, config)) => {
                    println!("# {}/v{version}/cluster.toml", dir.display());
                    print!("{}", toml_text(&config));
                    Ok(())
                }
                None => bail!("{} holds no config version", dir.display()),
            }
        }
        ClusterConfigCommand::Set { dir, each, settings } => {
            let pairs: Vec<(String, String)> = settings
                .iter()
                .map(|setting| {
                    setting
                        .split_once('=')
                        .map(|(key, value)| (key.to_string(), value.to_string()))
                        .with_context(|| format!("{setting:?} is not KEY=VALUE"))
                })
                .collect::<Result<_>>()?;
            let config_dir = catalog::bootstrap::ConfigDir::new(fsio::real(), dir);
            let groups: Vec<Vec<(String, String)>> =
                if each { pairs.into_iter().map(|pair| vec![pair]).collect() } else { vec![pairs] };
            for group in groups {
                let (version, _) = config_dir.update(|config| {
                    for (key, value) in &group {
                        config.settings.insert(key.clone(), value.clone());
                    }
                })?;
                println!("v{version}");
            }
            Ok(())
        }
    }
}

fn toml_text(config: &catalog::bootstrap::BootstrapConfig) -> String {
    toml::to_string_pretty(config).expect("a BootstrapConfig always serializes to TOML")
}
