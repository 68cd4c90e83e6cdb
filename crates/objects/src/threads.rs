//! Owner threads and component threads (spec: "coordinated owner and
//! component threads").
//!
//! A host runs T owner threads and M component threads, each a
//! single-threaded tokio runtime on its own OS thread. An object runs on
//! owner thread `id % T`: its owner state, its tasks and its connections
//! live there. Each owner thread has its own transport, so it opens one
//! connection per component thread it talks to; owner thread `i` talks to
//! component thread `i % M` of every component host. Each component thread
//! listens on its own address and serves the requests of its connections
//! on its own runtime. An I/O therefore never crosses threads on either
//! side (the block store's journal writer is the disk's own thread), and
//! connections grow with threads, not objects.
//!
//! A component thread of the owner's own host is not reached over TCP: the
//! owner threads' transports serve calls to those addresses in place
//! ([`LocalHandlers`]), running the component service on the owner thread.
//! A local copy then costs no socket, no kernel TCP stack and no wake-up of
//! another thread, in either direction.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};
use wire::tcp::{LocalHandlers, TcpTransport};
use wire::Transport;

use crate::component::Service;

type Job = Box<dyn FnOnce(TcpTransport) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// Per-thread figures, for metrics (balance between threads).
#[derive(Debug, Default)]
pub struct ThreadStats {
    /// Jobs or requests queued or running on the thread now.
    pub depth: AtomicI64,
    /// Jobs or requests the thread has taken in all.
    pub total: AtomicU64,
}

/// A host's owner threads.
pub struct OwnerThreads {
    senders: Vec<mpsc::UnboundedSender<Job>>,
    stats: Vec<Arc<ThreadStats>>,
    /// This host's component threads, served in place by these threads.
    local: LocalHandlers,
    /// Where calls to components leave from.
    source: Option<std::net::IpAddr>,
    /// Tells these threads' transports for other threads apart from those
    /// of another host's (tests run several hosts in one process).
    id: u64,
}

