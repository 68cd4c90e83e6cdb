//! The list of one bucket of the hash table: its live elements and ghosts.
//!
//! The first `NEAR` slots sit in the bucket itself, their tags apart from
//! their words, so the lock word, the tags, the words and the far vector's
//! pointer of a bucket fill one 64-byte line: a lookup in a bucket of up to `NEAR` entries touches
//! that line and then only the element it finds. Further slots go to a
//! vector allocated when a bucket first needs one; a near slot emptied
//! takes the last far one, so the far vector holds only what the near slots
//! cannot.
//!
//! A slot is empty (tag 0), a ghost (a tag and the position the ghost was
//! pushed at in the ghost queue: the key of that hash was evicted from the
//! small queue; the shard tells whether the ghost is still queued) or live
//! (a tag and a borrowed pointer to the element). A tag is the low 32 bits
//! of the key's hash with the lowest bit set, so it is never 0: for a live
//! slot it spares comparing the keys of most non-matching elements; for a
//! ghost it is all there is. Two hashes of one bucket that share their tag
//! (one pair in two billion) can make a key go to the main queue when it
//! would have gone to the small one, or take the other's ghost's slot: a
//! matter of hit ratio, never of a value returned.
//!
//! **Invariant:** a live slot's element stays allocated while it is listed
//! here (the cache's ownership rule, `lib.rs`): it is read only through
//! `&self` of this list, which the bucket's lock guard lends, and the
//! element's owner frees it only once it is unlisted.

use std::marker::PhantomData;
use std::ptr::{self, NonNull};
use std::sync::Arc;

/// Slots in the bucket itself. With the tables sized for about two live
/// elements per bucket and queued ghosts for two fifths as many again,
/// most buckets need no more (ghosts that left the queue take slots too,
/// until reused): with three, one bucket in eleven had a far vector in the
/// throughput bench, and its two dependent loads took a sixth of an
/// insertion's time.
pub(crate) const NEAR: usize = 4;

/// A hash's tag (see the module documentation).
pub(crate) fn tag(hash: u64) -> u32 {
    hash as u32 | 1
}

/// What goes into a slot.
pub(crate) enum Slot<E> {
    Live(NonNull<E>),
    /// A ghost, with the position it was pushed at in the ghost queue.
    Ghost(u64),
}

/// What a slot holds, as a reader sees it.
pub(crate) enum View<'a, E> {
    Empty,
    Live(&'a E),
    Ghost(u64),
}

/// A slot's word: an element's pointer (an even address), or a ghost's
/// push position shifted left with the low bit set, or null when empty.
/// The shift keeps 63 bits of the position: enough on a 64-bit target,
/// the only kind the workspace builds for.
const _: () = assert!(usize::BITS == 64, "a ghost's push position needs a 64-bit word");

fn word<E>(slot: Slot<E>) -> *mut E {
    match slot {
        Slot::Live(element) => element.as_ptr(),
        Slot::Ghost(pushed) => ptr::without_provenance_mut(((pushed as usize) << 1) | 1),
    }
}

pub(crate) struct List<E> {
    tags: [u32; NEAR],
    near: [*mut E; NEAR],
    far: Option<Box<Far<E>>>,
    /// The elements are shared between threads as an `Arc<E>` would be.
    _elements: PhantomData<Arc<E>>,
}

/// Where an insertion goes (`List::place`): slot indexes.
#[derive(Default)]
pub(crate) struct Place {
    pub(crate) live: Option<usize>,
    /// The key's ghost, and the position it was pushed at.
    pub(crate) ghost: Option<(usize, u64)>,
    /// A slot whose ghost has left the ghost queue.
    pub(crate) left: Option<usize>,
}

/// Slots past the near ones: tag and word.
type Far<E> = Vec<(u32, *mut E)>;

// SAFETY: the raw words are borrowed pointers to elements shared between
// threads (`_elements` asks of `E` what sharing needs) or plain numbers.
unsafe impl<E: Send + Sync> Send for List<E> {}

impl<E> Default for List<E> {
    fn default() -> Self {
        List { tags: [0; NEAR], near: [ptr::null_mut(); NEAR], far: None, _elements: PhantomData }
    }
}

