//! The replicated object types: map, register and queue.

use std::collections::BTreeMap;
use std::fmt::Debug;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use wire::Transport;

use crate::queue::QueueId;
use crate::smr::{Object, Obsoleted, Replicated, SmrError};
use crate::types::Position;

/// Bounds for keys and values stored in replicated objects.
pub trait Value: Clone + Serialize + DeserializeOwned + Send + Sync + Debug + 'static {}
impl<T: Clone + Serialize + DeserializeOwned + Send + Sync + Debug + 'static> Value for T {}

/// A lost compare-and-set: the version found instead of the one expected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("version conflict: found {current:?}")]
pub struct Conflict {
    pub current: Option<Position>,
}

/// A map whose every key carries a version: the position of its last write.
#[derive(Clone, Debug)]
pub struct Map<K, V> {
    entries: BTreeMap<K, (V, Position)>,
}

impl<K, V> Default for Map<K, V> {
    fn default() -> Self {
        Map { entries: BTreeMap::new() }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum MapOp<K, V> {
    Put {
        key: K,
        value: V,
    },
    Delete {
        key: K,
    },
    /// Writes (`Some`) or deletes (`None`) only if the key's version is
    /// `expected` (`None`: the key is absent).
    CompareAndSet {
        key: K,
        expected: Option<Position>,
        value: Option<V>,
    },
}

impl<K: Value + Ord, V: Value> Map<K, V> {
    pub fn get<Q>(&self, key: &Q) -> Option<&(V, Position)>
    where
        K: std::borrow::Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.entries.get(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &(V, Position))> {
        self.entries.iter()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes `key`. `conditional`: the write was a compare-and-set, whose
    /// replay needs the old version's entry until a checkpoint.
    fn put(&mut self, key: K, value: V, position: Position, conditional: bool, obsoleted: &mut Obsoleted) {
        if let Some((_, old)) = self.entries.insert(key, (value, position)) {
            if conditional {
                obsoleted.needed_until_checkpoint.push(old);
            } else {
                obsoleted.superseded.push(old);
            }
        }
    }

    fn delete(&mut self, key: &K, conditional: bool, obsoleted: &mut Obsoleted) -> bool {
        match self.entries.remove(key) {
            Some((_, old)) => {
                if conditional {
                    obsoleted.needed_until_checkpoint.push(old);
                } else {
                    obsoleted.superseded.push(old);
                }
                obsoleted.until_checkpoint = true;
                true
            }
            None => {
                obsoleted.without_effect = true;
                false
            }
        }
    }
}

impl<K: Value + Ord, V: Value> Object for Map<K, V> {
    type Op = MapOp<K, V>;
    type Outcome = Result<bool, Conflict>;
    type State = Vec<(K, V, Position)>;

    fn apply(&mut self, position: Position, op: MapOp<K, V>, obsoleted: &mut Obsoleted) -> Result<bool, Conflict> {
        match op {
            MapOp::Put { key, value } => {
                self.put(key, value, position, false, obsoleted);
                Ok(true)
            }
            MapOp::Delete { key } => Ok(self.delete(&key, false, obsoleted)),
            MapOp::CompareAndSet { key, expected, value } => {
                let current = self.entries.get(&key).map(|(_, version)| *version);
                if current != expected {
                    obsoleted.without_effect = true;
                    return Err(Conflict { current });
                }
                match value {
                    Some(value) => self.put(key, value, position, true, obsoleted),
                    None => {
                        self.delete(&key, true, obsoleted);
                    }
                }
                Ok(true)
            }
        }
    }

    fn to_state(&self) -> Self::State {
        self.entries.iter().map(|(key, (value, version))| (key.clone(), value.clone(), *version)).collect()
    }

    fn from_state(state: Self::State) -> Self {
        Map { entries: state.into_iter().map(|(key, value, version)| (key, (value, version))).collect() }
    }
}

impl<K: Value + Ord, V: Value, T: Transport> Replicated<Map<K, V>, T> {
    /// Writes `key`; returns the new version.
    pub async fn put(&self, key: K, value: V) -> Result<Position, SmrError> {
        let (position, _) = self.submit(MapOp::Put { key, value }).await?;
        Ok(position)
    }

    /// Deletes `key`; false if it was absent.
    pub async fn delete(&self, key: K) -> Result<bool, SmrError> {
        let (_, outcome) = self.submit(MapOp::Delete { key }).await?;
        Ok(outcome.unwrap_or(false))
    }

    /// Compare-and-set on the key's version. The outer error is the log's;
    /// the inner one a lost race.
    pub async fn compare_and_set(
        &self,
        key: K,
        expected: Option<Position>,
        value: Option<V>,
    ) -> Result<Result<Position, Conflict>, SmrError> {
        let (position, outcome) = self.submit(MapOp::CompareAndSet { key, expected, value }).await?;
        Ok(outcome.map(|_| position))
    }

    /// A linearizable read of one key with its version.
    pub async fn get(&self, key: &K) -> Result<Option<(V, Position)>, SmrError> {
        self.read(|map| map.get(key).cloned()).await
    }

    /// A possibly stale read of one key.
    pub fn get_local(&self, key: &K) -> Option<(V, Position)> {
        self.read_local(|map| map.get(key).cloned())
    }

    /// A linearizable copy of the whole map.
    pub async fn entries(&self) -> Result<Vec<(K, V, Position)>, SmrError> {
        self.read(|map| map.to_state()).await
    }

    pub fn entries_local(&self) -> Vec<(K, V, Position)> {
        self.read_local(|map| map.to_state())
    }
}

/// A single value with a version.
#[derive(Clone, Debug)]
pub struct Register<V> {
    value: Option<(V, Position)>,
}

impl<V> Default for Register<V> {
    fn default() -> Self {
        Register { value: None }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum RegisterOp<V> {
    Set(V),
    CompareAndSet { expected: Option<Position>, value: V },
}

impl<V: Value> Object for Register<V> {
    type Op = RegisterOp<V>;
    type Outcome = Result<(), Conflict>;
    type State = Option<(V, Position)>;

    fn apply(&mut self, position: Position, op: RegisterOp<V>, obsoleted: &mut Obsoleted) -> Result<(), Conflict> {
        let (value, conditional) = match op {
            RegisterOp::Set(value) => (value, false),
            RegisterOp::CompareAndSet { expected, value } => {
                let current = self.value.as_ref().map(|(_, version)| *version);
                if current != expected {
                    obsoleted.without_effect = true;
                    return Err(Conflict { current });
                }
                (value, true)
            }
        };
        if let Some((_, old)) = self.value.replace((value, position)) {
            if conditional {
                obsoleted.needed_until_checkpoint.push(old);
            } else {
                obsoleted.superseded.push(old);
            }
        }
        Ok(())
    }

    fn to_state(&self) -> Self::State {
        self.value.clone()
    }

    fn from_state(state: Self::State) -> Self {
        Register { value: state }
    }
}

impl<V: Value, T: Transport> Replicated<Register<V>, T> {
    pub async fn set(&self, value: V) -> Result<Position, SmrError> {
        Ok(self.submit(RegisterOp::Set(value)).await?.0)
    }

    pub async fn compare_and_set(
        &self,
        expected: Option<Position>,
        value: V,
    ) -> Result<Result<Position, Conflict>, SmrError> {
        let (position, outcome) = self.submit(RegisterOp::CompareAndSet { expected, value }).await?;
        Ok(outcome.map(|_| position))
    }

    pub async fn get(&self) -> Result<Option<(V, Position)>, SmrError> {
        self.read(|register| register.value.clone()).await
    }

    pub fn get_local(&self) -> Option<(V, Position)> {
        self.read_local(|register| register.value.clone())
    }
}

/// The persistent queue's state: items in log order.
#[derive(Clone, Debug)]
pub struct Queue<V> {
    /// Keyed by (position, id): the one order every host sees.
    items: BTreeMap<(Position, QueueId), V>,
    positions: BTreeMap<QueueId, Position>,
}

impl<V> Default for Queue<V> {
    fn default() -> Self {
        Queue { items: BTreeMap::new(), positions: BTreeMap::new() }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum QueueOp<V> {
    Enqueue { id: QueueId, item: V },
    Remove { id: QueueId },
}

impl<V: Value> Queue<V> {
    /// Every item's id and log position, in queue order.
    pub fn entries(&self) -> Vec<(QueueId, Position)> {
        self.items.keys().map(|(position, id)| (*id, *position)).collect()
    }

    pub fn get(&self, id: &QueueId) -> Option<&V> {
        let position = self.positions.get(id)?;
        self.items.get(&(*position, *id))
    }

    pub fn items(&self) -> impl Iterator<Item = (QueueId, Position, &V)> {
        self.items.iter().map(|((position, id), item)| (*id, *position, item))
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The newest id timestamp seen, for clock-drift correction.
    pub fn newest_timestamp(&self) -> Option<u64> {
        self.positions.keys().map(|id| id.timestamp_micros).max()
    }
}

impl<V: Value> Object for Queue<V> {
    type Op = QueueOp<V>;
    type Outcome = bool;
    type State = Vec<(Position, QueueId, V)>;

    fn apply(&mut self, position: Position, op: QueueOp<V>, obsoleted: &mut Obsoleted) -> bool {
        match op {
            QueueOp::Enqueue { id, item } => {
                if self.positions.contains_key(&id) {
                    obsoleted.without_effect = true;
                    return false;
                }
                self.positions.insert(id, position);
                self.items.insert((position, id), item);
                true
            }
            QueueOp::Remove { id } => match self.positions.remove(&id) {
                Some(enqueued) => {
                    self.items.remove(&(enqueued, id));
                    obsoleted.superseded.push(enqueued);
                    obsoleted.until_checkpoint = true;
                    true
                }
                None => {
                    obsoleted.without_effect = true;
                    false
                }
            },
        }
    }

    fn to_state(&self) -> Self::State {
        self.items.iter().map(|((position, id), item)| (*position, *id, item.clone())).collect()
    }

    fn from_state(state: Self::State) -> Self {
        let mut queue = Queue::default();
        for (position, id, item) in state {
            queue.positions.insert(id, position);
            queue.items.insert((position, id), item);
        }
        queue
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    enum Logged<O: Object> {
        Data(O::Op),
        Checkpoint { version: Position, state: Vec<u8> },
    }

    /// Applies `ops` to an object the way the runtime does, reporting and
    /// deleting obsolete entries as GC may (any subset, at any time after
    /// their obsoleter), with checkpoints where `checkpoint_at` says; then
    /// replays what is left, from the newest live checkpoint, and checks the
    /// state is the same.
    fn replays_the_same<O: Object, I>(
        intents: Vec<I>,
        resolve: impl Fn(&O, I) -> O::Op,
        checkpoint_at: &[bool],
        collect: &[bool],
    ) -> Result<(), String>
    where
        O::Op: Clone,
    {
        let mut original = O::default();
        let mut log: Vec<Logged<O>> = Vec::new();
        let mut live: BTreeSet<Position> = BTreeSet::new();
        let mut obsolete: Vec<Position> = Vec::new();
        let mut deleted: BTreeSet<Position> = BTreeSet::new();
        let mut decisions = collect.iter().cycle();
        for (index, intent) in intents.into_iter().enumerate() {
            // Resolved against the state as the writer would have read it.
            let op = resolve(&original, intent);
            if checkpoint_at.get(index).copied().unwrap_or(false) {
                let position = log.len() as Position;
                let state = postcard::to_stdvec(&original.to_state()).unwrap();
                obsolete.extend(live.range(..position).copied());
                live.retain(|live_position| *live_position >= position);
                live.insert(position);
                log.push(Logged::Checkpoint { version: position, state });
            }
            let position = log.len() as Position;
            let mut obsoleted = Obsoleted::default();
            original.apply(position, op.clone(), &mut obsoleted);
            for superseded in obsoleted.superseded {
                live.remove(&superseded);
                obsolete.push(superseded);
            }
            if obsoleted.without_effect {
                obsolete.push(position);
            } else {
                live.insert(position);
            }
            log.push(Logged::Data(op));
            // GC deletes some of what is obsolete by now.
            obsolete.retain(|candidate| {
                let delete = *decisions.next().unwrap_or(&false);
                if delete {
                    deleted.insert(*candidate);
                }
                !delete
            });
        }
        let mut replayed = O::default();
        let mut from = 0;
        let newest = log
            .iter()
            .enumerate()
            .filter(|(position, _)| !deleted.contains(&(*position as Position)))
            .filter_map(|(_, entry)| match entry {
                Logged::Checkpoint { version, state } => Some((*version, state)),
                Logged::Data(_) => None,
            })
            .max_by_key(|(version, _)| *version);
        if let Some((version, state)) = newest {
            replayed = O::from_state(postcard::from_bytes(state).unwrap());
            from = version;
        }
        for (position, entry) in log.iter().enumerate().skip(from as usize) {
            if deleted.contains(&(position as Position)) {
                continue;
            }
            if let Logged::Data(op) = entry {
                replayed.apply(position as Position, op.clone(), &mut Obsoleted::default());
            }
        }
        let want = postcard::to_stdvec(&original.to_state()).unwrap();
        let got = postcard::to_stdvec(&replayed.to_state()).unwrap();
        if want == got {
            Ok(())
        } else {
            Err(format!("replay diverged after deleting {deleted:?}"))
        }
    }

    #[derive(Clone, Debug)]
    enum Intent {
        Put(u8, u8),
        Delete(u8),
        /// Compare-and-set against the version the writer just read.
        SetIfCurrent(u8, Option<u8>),
        /// Compare-and-set against a stale or made-up version.
        SetIfStale(u8, Option<u64>, Option<u8>),
    }

    fn intent() -> impl Strategy<Value = Intent> {
        prop_oneof![
            3 => (0u8..3, any::<u8>()).prop_map(|(key, value)| Intent::Put(key, value)),
            1 => (0u8..3).prop_map(Intent::Delete),
            4 => (0u8..3, proptest::option::of(any::<u8>())).prop_map(|(key, value)| Intent::SetIfCurrent(key, value)),
            1 => (0u8..3, proptest::option::of(0u64..40), proptest::option::of(any::<u8>()))
                .prop_map(|(key, expected, value)| Intent::SetIfStale(key, expected, value)),
        ]
    }

    fn resolve_map(map: &Map<u8, u8>, intent: Intent) -> MapOp<u8, u8> {
        match intent {
            Intent::Put(key, value) => MapOp::Put { key, value },
            Intent::Delete(key) => MapOp::Delete { key },
            Intent::SetIfCurrent(key, value) => {
                MapOp::CompareAndSet { key, expected: map.get(&key).map(|(_, version)| *version), value }
            }
            Intent::SetIfStale(key, expected, value) => MapOp::CompareAndSet { key, expected, value },
        }
    }

    fn resolve_register(register: &Register<u8>, intent: Intent) -> RegisterOp<u8> {
        match intent {
            Intent::Put(_, value) | Intent::Delete(value) => RegisterOp::Set(value),
            Intent::SetIfCurrent(_, value) => RegisterOp::CompareAndSet {
                expected: register.value.as_ref().map(|(_, version)| *version),
                value: value.unwrap_or(0),
            },
            Intent::SetIfStale(_, expected, value) => RegisterOp::CompareAndSet { expected, value: value.unwrap_or(0) },
        }
    }

    proptest! {
        #[test]
        fn a_map_replays_to_the_same_state_whatever_gc_removed(
            intents in proptest::collection::vec(intent(), 1..40),
            checkpoints in proptest::collection::vec(proptest::bool::weighted(0.1), 40),
            collect in proptest::collection::vec(any::<bool>(), 1..64),
        ) {
            let outcome = replays_the_same::<Map<u8, u8>, Intent>(intents, resolve_map, &checkpoints, &collect);
            prop_assert!(outcome.is_ok(), "{:?}", outcome);
        }

        #[test]
        fn a_register_replays_to_the_same_state_whatever_gc_removed(
            intents in proptest::collection::vec(intent(), 1..40),
            checkpoints in proptest::collection::vec(proptest::bool::weighted(0.1), 40),
            collect in proptest::collection::vec(any::<bool>(), 1..64),
        ) {
            let outcome = replays_the_same::<Register<u8>, Intent>(intents, resolve_register, &checkpoints, &collect);
            prop_assert!(outcome.is_ok(), "{:?}", outcome);
        }
    }

    #[test]
    fn map_reports_what_each_update_obsoletes() {
        let mut map: Map<String, u32> = Map::default();
        let mut obsoleted = Obsoleted::default();
        assert_eq!(map.apply(1, MapOp::Put { key: "a".into(), value: 1 }, &mut obsoleted), Ok(true));
        assert!(obsoleted.superseded.is_empty());
        let mut obsoleted = Obsoleted::default();
        map.apply(2, MapOp::Put { key: "a".into(), value: 2 }, &mut obsoleted).unwrap();
        assert_eq!(obsoleted.superseded, vec![1]);
        let mut obsoleted = Obsoleted::default();
        let lost =
            map.apply(3, MapOp::CompareAndSet { key: "a".into(), expected: Some(1), value: Some(9) }, &mut obsoleted);
        assert_eq!(lost, Err(Conflict { current: Some(2) }));
        assert!(obsoleted.without_effect);
        let mut obsoleted = Obsoleted::default();
        map.apply(4, MapOp::Delete { key: "a".into() }, &mut obsoleted).unwrap();
        assert_eq!(obsoleted.superseded, vec![2]);
        assert!(obsoleted.until_checkpoint, "a delete outlives what it deleted");
        assert!(map.is_empty());
    }

    #[test]
    fn queue_orders_by_position_and_removes_anywhere() {
        let mut queue: Queue<String> = Queue::default();
        let id = |n: u32| QueueId { timestamp_micros: 100 - n as u64, host: n, sequence: 0 };
        for (position, n) in [(10u64, 1u32), (11, 2), (12, 3)] {
            assert!(queue.apply(
                position,
                QueueOp::Enqueue { id: id(n), item: "x".to_string() },
                &mut Obsoleted::default()
            ));
        }
        // Ids are not in position order (timestamps decrease); the queue is.
        assert_eq!(queue.entries(), vec![(id(1), 10), (id(2), 11), (id(3), 12)]);
        let mut obsoleted = Obsoleted::default();
        assert!(queue.apply(13, QueueOp::Remove { id: id(2) }, &mut obsoleted));
        assert_eq!(obsoleted.superseded, vec![11]);
        assert_eq!(queue.entries(), vec![(id(1), 10), (id(3), 12)]);
        let restored = Queue::from_state(queue.to_state());
        assert_eq!(restored.entries(), queue.entries());
    }
}
