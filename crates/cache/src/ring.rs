//! A bounded multi-producer, multi-consumer FIFO of owned elements: one of
//! the cache's queues.
//!
//! The queue is a ring of slots and two counters, head and tail. A thread
//! claims a position by advancing a counter with one compare-and-swap, so
//! no thread ever holds a lock on the whole queue: pushers on different
//! positions, and poppers on different positions, proceed at once. Each
//! push and each pop costs that one atomic read-modify-write and no more
//! (the slot is then written with a plain store): on one thread, an insert
//! that evicts pushes and pops several times, and every atomic instruction
//! counts there (bench/RESULTS.md).
//!
//! A slot's word is the element's pointer with two low bits of state: *full*
//! and the *lap* (position divided by the ring's length) modulo 2. A slot is
//! ready for the pusher of position `p` when it is empty for `p`'s lap, and
//! for the popper of `p` when it is full for `p`'s lap; a thread looks
//! before it claims, and claims only a slot that is ready for it. One bit of
//! lap is enough: while head (or tail) still reads `p`, the slot of `p` can
//! only be a lap behind (its element not yet stored, or not yet taken) or
//! ready, never a lap ahead, and the claim itself fails if the counter
//! moved.
//!
//! **Invariant:** a slot that is full holds the one reference to its
//! element (see `Owned`): a push moves the caller's reference in, a pop
//! moves it out to the caller.

use std::marker::PhantomData;
use std::ops::Deref;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_utils::{Backoff, CachePadded};

/// The one owning reference to a heap element. It has no `Drop`: its holder
/// either passes it on (into a ring) or frees it, once nothing else can
/// reach the element (`free`'s contract).
pub(crate) struct Owned<T>(NonNull<T>);

impl<T> Owned<T> {
    pub(crate) fn new(value: T) -> Self {
        Owned(NonNull::from(Box::leak(Box::new(value))))
    }

    /// The element's address, for others to borrow while the owner lets them.
    pub(crate) fn as_ptr(&self) -> NonNull<T> {
        self.0
    }

    /// Drops the element.
    ///
    /// # Safety
    /// No other thread can reach the element any more, nor ever will.
    pub(crate) unsafe fn free(self) {
        // SAFETY: the pointer came from `Box::leak` in `new`, this is its one
        // owning reference, and per the contract no one else uses it.
        drop(unsafe { Box::from_raw(self.0.as_ptr()) });
    }
}

impl<T> Deref for Owned<T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: the owner's element is alive until the owner frees it,
        // which consumes `self`; others only ever read it through shared
        // references (its mutable parts are atomics or behind a lock).
        unsafe { self.0.as_ref() }
    }
}

/// The low bits of a slot's word.
const FULL: usize = 1;
const LAP: usize = 2;

/// The element's pointer in a full slot's word.
fn element_of<T>(word: *mut T) -> *mut T {
    word.map_addr(|addr| addr & !(FULL | LAP))
}

pub(crate) struct Ring<T> {
    slots: Box<[AtomicPtr<T>]>,
    mask: u64,
    /// log2 of the length: a position's lap is `position >> shift`.
    shift: u32,
    /// The next position to push at.
    head: CachePadded<AtomicU64>,
    /// The next position to pop from.
    tail: CachePadded<AtomicU64>,
    /// Elements go in on one thread and come out on another, and others
    /// read them meanwhile: shared as an `Arc<T>` would be.
    _elements: PhantomData<Arc<T>>,
}

impl<T> Ring<T> {
    /// A ring holding at least `capacity` elements (rounded up to a power of two).
    pub(crate) fn new(capacity: usize) -> Self {
        const { assert!(std::mem::align_of::<T>() > (FULL | LAP), "the two state bits need an aligned pointer") };
        let len = capacity.max(2).next_power_of_two();
        Ring {
            slots: (0..len).map(|_| AtomicPtr::new(ptr::null_mut())).collect(),
            mask: len as u64 - 1,
            shift: len.trailing_zeros(),
            head: CachePadded::new(AtomicU64::new(0)),
            tail: CachePadded::new(AtomicU64::new(0)),
            _elements: PhantomData,
        }
    }

    /// The lap bit of a position, as it sits in a slot's word.
    fn lap(&self, position: u64) -> usize {
        if (position >> self.shift) & 1 == 1 {
            LAP
        } else {
            0
        }
    }

