//! An in-memory network for deterministic simulation and fault injection.
//!
//! Every call is a message that may be delayed, dropped or blocked by a
//! partition, decided by a seeded random number generator. Run under a
//! current-thread tokio runtime with paused time and the same seed, the same
//! sequence of calls sees the same faults, so a failing run replays.
//!
//! Faults look to the caller as they would on a real network: a dropped
//! message or a partition is silence until the call's timeout; a host that is
//! down refuses connections.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{BoxFuture, CallError, Handler, Request, ServeHandle, ServerStats, Transport};

/// Fault settings; all probabilities are per message.
#[derive(Clone, Debug)]
pub struct Faults {
    pub loss_probability: f64,
    pub delay_min: Duration,
    pub delay_max: Duration,
}

impl Default for Faults {
    fn default() -> Self {
        Faults { loss_probability: 0.0, delay_min: Duration::from_micros(100), delay_max: Duration::from_millis(1) }
    }
}

struct Endpoint {
    handler: Arc<dyn Handler>,
    /// Bumped when the endpoint is re-registered, so replies computed by a
    /// killed incarnation never reach anyone.
    incarnation: u64,
}

struct State {
    rng: StdRng,
    faults: Faults,
    endpoints: BTreeMap<String, Endpoint>,
    incarnations: u64,
    /// Unordered pairs of addresses that cannot reach each other.
    cut: BTreeSet<(String, String)>,
    /// Per-address extra delay, to make one host slow.
    slow: BTreeMap<String, Duration>,
    messages_sent: u64,
    messages_dropped: u64,
}

/// The simulated network. Clone it to share.
#[derive(Clone)]
pub struct SimNetwork {
    state: Arc<Mutex<State>>,
}

enum Delivery {
    Deliver { delay: Duration },
    Drop,
}

impl SimNetwork {
    pub fn new(seed: u64, faults: Faults) -> SimNetwork {
        SimNetwork {
            state: Arc::new(Mutex::new(State {
                rng: StdRng::seed_from_u64(seed),
                faults,
                endpoints: BTreeMap::new(),
                incarnations: 0,
                cut: BTreeSet::new(),
                slow: BTreeMap::new(),
                messages_sent: 0,
                messages_dropped: 0,
            })),
        }
    }

    /// A transport whose calls originate from `local` (an address).
    pub fn transport(&self, local: &str) -> SimTransport {
        SimTransport { network: self.clone(), local: local.to_string() }
    }

    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    /// Cuts both directions between `a` and `b`.
    pub fn partition(&self, a: &str, b: &str) {
        self.lock().cut.insert(ordered(a, b));
    }

    /// Cuts `isolated` off from every other address given.
    pub fn isolate(&self, isolated: &str, others: &[String]) {
        for other in others {
            if other != isolated {
                self.partition(isolated, other);
            }
        }
    }

    pub fn heal_all(&self) {
        self.lock().cut.clear();
    }

    pub fn set_slow(&self, address: &str, extra: Duration) {
        self.lock().slow.insert(address.to_string(), extra);
    }

    pub fn clear_slow(&self) {
        self.lock().slow.clear();
    }

    /// Takes `address` off the network, as if its process died.
    pub fn take_down(&self, address: &str) {
        self.lock().endpoints.remove(address);
    }

    /// Messages sent and dropped so far.
    pub fn message_counts(&self) -> (u64, u64) {
        let state = self.lock();
        (state.messages_sent, state.messages_dropped)
    }

    /// A random number from the network's generator, for scenario code that
    /// wants its choices to replay with the seed.
    pub fn random_below(&self, bound: u64) -> u64 {
        self.lock().rng.gen_range(0..bound.max(1))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("sim network lock poisoned")
    }