impl<E> List<E> {
    fn view(&self, tag: u32, word: *mut E) -> View<'_, E> {
        if tag == 0 {
            View::Empty
        } else if word.addr() & 1 == 1 {
            View::Ghost((word.addr() >> 1) as u64)
        } else {
            // SAFETY: a live slot's element is allocated while listed, and
            // the `&self` borrow keeps it listed (the module's invariant).
            View::Live(unsafe { &*word })
        }
    }

    pub(crate) fn get(&self, index: usize) -> View<'_, E> {
        match index.checked_sub(NEAR) {
            None => self.view(self.tags[index], self.near[index]),
            Some(far) => {
                let (tag, word) = self.far.as_ref().expect("a far slot")[far];
                self.view(tag, word)
            }
        }
    }

    /// Every slot, empty ones included, as (tag, view): the n-th is slot
    /// index n.
    pub(crate) fn slots(&self) -> impl Iterator<Item = (u32, View<'_, E>)> {
        let near = self.tags.iter().zip(&self.near);
        let far = self.far.iter().flat_map(|far| far.iter().map(|(tag, word)| (tag, word)));
        near.chain(far).map(|(&tag, &word)| (tag, self.view(tag, word)))
    }

    /// The first slot, not empty, that `matches` (given its tag and view),
    /// in plain loops (they ran lookups about a tenth faster than
    /// `slots().position(..)` did). A lookup by tag goes through `live` or
    /// `place` instead, which skip the slots of other tags without a branch.
    pub(crate) fn find(&self, mut matches: impl FnMut(u32, View<'_, E>) -> bool) -> Option<usize> {
        for index in 0..NEAR {
            let tag = self.tags[index];
            if tag != 0 && matches(tag, self.view(tag, self.near[index])) {
                return Some(index);
            }
        }
        let far = self.far.as_ref()?;
        far.iter().position(|&(tag, word)| matches(tag, self.view(tag, word))).map(|index| NEAR + index)
    }

    /// Where an insertion of a key with `tag` goes: the key's live slot, if
    /// it has one (`is_key` says which element is the key's); else its
    /// ghost's, and that ghost's push position; else, if no near slot is
    /// empty, the first slot whose ghost `has_left` the ghost queue. Tags
    /// are compared as in `live`; a ghost whose tag a live key shares (two
    /// hashes, one tag) must not hide the live key, so a ghost found does
    /// not end the search.
    pub(crate) fn place(&self, tag: u32, mut is_key: impl FnMut(&E) -> bool, has_left: impl Fn(u64) -> bool) -> Place {
        let mut place = Place::default();
        let mut visit = |index: usize, view: View<'_, E>| {
            match view {
                View::Live(element) if is_key(element) => {
                    place.live = Some(index);
                    return true;
                }
                View::Ghost(pushed) => place.ghost = Some((index, pushed)),
                _ => {}
            }
            false
        };
        for index in self.near_matching(tag) {
            if visit(index, self.view(tag, self.near[index])) {
                return place;
            }
        }
        for (index, &(slot_tag, word)) in self.far.iter().flat_map(|far| far.iter()).enumerate() {
            if slot_tag == tag && visit(NEAR + index, self.view(slot_tag, word)) {
                return place;
            }
        }
        if place.ghost.is_none() && self.tags.iter().all(|&slot_tag| slot_tag != 0) {
            place.left = self.find(|_, view| matches!(view, View::Ghost(pushed) if has_left(pushed)));
        }
        place
    }

    /// The near slots whose tag is `tag`, found without a branch per slot
    /// (the compares make a bit mask): which slot matches, if any, is as
    /// random as the keys, so a branch per slot is mispredicted often.
    fn near_matching(&self, tag: u32) -> impl Iterator<Item = usize> {
        let slot_bit = |(index, &slot_tag): (usize, &u32)| u32::from(slot_tag == tag) << index;
        let mut matching = self.tags.iter().enumerate().map(slot_bit).fold(0, |mask, bit| mask | bit);
        std::iter::from_fn(move || {
            let index = (matching != 0).then(|| matching.trailing_zeros() as usize)?;
            matching &= matching - 1;
            Some(index)
        })
    }

    /// The live element whose tag is `tag` and which `is_it`. Every read
    /// comes here: only near slots of that tag are decoded
    /// (`near_matching`). A tag is never 0, so a match is never empty.
    pub(crate) fn live(&self, tag: u32, mut is_it: impl FnMut(&E) -> bool) -> Option<&E> {
        for index in self.near_matching(tag) {
            if let View::Live(element) = self.view(tag, self.near[index]) {
                if is_it(element) {
                    return Some(element);
                }
            }
        }
        let far = self.far.as_ref()?;
        far.iter().find_map(|&(slot_tag, word)| match self.view(slot_tag, word) {
            View::Live(element) if slot_tag == tag && is_it(element) => Some(element),
            _ => None,
        })
    }

    /// The slot that lists `element`, if any: compares addresses only.
    pub(crate) fn position_of(&self, element: NonNull<E>) -> Option<usize> {
        self.find(|_, view| matches!(view, View::Live(listed) if ptr::eq(listed, element.as_ptr())))
    }

    /// Replaces slot `index` with a tag and what it holds.
    pub(crate) fn set(&mut self, index: usize, tag: u32, slot: Slot<E>) {
        debug_assert_ne!(tag, 0, "a slot set is not empty");
        let word = word(slot);
        match index.checked_sub(NEAR) {
            None => {
                self.tags[index] = tag;
                self.near[index] = word;
            }
            Some(far) => self.far.as_mut().expect("a far slot")[far] = (tag, word),
        }
    }

    /// Puts a slot into the first empty place.
    pub(crate) fn add(&mut self, tag: u32, slot: Slot<E>) {
        debug_assert_ne!(tag, 0, "a slot added is not empty");
        let word = word(slot);
        match self.tags.iter().position(|&slot_tag| slot_tag == 0) {
            Some(index) => {
                self.tags[index] = tag;
                self.near[index] = word;
            }
            None => self.far.get_or_insert_with(Default::default).push((tag, word)),
        }
    }

    /// Empties slot `index`, unlisting what it held: a near slot takes the
    /// last far one (or becomes empty), a far slot is removed (the last
    /// takes its place), and the far vector goes once it is empty.
    pub(crate) fn take(&mut self, index: usize) {
        match index.checked_sub(NEAR) {
            None => {
                let (tag, word) = self.far.as_mut().and_then(|far| far.pop()).unwrap_or((0, ptr::null_mut()));
                self.tags[index] = tag;
                self.near[index] = word;
            }
            Some(far) => {
                self.far.as_mut().expect("a far slot").swap_remove(far);
            }
        }
        if self.far.as_ref().is_some_and(|far| far.is_empty()) {
            self.far = None;
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

    fn value(list: &List<u64>, index: usize) -> Option<u64> {
        match list.get(index) {
            View::Live(element) => Some(*element),
            _ => None,
        }
    }

    #[test]
    fn slots_beyond_the_near_ones_go_far_and_come_back_empty() {
        let elements: Vec<Box<u64>> = (0..=6).map(Box::new).collect();
        let pointer = |value: u64| NonNull::from(&*elements[value as usize]);
        let mut list = List::<u64>::default();
        for value in 1..=6 {
            list.add(tag(value), Slot::Live(pointer(value)));
        }
        assert_eq!(list.slots().count(), 6);
        let found = |list: &List<u64>, value: u64| list.live(tag(value), |e| *e == value).copied();
        assert!((1..=6).all(|value| found(&list, value) == Some(value)));
        // A near slot emptied takes the last far one; far ones shrink.
        let index = list.position_of(pointer(2)).unwrap();
        list.take(index);
        assert_eq!(list.slots().count(), NEAR + 1, "a far slot moved into the emptied near one");
        assert!(list.far_is_tidy());
        let far = list.position_of(pointer(5)).unwrap();
        assert!(far >= NEAR, "5 is still far");
        list.take(far);
        assert_eq!(list.slots().count(), NEAR, "the far vector went with its last slot");
        assert!(list.far_is_tidy());
        let near = list.position_of(pointer(1)).unwrap();
        list.take(near);
        list.add(tag(9), Slot::Ghost(77));
        assert!(matches!(list.get(near), View::Ghost(77)), "the ghost took the emptied near slot");
        assert_eq!(value(&list, near), None);
        assert!([1, 2, 5].iter().all(|&value| found(&list, value).is_none()));
        assert!([3, 4, 6].iter().all(|&value| found(&list, value) == Some(value)));
        // A ghost's push position keeps all its bits but the top one.
        list.set(near, tag(9), Slot::Ghost(u64::MAX >> 1));
        assert!(matches!(list.get(near), View::Ghost(pushed) if pushed == u64::MAX >> 1));
    }

    #[test]
    fn slots_taken_anywhere_leave_the_others_listed_however_far_they_went() {
        let elements: Vec<Box<u64>> = (0..20).map(Box::new).collect();
        let pointer = |value: u64| NonNull::from(&*elements[value as usize]);
        let mut list = List::<u64>::default();
        let mut listed: Vec<u64> = (0..14).collect();
        for &value in &listed {
            list.add(tag(value), Slot::Live(pointer(value)));
        }
        // Near, inline far and further far slots, taken in a scattered order.
        for value in [13, 0, 5, 9, 6, 1, 12, 3, 8, 2, 11, 4, 7, 10] {
            let position = list.position_of(pointer(value)).expect("still listed");
            list.take(position);
            listed.retain(|&other| other != value);
            let mut seen: Vec<u64> = list
                .slots()
                .filter_map(|(_, slot)| match slot {
                    View::Live(element) => Some(*element),
                    _ => None,
                })
                .collect();
            seen.sort_unstable();
            assert_eq!(seen, listed, "after taking {value}");
            assert_eq!(list.slots().count(), listed.len().max(NEAR), "no empty far slot left behind");
            assert!(list.far_is_tidy(), "after taking {value}");
            assert!(listed.iter().all(|&other| list.live(tag(other), |e| *e == other) == Some(&other)));
        }
        assert!(list.far.is_none());
    }
}
