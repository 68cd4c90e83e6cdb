//! The distributed persistent queue (the seed's mechanism): unique ids from
//! a timestamp, a clock-drift correction and the host id; items stored in
//! the shared log; one ordering, by log position, identical on every host;
//! removal of any item.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use wire::Transport;

use crate::objects::{Queue, QueueOp, Value};
use crate::smr::{Replicated, Runtime, SmrError};
use crate::types::{Position, StreamId};

/// A queue item's id. Ids from different hosts never collide (the host id
/// is part of it) and are roughly time-ordered (the timestamp leads).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct QueueId {
    pub timestamp_micros: u64,
    pub host: u32,
    pub sequence: u32,
}

impl std::fmt::Display for QueueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}-{}", self.timestamp_micros, self.host, self.sequence)
    }
}

impl std::str::FromStr for QueueId {
    type Err = String;

    fn from_str(text: &str) -> Result<QueueId, String> {
        let parts: Vec<&str> = text.split('-').collect();
        let [timestamp, host, sequence] = parts[..] else {
            return Err(format!("queue id {text:?} is not <timestamp>-<host>-<sequence>"));
        };
        let parse = |part: &str| part.parse::<u64>().map_err(|error| format!("queue id {text:?}: {error}"));
        Ok(QueueId {
            timestamp_micros: parse(timestamp)?,
            host: parse(host)? as u32,
            sequence: parse(sequence)? as u32,
        })
    }
}

/// Wall-clock time, behind a trait so tests and the simulator control it.
pub trait Clock: Send + Sync + 'static {
    fn now_micros(&self) -> u64;
}

#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_micros(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_micros() as u64)
            .unwrap_or(0)
    }
}

/// The largest forward correction applied for another host's clock. Why:
/// a host whose clock is wildly ahead must not drag every id with it.
pub const DRIFT_CORRECTION_MAX_MICROS: u64 = 60_000_000;

#[derive(Debug, Default)]
struct GeneratorState {
    last_timestamp: u64,
    sequence: u32,
    correction: u64,
}

/// Issues unique, roughly time-ordered ids for one host.
pub struct IdGenerator {
    host: u32,
    clock: Arc<dyn Clock>,
    state: Mutex<GeneratorState>,
}

impl IdGenerator {
    pub fn new(host: u32, clock: Arc<dyn Clock>) -> IdGenerator {
        IdGenerator { host, clock, state: Mutex::new(GeneratorState::default()) }
    }

    /// Tells the generator about an id another host issued: if that host's
    /// clock is ahead of ours, correct ours forward (bounded), so our next
    /// ids do not sort before ids already in the queue.
    pub fn observe(&self, timestamp_micros: u64) {
        let now = self.clock.now_micros();
        let mut state = self.state.lock().expect("generator lock");
        let ours = now + state.correction;
        if timestamp_micros > ours {
            let needed = timestamp_micros - now;
            state.correction = needed.min(DRIFT_CORRECTION_MAX_MICROS).max(state.correction);
        }
    }

    pub fn correction_micros(&self) -> u64 {
        self.state.lock().expect("generator lock").correction
    }

    /// The next id: never equal to an earlier one from this host, even if
    /// the clock steps back.
    pub fn next(&self) -> QueueId {
        let now = self.clock.now_micros();
        let mut state = self.state.lock().expect("generator lock");
        let timestamp = (now + state.correction).max(state.last_timestamp);
        if timestamp == state.last_timestamp {
            state.sequence = state.sequence.wrapping_add(1);
            if state.sequence == 0 {
                // 2^32 ids in one microsecond: move time on instead.
                state.last_timestamp += 1;
            }
        } else {
            state.last_timestamp = timestamp;
            state.sequence = 0;
        }
        QueueId { timestamp_micros: state.last_timestamp, host: self.host, sequence: state.sequence }
    }
}

/// A persistent queue replicated on the shared log.
pub struct PersistentQueue<V: Value, T: Transport> {
    object: Replicated<Queue<V>, T>,
    ids: IdGenerator,
}

impl<V: Value, T: Transport> PersistentQueue<V, T> {
    pub async fn open(
        runtime: &Runtime<T>,
        stream: StreamId,
        host: u32,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, SmrError> {
        let object = runtime.open::<Queue<V>>(stream).await?;
        Ok(PersistentQueue { object, ids: IdGenerator::new(host, clock) })
    }

    /// Adds `item` at the end of the queue; returns its id and position.
    pub async fn enqueue(&self, item: V) -> Result<(QueueId, Position), SmrError> {
        if let Some(newest) = self.object.read_local(|queue| queue.newest_timestamp()) {
            self.ids.observe(newest);
        }
        let id = self.ids.next();
        let (position, _) = self.object.submit(QueueOp::Enqueue { id, item }).await?;
        Ok((id, position))
    }

    /// Removes any item; false if it was not there.
    pub async fn remove(&self, id: QueueId) -> Result<bool, SmrError> {
        Ok(self.object.submit(QueueOp::Remove { id }).await?.1)
    }

    /// The ordering of every item: (id, log position), identical on every
    /// host because it is the log's order.
    pub async fn entries(&self) -> Result<Vec<(QueueId, Position)>, SmrError> {
        self.object.read(|queue| queue.entries()).await
    }

    /// The items themselves, in queue order (linearizable).
    pub async fn items(&self) -> Result<Vec<(QueueId, Position, V)>, SmrError> {
        self.object.read(|queue| queue.items().map(|(id, position, item)| (id, position, item.clone())).collect()).await
    }

    pub fn object(&self) -> &Replicated<Queue<V>, T> {
        &self.object
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    struct FakeClock(AtomicU64);

    impl Clock for FakeClock {
        fn now_micros(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    #[test]
    fn ids_are_unique_and_monotonic_even_if_the_clock_steps_back() {
        let clock = Arc::new(FakeClock(AtomicU64::new(1_000)));
        let generator = IdGenerator::new(7, clock.clone());
        let first = generator.next();
        let second = generator.next();
        assert!(second > first);
        clock.0.store(500, Ordering::SeqCst);
        let after_step_back = generator.next();
        assert!(after_step_back > second, "{after_step_back:?} after {second:?}");
        assert_eq!(after_step_back.host, 7);
    }

    #[test]
    fn hosts_never_collide() {
        let clock = Arc::new(FakeClock(AtomicU64::new(42)));
        let a = IdGenerator::new(1, clock.clone());
        let b = IdGenerator::new(2, clock);
        let mut ids: Vec<QueueId> = (0..1000).flat_map(|_| [a.next(), b.next()]).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 2000);
    }

    #[test]
    fn drift_correction_follows_a_clock_ahead_within_bounds() {
        let clock = Arc::new(FakeClock(AtomicU64::new(1_000_000)));
        let generator = IdGenerator::new(1, clock);
        generator.observe(1_000_000 + 5_000);
        assert_eq!(generator.correction_micros(), 5_000);
        assert!(generator.next().timestamp_micros >= 1_005_000);
        generator.observe(u64::MAX / 2);
        assert_eq!(generator.correction_micros(), DRIFT_CORRECTION_MAX_MICROS);
    }

    #[test]
    fn ids_round_trip_as_text() {
        let id = QueueId { timestamp_micros: 123, host: 4, sequence: 5 };
        assert_eq!(id.to_string().parse::<QueueId>().unwrap(), id);
        assert!("nonsense".parse::<QueueId>().is_err());
    }
}
