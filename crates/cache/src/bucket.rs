//! The list of one bucket of the hash table: its live elements and ghosts,
//! and its share of the cache's counters.
//!
//! The first `NEAR` slots sit in the bucket itself, their tags apart from
//! their pointers, so the lock word, the tags and the pointers of a bucket
//! share one 64-byte line: a lookup in a bucket of up to `NEAR` entries
//! touches that line and then only the element it finds. Further slots go
//! to a vector allocated when a bucket first needs one; a near slot emptied
//! takes the last far one, so the far vector holds only what the near slots
//! cannot.
//!
//! A slot is empty (tag 0, no element), a ghost (a tag, no element: the key
//! of that hash was evicted not long ago) or live (a tag and an element).
//! A tag is the low 32 bits of the key's hash with the lowest bit set, so
//! it is never 0: for a live slot it spares comparing the keys of most
//! non-matching elements; for a ghost it is all there is. Two hashes of one
//! bucket that share their tag (one pair in two billion) can make a key go
//! to the main queue when it would have gone to the small one, or drop the
//! other's ghost early: a matter of hit ratio, never of a value returned.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Slots in the bucket itself. With the tables sized for about two live
/// elements per bucket and ghosts for two fifths as many again, most
/// buckets need no more.
pub(crate) const NEAR: usize = 3;

/// A hash's tag (see the module documentation).
pub(crate) fn tag(hash: u64) -> u32 {
    hash as u32 | 1
}

pub(crate) struct List<E> {
    tags: [u32; NEAR],
    /// Hits, misses, insertions and evictions in this bucket not yet added
    /// to the shard's counters. Counted under the lock already held, so a
    /// read pays no atomic instruction to be counted (an add to a counter
    /// every thread shares cost a fifth of a hit's time); a count goes over
    /// to the shard before it would overflow.
    pending: [u16; 4],
    near: [Option<Arc<E>>; NEAR],
    far: Option<Box<Far<E>>>,
}

/// Slots past the near ones: tag and element (none for a ghost).
type Far<E> = Vec<(u32, Option<Arc<E>>)>;

impl<E> Default for List<E> {
    fn default() -> Self {
        List { tags: [0; NEAR], pending: [0; 4], near: Default::default(), far: None }
    }
}

impl<E> List<E> {
    pub(crate) fn get(&self, index: usize) -> (u32, Option<&Arc<E>>) {
        match index.checked_sub(NEAR) {
            None => (self.tags[index], self.near[index].as_ref()),
            Some(far) => {
                let (tag, element) = &self.far.as_ref().expect("a far slot")[far];
                (*tag, element.as_ref())
            }
        }
    }

    /// Every slot, empty ones included, as (tag, element): the n-th is
    /// slot index n.
    pub(crate) fn slots(&self) -> impl Iterator<Item = (u32, Option<&Arc<E>>)> {
        let near = self.tags.iter().zip(&self.near);
        let far = self.far.iter().flat_map(|far| far.iter().map(|(tag, element)| (tag, element)));
        near.chain(far).map(|(tag, element)| (*tag, element.as_ref()))
    }

    /// The first slot, not empty, that `matches` (given its tag and
    /// element). Every lookup comes here: two plain loops ran reads about a
    /// tenth faster than `slots().position(..)` did.
    pub(crate) fn find(&self, mut matches: impl FnMut(u32, Option<&Arc<E>>) -> bool) -> Option<usize> {
        for index in 0..NEAR {
            if self.tags[index] != 0 && matches(self.tags[index], self.near[index].as_ref()) {
                return Some(index);
            }
        }
        let far = self.far.as_ref()?;
        far.iter().position(|(tag, element)| matches(*tag, element.as_ref())).map(|index| NEAR + index)
    }

    /// The live element whose tag is `tag` and which `is_it`.
    pub(crate) fn live(&self, tag: u32, mut is_it: impl FnMut(&E) -> bool) -> Option<&Arc<E>> {
        let index = self.find(|slot_tag, element| slot_tag == tag && element.is_some_and(|e| is_it(e)))?;
        self.get(index).1
    }

    /// Replaces slot `index` with a tag and an element (none for a ghost).
    pub(crate) fn set(&mut self, index: usize, tag: u32, element: Option<Arc<E>>) {
        debug_assert_ne!(tag, 0, "a slot set is not empty");
        match index.checked_sub(NEAR) {
            None => {
                self.tags[index] = tag;
                self.near[index] = element;
            }
            Some(far) => self.far.as_mut().expect("a far slot")[far] = (tag, element),
        }
    }

