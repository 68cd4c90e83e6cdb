//! `node`: the Tessera daemon.
//!
//! One `tessera node` process per host. It reads its `node.toml` and the
//! cluster's bootstrap config, starts a shared-log replica if the bootstrap
//! config names it one, serves node-to-node traffic over `wire`, opens the
//! catalog (registering itself) and the cluster task queue, and serves the
//! admin HTTP/JSON API, Prometheus metrics at `/metrics` and a dashboard.
//!
//! **Boundary:** wires the crates below together; holds no mechanism of its
//! own that a lower crate could own.

pub mod admin;
pub mod balance;
pub mod config;
pub mod daemon;
pub mod membership;
pub mod repair;
pub mod reservations;
pub mod status;
pub mod storage;
pub mod targets;
pub mod vip;

use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusBuilder;

pub use catalog::{ChapRecord, TargetRecord, VolumeRecord};
pub use config::NodeConfig;
pub use daemon::{ephemeral_ports, Node};

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Sets up structured logging (`RUST_LOG` filters; default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    // Colour only on a terminal: `tessera up` sends each node's log to a
    // file (host-N/node.log), where escape codes would be noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    if let Err(error) = result {
        eprintln!("logging already initialised: {error}");
    }
}

/// Runs a node until SIGTERM or Ctrl-C.
pub async fn run(config: NodeConfig) -> Result<(), String> {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_err() {
        tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
    }
    raise_open_file_limit();
    let node = Node::start(config, Some(handle)).await.map_err(|error| error.to_string())?;
    let listener = tokio::net::TcpListener::bind(&node.me.admin_address)
        .await
        .map_err(|error| format!("cannot listen on {} for the admin API: {error}", node.me.admin_address))?;
    tracing::info!(address = %node.me.admin_address, "serving the admin API");
    let router = admin::router(node.clone());
    let mut stop = node.shutdown_signal();
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|stop| *stop).await;
            })
            .await;
    });
    wait_for_signal().await;
    tracing::info!("shutting down");
    node.stop().await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), server).await;
    tracing::info!("stopped");
    Ok(())
}

/// A node holds a socket per peer, iSCSI session and admin client, and
/// files per disk: it raises its soft limit on open files to the hard
/// limit (often 1,024 against 524,288), as storage daemons do.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 || limit.rlim_cur >= limit.rlim_max {
            return;
        }
        let soft = limit.rlim_cur;
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
            tracing::info!(from = soft, to = limit.rlim_max, "raised the open file limit");
        } else {
            tracing::warn!(limit = soft, "cannot raise the open file limit");
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

/// Keeps `Arc<Node>` nameable for callers.
pub type NodeHandle = Arc<Node>;
