//! Targets, the registry a target service serves from, and the listener.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::datamover::TcpDatamover;
use crate::scsi::LogicalUnit;

/// CHAP secrets: the initiator proves it knows `secret` for `user`; with
/// `mutual`, the target proves it knows the second secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chap {
    pub user: String,
    pub secret: String,
    pub mutual: Option<(String, String)>,
}

/// One iSCSI target: a name, its logical units by number, its access rules.
#[derive(Clone)]
pub struct Target {
    pub name: String,
    pub alias: String,
    pub luns: BTreeMap<u64, Arc<LogicalUnit>>,
    pub chap: Option<Chap>,
    /// Initiator names allowed to log in; empty allows every initiator.
    pub initiators: Vec<String>,
}

impl Target {
    pub fn allows(&self, initiator: &str) -> bool {
        self.initiators.is_empty() || self.initiators.iter().any(|allowed| allowed == initiator)
    }

    pub fn lun_numbers(&self) -> Vec<u64> {
        self.luns.keys().copied().collect()
    }
}

/// Where a target can be reached: `address:port` and its portal group tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Portal {
    pub address: String,
    pub group: u16,
}

impl Portal {
    /// The SendTargets form: `host:port,tag` (IPv6 hosts in brackets).
    pub fn target_address(&self) -> String {
        format!("{},{}", self.address, self.group)
    }
}

struct SessionEntry {
    tsih: u16,
    close: watch::Sender<bool>,
}

/// Live figures of the target service.
#[derive(Default)]
pub struct Counters {
    pub sessions: AtomicU64,
    pub logins: AtomicU64,
    pub login_failures: AtomicU64,
    /// Logins answered with "target moved temporarily" (a discovery VIP).
    pub redirects: AtomicU64,
    pub commands: AtomicU64,
    pub rejects: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
}

/// What a target service serves: its targets, its portals and its sessions.
/// The owner (the node) replaces targets as the catalog changes; sessions
/// keep the logical units they hold.
pub struct Registry {
    targets: RwLock<BTreeMap<String, Arc<Target>>>,
    portals: RwLock<Vec<Portal>>,
    /// Target name → the `TargetAddress` a normal login is sent to.
    redirects: RwLock<HashMap<String, String>>,
    /// Serves no sessions: a normal login to a target without a redirect
    /// is refused as "service unavailable" (a discovery VIP).
    redirect_only: bool,
    group: u16,
    discovery_chap: RwLock<Option<Chap>>,
    sessions: Mutex<HashMap<(String, [u8; 6]), SessionEntry>>,
    next_tsih: AtomicU16,
    pub counters: Counters,
}

impl Registry {
    /// `group`: this service's portal group tag and relative target port.
    pub fn new(group: u16) -> Registry {
        Registry {
            targets: RwLock::new(BTreeMap::new()),
            portals: RwLock::new(Vec::new()),
            redirects: RwLock::new(HashMap::new()),
            redirect_only: false,
            group: group.max(1),
            discovery_chap: RwLock::new(None),
            sessions: Mutex::new(HashMap::new()),
            next_tsih: AtomicU16::new(1),
            counters: Counters::default(),
        }
    }

    pub fn portal_group(&self) -> u16 {
        self.group
    }

    pub fn set_targets(&self, targets: Vec<Target>) {
        let map = targets.into_iter().map(|target| (target.name.clone(), Arc::new(target))).collect();
        *self.targets.write().expect("targets") = map;
    }

    pub fn add_target(&self, target: Target) {
        self.targets.write().expect("targets").insert(target.name.clone(), Arc::new(target));
    }

    pub fn target(&self, name: &str) -> Option<Arc<Target>> {
        self.targets.read().expect("targets").get(name).cloned()
    }

    pub fn targets(&self) -> Vec<Arc<Target>> {
        self.targets.read().expect("targets").values().cloned().collect()
    }

    /// The portals SendTargets reports (every host serving the targets).
    pub fn set_portals(&self, portals: Vec<Portal>) {
        *self.portals.write().expect("portals") = portals;
    }

    pub fn portals(&self) -> Vec<Portal> {
        self.portals.read().expect("portals").clone()
    }

    /// Where normal logins to each target are redirected (RFC 7143
    /// §11.13.5, "target moved temporarily"): a discovery VIP serves no
    /// sessions itself but sends each initiator to the host owning its
    /// target. A target with no entry is served here.
    pub fn set_redirects(&self, redirects: HashMap<String, Portal>) {
        // RFC 7143 §13.8: a redirection's TargetAddress has no portal
        // group tag.
        let redirects = redirects.into_iter().map(|(target, portal)| (target, portal.address)).collect();
        *self.redirects.write().expect("redirects") = redirects;
    }