    fn len(&self) -> u64 {
        self.mask + 1
    }

    fn slot(&self, position: u64) -> &AtomicPtr<T> {
        &self.slots[(position & self.mask) as usize]
    }

    /// The queued elements, oldest first. `&mut self`: no push or pop is in
    /// flight, so every claimed position holds its element.
    pub(crate) fn elements(&mut self) -> impl Iterator<Item = &T> + '_ {
        let (tail, head) = (*self.tail.get_mut(), *self.head.get_mut());
        (tail..head).filter_map(move |position| {
            let word = self.slot(position).load(Ordering::Relaxed);
            // SAFETY: a full slot holds an owning reference (the module's
            // invariant), which no one can take while `self` is borrowed.
            (word.addr() & FULL != 0).then(|| unsafe { &*element_of(word) })
        })
    }

    /// Appends `element`, or hands it back if the ring is full. A popper
    /// that has claimed the slot's previous element and not yet emptied the
    /// slot is waited for.
    pub(crate) fn push(&self, element: Owned<T>) -> Result<(), Owned<T>> {
        let backoff = Backoff::new();
        loop {
            let head = self.head.load(Ordering::Acquire);
            let lap = self.lap(head);
            let slot = self.slot(head);
            if slot.load(Ordering::Acquire).addr() == lap {
                if self.head.compare_exchange_weak(head, head + 1, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                    slot.store(element.0.as_ptr().map_addr(|addr| addr | lap | FULL), Ordering::Release);
                    self.warm_slot(head + SLOTS_PER_LINE);
                    return Ok(());
                }
            } else if self.head.load(Ordering::Acquire) == head {
                // The slot still holds the element a lap back (Acquire on
                // head makes the slot's load see at least what the pusher a
                // lap back saw). If its popper has claimed it, it is about
                // to store: wait for that. Otherwise every slot is taken.
                if self.tail.load(Ordering::Acquire) + self.len() <= head {
                    return Err(element);
                }
                backoff.snooze();
                continue;
            }
            // Another pusher took this position: retry with the next one.
            backoff.spin();
        }
    }

    /// Takes the oldest element, or `None` if the ring is empty. A pusher
    /// that has claimed the oldest position and not yet stored into it is
    /// waited for.
    pub(crate) fn pop(&self) -> Option<Owned<T>> {
        let backoff = Backoff::new();
        loop {
            let tail = self.tail.load(Ordering::Acquire);
            let lap = self.lap(tail);
            let slot = self.slot(tail);
            let word = slot.load(Ordering::Acquire);
            if word.addr() & (FULL | LAP) == lap | FULL {
                if self.tail.compare_exchange_weak(tail, tail + 1, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                    // Empty for the next lap's pusher.
                    slot.store(ptr::without_provenance_mut(lap ^ LAP), Ordering::Release);
                    self.warm(tail + 1);
                    // SAFETY: a full slot's word is an owning reference's
                    // pointer plus state bits (the module's invariant), and
                    // the claim made this thread its one taker.
                    return Some(Owned(unsafe { NonNull::new_unchecked(element_of(word)) }));
                }
            } else if self.tail.load(Ordering::Acquire) == tail {
                // Nothing at this position yet. If its pusher has claimed
                // it, it is about to store: wait for that. Otherwise the
                // ring is empty.
                if self.head.load(Ordering::Acquire) == tail {
                    return None;
                }
                backoff.snooze();
                continue;
            }
            // Another popper took this position: retry with the next one.
            backoff.spin();
        }
    }
}

/// Slots in a 64-byte cache line.
const SLOTS_PER_LINE: u64 = 8;

impl<T> Ring<T> {
    /// Asks the processor to bring the slot of `position` into its cache: a
    /// line ahead of the head, the pushes to come write there. The ring's
    /// lines are written once a lap, so without this the first push into a
    /// line waits for it (a profile of inserts alone put two thirds of a
    /// push on that load).
    #[inline]
    #[cfg_attr(not(all(target_arch = "x86_64", not(miri))), allow(unused_variables))]
    fn warm_slot(&self, position: u64) {
        #[cfg(all(target_arch = "x86_64", not(miri)))]
        // SAFETY: a prefetch is a hint: it reads nothing the program sees
        // and never faults; the address is a slot of this ring.
        unsafe {
            std::arch::x86_64::_mm_prefetch(ptr::from_ref(self.slot(position)).cast(), std::arch::x86_64::_MM_HINT_T0)
        };
    }