thread_local! {
    /// The calling thread's own transports, one per [`OwnerThreads`] it
    /// ran reads for (see [`OwnerThreads::this_thread_transport`]).
    static THREAD_TRANSPORTS: std::cell::RefCell<Vec<(u64, TcpTransport)>> = const { std::cell::RefCell::new(Vec::new()) };
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

#[derive(Debug, thiserror::Error)]
#[error("owner thread {0} has stopped")]
pub struct ThreadStopped(pub usize);

impl OwnerThreads {
    /// Starts `count` owner threads (at least one), whose calls to
    /// components leave from `source` (see [`TcpTransport::bound_to`]).
    pub fn start(count: usize, source: Option<std::net::IpAddr>) -> std::io::Result<OwnerThreads> {
        let mut senders = Vec::new();
        let mut stats = Vec::new();
        let local = LocalHandlers::default();
        for index in 0..count.max(1) {
            let (sender, mut jobs) = mpsc::unbounded_channel::<Job>();
            let local = local.clone();
            let thread_stats = Arc::new(ThreadStats::default());
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let counted = thread_stats.clone();
            std::thread::Builder::new().name(format!("owner-{index}")).spawn(move || {
                let transport = TcpTransport::with_local(local).bound_to(source);
                runtime.block_on(async move {
                    while let Some(job) = jobs.recv().await {
                        let stats = counted.clone();
                        let work = job(transport.clone());
                        tokio::spawn(async move {
                            work.await;
                            stats.depth.fetch_sub(1, Ordering::Relaxed);
                        });
                    }
                });
            })?;
            senders.push(sender);
            stats.push(thread_stats);
        }
        Ok(OwnerThreads { senders, stats, local, source, id: NEXT_ID.fetch_add(1, Ordering::Relaxed) })
    }

    /// A transport of the calling thread's own, with its own connections
    /// to component hosts, for the reads a thread other than an owner
    /// thread runs (an iSCSI connection's thread). Its connections' tasks
    /// run on that thread's runtime, so a read's request and answer stay on
    /// the thread; through an owner thread's transport, each would wake the
    /// owner thread and then be handed back. Calls to this host's component
    /// threads are still served in place.
    pub fn this_thread_transport(&self) -> TcpTransport {
        THREAD_TRANSPORTS.with(|transports| {
            let mut transports = transports.borrow_mut();
            if let Some((_, transport)) = transports.iter().find(|(id, _)| *id == self.id) {
                return transport.clone();
            }
            let transport = TcpTransport::with_local(self.local.clone()).bound_to(self.source);
            transports.push((self.id, transport.clone()));
            transport
        })
    }

    /// The address calls to components leave from (`None`: the kernel's
    /// choice).
    pub fn source(&self) -> Option<std::net::IpAddr> {
        self.source
    }

    /// Where this host's component threads register, so that calls to them
    /// from these threads are served in place.
    pub fn local_handlers(&self) -> &LocalHandlers {
        &self.local
    }

    /// The owner thread of an object.
    pub fn thread_of(&self, object: u64) -> usize {
        (object % self.senders.len() as u64) as usize
    }

    pub fn stats(&self) -> &[Arc<ThreadStats>] {
        &self.stats
    }

    /// Runs `work` on owner thread `thread` (given that thread's
    /// transport) and returns its result.
    pub async fn run<R, F>(
        &self,
        thread: usize,
        work: impl FnOnce(TcpTransport) -> F + Send + 'static,
    ) -> Result<R, ThreadStopped>
    where
        R: Send + 'static,
        F: Future<Output = R> + Send + 'static,
    {
        let (done, result) = oneshot::channel();
        let job: Job = Box::new(move |transport| {
            Box::pin(async move {
                let _ = done.send(work(transport).await);
            })
        });
        let stats = &self.stats[thread];
        stats.depth.fetch_add(1, Ordering::Relaxed);
        stats.total.fetch_add(1, Ordering::Relaxed);
        if self.senders[thread].send(job).is_err() {
            stats.depth.fetch_sub(1, Ordering::Relaxed);
            return Err(ThreadStopped(thread));
        }
        result.await.map_err(|_| ThreadStopped(thread))
    }
}

/// A host's component threads, each serving its own listening address.
pub struct ComponentThreads {
    addresses: Vec<String>,
    stats: Vec<Arc<ThreadStats>>,
    stop: watch::Sender<bool>,
    local: LocalHandlers,
}

impl ComponentThreads {
    /// Starts `count` component threads listening on `ip` (ports chosen by
    /// the system), serving `service`; each address is also registered in
    /// `local`, so this process's owner threads serve calls to it in place.
    pub fn start(
        service: Arc<Service>,
        ip: &str,
        count: usize,
        local: &LocalHandlers,
    ) -> std::io::Result<ComponentThreads> {
        let (stop, _) = watch::channel(false);
        let mut addresses = Vec::new();
        let mut stats = Vec::new();
        for index in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let thread_stats = Arc::new(ThreadStats::default());
            let counted = thread_stats.clone();
            let served = service.clone();
            let mut stopped = stop.subscribe();
            let bind = format!("{ip}:0");
            let (listening, address) = std::sync::mpsc::channel();
            std::thread::Builder::new().name(format!("component-{index}")).spawn(move || {
                runtime.block_on(async move {
                    let handler = move |request: wire::Request| {
                        let service = served.clone();
                        let stats = counted.clone();
                        stats.depth.fetch_add(1, Ordering::Relaxed);
                        stats.total.fetch_add(1, Ordering::Relaxed);
                        async move {
                            let reply = service.handle(request).await;
                            stats.depth.fetch_sub(1, Ordering::Relaxed);
                            reply
                        }
                    };
                    match TcpTransport::new().serve(&bind, Arc::new(handler)).await {
                        Ok(serving) => {
                            let _ = listening.send(Ok(serving.local_address.clone()));
                            let _ = stopped.wait_for(|stop| *stop).await;
                            serving.stop();
                        }
                        Err(error) => {
                            let _ = listening.send(Err(error));
                        }
                    }
                });
            })?;
            let address = address.recv().map_err(|_| std::io::Error::other("component thread died starting"))??;
            let in_place = service.clone();
            local.insert(
                &address,
                Arc::new(move |request: wire::Request| {
                    let service = in_place.clone();
                    async move { service.handle(request).await }
                }),
            );
            addresses.push(address);
            stats.push(thread_stats);
        }
        Ok(ComponentThreads { addresses, stats, stop, local: local.clone() })
    }

    /// Where each thread listens, in thread order.
    pub fn addresses(&self) -> &[String] {
        &self.addresses
    }

    pub fn stats(&self) -> &[Arc<ThreadStats>] {
        &self.stats
    }

    pub fn stop(&self) {
        for address in &self.addresses {
            self.local.remove(address);
        }
        let _ = self.stop.send(true);
    }
}

impl Drop for ComponentThreads {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The component thread address owner thread `owner_thread` uses on a host
/// whose component threads listen at `addresses`.
pub fn component_address(addresses: &[String], owner_thread: usize) -> Option<&str> {
    (!addresses.is_empty()).then(|| addresses[owner_thread % addresses.len()].as_str())
}