    /// Puts a slot into the first empty place.
    pub(crate) fn add(&mut self, tag: u32, element: Option<Arc<E>>) {
        debug_assert_ne!(tag, 0, "a slot added is not empty");
        match self.tags.iter().position(|&slot_tag| slot_tag == 0) {
            Some(index) => {
                self.tags[index] = tag;
                self.near[index] = element;
            }
            None => self.far.get_or_insert_with(Default::default).push((tag, element)),
        }
    }

    /// Empties slot `index`: a near slot takes the last far one (or
    /// becomes empty), a far slot is removed (the last takes its place),
    /// and the far vector goes once it is empty.
    pub(crate) fn take(&mut self, index: usize) -> Option<Arc<E>> {
        let element = match index.checked_sub(NEAR) {
            None => {
                let (tag, last) = self.far.as_mut().and_then(|far| far.pop()).unwrap_or((0, None));
                self.tags[index] = tag;
                std::mem::replace(&mut self.near[index], last)
            }
            Some(far) => self.far.as_mut().expect("a far slot").swap_remove(far).1,
        };
        if self.far.as_ref().is_some_and(|far| far.is_empty()) {
            self.far = None;
        }
        element
    }

    pub(crate) fn count(&mut self, counter: usize, counters: &[AtomicU64; 4]) {
        let pending = &mut self.pending[counter];
        *pending += 1;
        if *pending == u16::MAX {
            counters[counter].fetch_add(u64::from(*pending), Ordering::Relaxed);
            *pending = 0;
        }
    }

    /// Hands the pending counts over to the shard's counters.
    pub(crate) fn hand_over(&mut self, counters: &[AtomicU64; 4]) {
        for (pending, counter) in self.pending.iter_mut().zip(counters) {
            if *pending != 0 {
                counter.fetch_add(u64::from(*pending), Ordering::Relaxed);
                *pending = 0;
            }
        }
    }

    /// Whether the far vector holds only what the near slots cannot: it is
    /// absent or non-empty, and present only while every near slot is taken.
    pub(crate) fn far_is_tidy(&self) -> bool {
        match &self.far {
            None => true,
            Some(far) => !far.is_empty() && self.tags.iter().all(|&tag| tag != 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_beyond_the_near_ones_go_far_and_come_back_empty() {
        let mut list = List::<u32>::default();
        for value in 1..=5u32 {
            list.add(tag(u64::from(value)), Some(Arc::new(value)));
        }
        assert_eq!(list.slots().count(), 5);
        let found = |list: &List<u32>, value: u32| list.live(tag(u64::from(value)), |e| *e == value).map(|e| **e);
        assert!((1..=5).all(|value| found(&list, value) == Some(value)));
        // A near slot emptied takes the last far one; far ones shrink.
        let index = list.find(|_, element| element.is_some_and(|e| **e == 2)).unwrap();
        assert_eq!(list.take(index).map(|e| *e), Some(2));
        assert_eq!(list.slots().count(), NEAR + 1, "a far slot moved into the emptied near one");
        assert!(list.far_is_tidy());
        let far = list.find(|_, element| element.is_some_and(|e| **e == 4)).unwrap();
        assert!(far >= NEAR, "4 is still far");
        list.take(far);
        assert_eq!(list.slots().count(), NEAR, "the far vector went with its last slot");
        assert!(list.far_is_tidy());
        let near = list.find(|_, element| element.is_some_and(|e| **e == 1)).unwrap();
        list.take(near);
        list.add(tag(9), None);
        assert_eq!(list.get(near), (tag(9), None), "the ghost took the emptied near slot");
        assert_eq!(found(&list, 4), None);
        assert!([1, 2, 4].iter().all(|&value| found(&list, value).is_none()));
        assert!([3, 5].iter().all(|&value| found(&list, value) == Some(value)));
    }

    #[test]
    fn pending_counts_go_over_to_the_shard_before_they_overflow() {
        let counters: [AtomicU64; 4] = Default::default();
        let mut list = List::<u32>::default();
        for _ in 0..200_000 {
            list.count(1, &counters);
        }
        let handed = counters[1].load(Ordering::Relaxed);
        assert!(handed > 0 && handed < 200_000, "some handed over on overflow, the rest pending: {handed}");
        list.hand_over(&counters);
        assert_eq!(counters[1].load(Ordering::Relaxed), 200_000);
        assert_eq!(counters[0].load(Ordering::Relaxed), 0);
    }
}
