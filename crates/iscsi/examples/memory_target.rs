//! Serves one target with one in-memory logical unit, for trying initiators
//! against the iSCSI layer alone:
//!
//! ```text
//! cargo run -p iscsi --example memory_target -- 127.0.0.1:3260 256
//! iscsi-ls iscsi://127.0.0.1:3260
//! ```
//!
//! Arguments: the listen address and the size in MiB.

use std::sync::Arc;

use iscsi::memory::MemoryDevice;
use iscsi::scsi::LogicalUnit;
use iscsi::target::{Portal, Registry, Target};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let mut args = std::env::args().skip(1);
    let address = args.next().unwrap_or_else(|| "127.0.0.1:3260".into());
    let mib: u64 = args.next().and_then(|value| value.parse().ok()).unwrap_or(256);
    let registry = Arc::new(Registry::new(1));
    let device = Arc::new(MemoryDevice::new(512, mib * 2048));
    let unit = Arc::new(LogicalUnit::new(device, 1, "memory0001"));
    let name = "iqn.2026-11.org.tessera:memory".to_string();
    registry.add_target(Target {
        name: name.clone(),
        alias: "memory".into(),
        luns: [(0, unit)].into_iter().collect(),
        chap: None,
        initiators: Vec::new(),
    });
    registry.set_portals(vec![Portal { address: address.clone(), group: 1 }]);
    let listener = tokio::net::TcpListener::bind(&address).await?;
    println!("serving iscsi://{address}/{name}/0");
    let threads = std::thread::available_parallelism().map(|cores| cores.get()).unwrap_or(2);
    iscsi::target::ConnectionThreads::start(threads)?.serve(registry, listener).await;
    Ok(())
}