    fn decide(&self, from: &str, to: &str) -> Delivery {
        let mut state = self.lock();
        state.messages_sent += 1;
        if state.cut.contains(&ordered(from, to)) {
            state.messages_dropped += 1;
            return Delivery::Drop;
        }
        let loss = state.faults.loss_probability;
        if loss > 0.0 && state.rng.gen_bool(loss.min(1.0)) {
            state.messages_dropped += 1;
            return Delivery::Drop;
        }
        let (low, high) = (state.faults.delay_min, state.faults.delay_max.max(state.faults.delay_min));
        let mut delay = if high > low { state.rng.gen_range(low..=high) } else { low };
        delay += state.slow.get(from).copied().unwrap_or_default();
        delay += state.slow.get(to).copied().unwrap_or_default();
        Delivery::Deliver { delay }
    }

    async fn call_inner(
        &self,
        from: String,
        to: String,
        method: u32,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, CallError> {
        let timed_out = || CallError::Timeout { address: to.clone(), timeout_ms: timeout.as_millis() as u64 };
        let deadline = tokio::time::Instant::now() + timeout;
        let endpoint = {
            let state = self.lock();
            state.endpoints.get(&to).map(|endpoint| (endpoint.handler.clone(), endpoint.incarnation))
        };
        let Some((handler, incarnation)) = endpoint else {
            return Err(CallError::Connect { address: to.clone(), reason: "connection refused".into() });
        };
        let Delivery::Deliver { delay } = self.decide(&from, &to) else {
            tokio::time::sleep_until(deadline).await;
            return Err(timed_out());
        };
        if tokio::time::Instant::now() + delay >= deadline {
            tokio::time::sleep_until(deadline).await;
            return Err(timed_out());
        }
        tokio::time::sleep(delay).await;
        let request = Request { method, payload, peer: from.clone() };
        let reply = match tokio::time::timeout_at(deadline, handler.handle(request)).await {
            Ok(reply) => reply,
            Err(_) => return Err(timed_out()),
        };
        // The reply travels back through the same faults.
        let alive = self.lock().endpoints.get(&to).map(|endpoint| endpoint.incarnation) == Some(incarnation);
        if !alive {
            tokio::time::sleep_until(deadline).await;
            return Err(CallError::ConnectionLost { address: to });
        }
        let Delivery::Deliver { delay } = self.decide(&to, &from) else {
            tokio::time::sleep_until(deadline).await;
            return Err(timed_out());
        };
        if tokio::time::Instant::now() + delay >= deadline {
            tokio::time::sleep_until(deadline).await;
            return Err(timed_out());
        }
        tokio::time::sleep(delay).await;
        reply.map_err(|error| CallError::Remote { address: to, error })
    }
}

fn ordered(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_string(), b.to_string())
    } else {
        (b.to_string(), a.to_string())
    }
}

/// A [`Transport`] bound to one simulated host address.
#[derive(Clone)]
pub struct SimTransport {
    network: SimNetwork,
    local: String,
}

impl Transport for SimTransport {
    fn call(&self, to: &str, method: u32, payload: Bytes, timeout: Duration) -> BoxFuture<Result<Bytes, CallError>> {
        let network = self.network.clone();
        let from = self.local.clone();
        let to = to.to_string();
        Box::pin(async move { network.call_inner(from, to, method, payload, timeout).await })
    }

    fn serve(&self, address: &str, handler: Arc<dyn Handler>) -> BoxFuture<std::io::Result<ServeHandle>> {
        let network = self.network.clone();
        let address = address.to_string();
        Box::pin(async move {
            let incarnation = {
                let mut state = network.lock();
                state.incarnations += 1;
                let incarnation = state.incarnations;
                state.endpoints.insert(address.clone(), Endpoint { handler, incarnation });
                incarnation
            };
            let stop_network = network.clone();
            let stop_address = address.clone();
            Ok(ServeHandle::new(
                address,
                Arc::new(ServerStats::default()),
                Box::new(move || {
                    let mut state = stop_network.lock();
                    if state.endpoints.get(&stop_address).map(|endpoint| endpoint.incarnation) == Some(incarnation) {
                        state.endpoints.remove(&stop_address);
                    }
                }),
            ))
        })
    }
}