    /// The `TargetAddress` a normal login to `target` is redirected to.
    pub fn redirect(&self, target: &str) -> Option<String> {
        self.redirects.read().expect("redirects").get(target).cloned()
    }

    /// A registry that only redirects (a discovery VIP): discovery
    /// sessions, and redirections of normal logins; no normal sessions.
    pub fn redirecting_only(group: u16) -> Registry {
        Registry { redirect_only: true, ..Registry::new(group) }
    }

    pub fn is_redirect_only(&self) -> bool {
        self.redirect_only
    }

    pub fn set_discovery_chap(&self, chap: Option<Chap>) {
        *self.discovery_chap.write().expect("discovery chap") = chap;
    }

    pub fn discovery_chap(&self) -> Option<Chap> {
        self.discovery_chap.read().expect("discovery chap").clone()
    }

    /// A session is starting: closes an older one of the same initiator
    /// port (session reinstatement) and returns the new TSIH and a signal
    /// that closes this one.
    pub(crate) fn open_session(&self, initiator: &str, isid: [u8; 6]) -> (u16, watch::Receiver<bool>) {
        let mut tsih = self.next_tsih.fetch_add(1, Ordering::Relaxed);
        if tsih == 0 {
            tsih = self.next_tsih.fetch_add(1, Ordering::Relaxed);
        }
        let (close, closed) = watch::channel(false);
        let old =
            self.sessions.lock().expect("sessions").insert((initiator.to_string(), isid), SessionEntry { tsih, close });
        if let Some(old) = old {
            tracing::info!(initiator, tsih = old.tsih, "session reinstated: closing the old one");
            let _ = old.close.send(true);
        }
        self.counters.sessions.fetch_add(1, Ordering::Relaxed);
        (tsih, closed)
    }

    pub(crate) fn close_session(&self, initiator: &str, isid: [u8; 6], tsih: u16) {
        let mut sessions = self.sessions.lock().expect("sessions");
        let key = (initiator.to_string(), isid);
        if sessions.get(&key).is_some_and(|entry| entry.tsih == tsih) {
            sessions.remove(&key);
        }
        self.counters.sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Threads that serve iSCSI connections, each a single-threaded runtime on
/// its own OS thread. A connection lives on one of them (round robin): its
/// reader, its commands and its writer run on that thread, so a command
/// wakes no other thread inside the target. (On a work-stealing runtime
/// each PDU would wake an idle worker to steal the task just spawned, and
/// on a small host those wake-ups cost more than the command itself.)
/// The threads run until the process ends.
pub struct ConnectionThreads {
    senders: Vec<tokio::sync::mpsc::UnboundedSender<(Arc<Registry>, std::net::TcpStream)>>,
    next: AtomicU64,
}

impl ConnectionThreads {
    /// Starts `count` threads (at least one).
    pub fn start(count: usize) -> std::io::Result<ConnectionThreads> {
        let mut senders = Vec::new();
        for index in 0..count.max(1) {
            let (sender, mut streams) = tokio::sync::mpsc::unbounded_channel::<(Arc<Registry>, std::net::TcpStream)>();
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            std::thread::Builder::new().name(format!("iscsi-{index}")).spawn(move || {
                runtime.block_on(async move {
                    while let Some((registry, stream)) = streams.recv().await {
                        match tokio::net::TcpStream::from_std(stream) {
                            Ok(stream) => {
                                tokio::spawn(crate::connection::run(registry, TcpDatamover::new(stream)));
                            }
                            Err(error) => tracing::warn!(%error, "cannot serve an accepted iSCSI connection"),
                        }
                    }
                });
            })?;
            senders.push(sender);
        }
        Ok(ConnectionThreads { senders, next: AtomicU64::new(0) })
    }

    /// Accepts connections on `listener` for good, handing each to the
    /// next thread, where the TCP datamover serves it. A failed accept (out
    /// of file descriptors, say) is logged and retried after a pause: the
    /// portal stays up for the sessions that come once the pressure ends.
    pub async fn serve(&self, registry: Arc<Registry>, listener: TcpListener) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accepting an iSCSI connection failed; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let stream = match stream.into_std() {
                Ok(stream) => stream,
                Err(error) => {
                    tracing::warn!(%peer, %error, "cannot hand an accepted iSCSI connection to its thread");
                    continue;
                }
            };
            let thread = self.next.fetch_add(1, Ordering::Relaxed) as usize % self.senders.len();
            if self.senders[thread].send((registry.clone(), stream)).is_err() {
                tracing::error!(%peer, thread, "iSCSI connection thread has stopped; refusing the connection");
            }
        }
    }
}