    /// Asks the processor to bring the element queued at `position` into
    /// its cache: the next pop takes it, and its evictor reads it at once
    /// (its hash, state and frequency), on an insertion's path. In a cache
    /// larger than the processor's, that read is a miss otherwise
    /// (bench/RESULTS.md: at 100,000 entries, one thread alone inserting
    /// ran at 0.66-0.87x quick_cache's speed without this, 0.86-1.06x with).
    #[inline]
    fn warm(&self, position: u64) {
        let word = self.slot(position).load(Ordering::Relaxed);
        if word.addr() & FULL != 0 {
            // (Miri has no use for a hint, nor knows the instruction.)
            #[cfg(all(target_arch = "x86_64", not(miri)))]
            // SAFETY: a prefetch is a hint: it reads nothing the program
            // sees and never faults, even if the element has been freed by
            // the time it runs.
            unsafe {
                std::arch::x86_64::_mm_prefetch(element_of(word).cast_const().cast(), std::arch::x86_64::_MM_HINT_T0)
            };
        }
    }
}

impl<T> Drop for Ring<T> {
    fn drop(&mut self) {
        for slot in self.slots.iter_mut() {
            let word = *slot.get_mut();
            if word.addr() & FULL != 0 {
                // SAFETY: a full slot holds an owning reference (the
                // module's invariant), and a ring being dropped is the last
                // thing that can reach its elements.
                unsafe { Owned(NonNull::new_unchecked(element_of(word))).free() };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(element: Owned<u64>) -> u64 {
        let value = *element;
        // SAFETY: the test is the element's only holder.
        unsafe { element.free() };
        value
    }

    #[test]
    fn a_ring_is_first_in_first_out_and_refuses_a_push_when_full() {
        let ring = Ring::new(4);
        for value in 0..4 {
            assert!(ring.push(Owned::new(value)).is_ok(), "room");
        }
        let refused = ring.push(Owned::new(9)).expect_err("full");
        assert_eq!(value(refused), 9);
        for expected in 0..4 {
            assert_eq!(value(ring.pop().expect("an element")), expected);
        }
        assert!(ring.pop().is_none());
        // Wraps around: positions keep growing, slots are reused, and the
        // lap bit tells this lap's elements from the last one's.
        for lap in 0..10 {
            assert!(ring.push(Owned::new(lap)).is_ok(), "room");
            assert!(ring.push(Owned::new(lap + 100)).is_ok(), "room");
            assert_eq!(value(ring.pop().expect("an element")), lap);
            assert_eq!(value(ring.pop().expect("an element")), lap + 100);
        }
        // What is left when the ring goes is freed with it (Miri checks).
        assert!(ring.push(Owned::new(7)).is_ok());
    }

    #[test]
    fn concurrent_pushers_and_poppers_lose_and_duplicate_nothing() {
        let per_thread: u64 = if cfg!(miri) { 200 } else { 20_000 };
        let ring = Ring::new(64);
        let popped = std::thread::scope(|scope| {
            for thread in 0..2u64 {
                let ring = &ring;
                scope.spawn(move || {
                    for index in 0..per_thread {
                        let mut element = Owned::new(thread * per_thread + index);
                        while let Err(back) = ring.push(element) {
                            element = back;
                            std::thread::yield_now();
                        }
                    }
                });
            }
            let poppers: Vec<_> = (0..2)
                .map(|_| {
                    let ring = &ring;
                    scope.spawn(move || {
                        let mut seen = Vec::new();
                        while seen.len() < per_thread as usize {
                            match ring.pop() {
                                Some(element) => seen.push(value(element)),
                                None => std::thread::yield_now(),
                            }
                        }
                        seen
                    })
                })
                .collect();
            poppers.into_iter().flat_map(|popper| popper.join().expect("popper")).collect::<Vec<_>>()
        });
        let mut sorted = popped;
        sorted.sort_unstable();
        assert_eq!(sorted, (0..2 * per_thread).collect::<Vec<_>>());
        assert!(ring.pop().is_none());
    }
}
