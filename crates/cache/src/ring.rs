//! A bounded multi-producer, multi-consumer FIFO of `Arc`s: one of the
//! cache's three queues.
//!
//! The queue is a ring of slots and two counters. A thread claims a
//! position by advancing a counter with one compare-and-swap, so no thread
//! ever holds a lock on the whole queue: pushers on different positions,
//! and poppers on different positions, proceed at once.
//!
//! **Invariant:** `tail <= head` and `head - tail <= slots.len()`. Every
//! position in `tail..head` has been claimed by a pusher, who stores its
//! element there (perhaps a moment later); every position below `tail` has
//! been claimed by a popper, who takes the element out (perhaps a moment
//! later). A slot is therefore either empty or owned by exactly one element.

use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_utils::{Backoff, CachePadded};

pub(crate) struct Ring<T> {
    slots: Box<[AtomicPtr<T>]>,
    mask: u64,
    /// The next position to push at.
    head: CachePadded<AtomicU64>,
    /// The next position to pop from.
    tail: CachePadded<AtomicU64>,
}

impl<T> Ring<T> {
    /// A ring holding at least `capacity` elements (rounded up to a power of two).
    pub(crate) fn new(capacity: usize) -> Self {
        let len = capacity.max(2).next_power_of_two();
        Ring {
            slots: (0..len).map(|_| AtomicPtr::new(ptr::null_mut())).collect(),
            mask: len as u64 - 1,
            head: CachePadded::new(AtomicU64::new(0)),
            tail: CachePadded::new(AtomicU64::new(0)),
        }
    }

    /// The queued elements, oldest first. `&mut self`: no push or pop is in
    /// flight, so every claimed position holds its element.
    pub(crate) fn elements(&mut self) -> impl Iterator<Item = &T> + '_ {
        let (tail, head) = (*self.tail.get_mut(), *self.head.get_mut());
        let (slots, mask) = (&self.slots, self.mask);
        (tail..head).filter_map(move |position| {
            let raw = slots[(position & mask) as usize].load(Ordering::Relaxed);
            // SAFETY: a non-null slot holds a reference count taken by
            // `Arc::into_raw`, which only `take` or `drop` gives back, and
            // neither can run while `self` is borrowed.
            (!raw.is_null()).then(|| unsafe { &*raw })
        })
    }

    /// Appends `element`, or hands it back if the ring is full.
    pub(crate) fn push(&self, element: Arc<T>) -> Result<(), Arc<T>> {
        let backoff = Backoff::new();
        loop {
            // Tail first, then head: head can only have grown since, so the
            // difference never underflows; it may overstate the fill, which
            // at worst refuses a push that a moment later would fit.
            let tail = self.tail.load(Ordering::Acquire);
            let head = self.head.load(Ordering::Acquire);
            if head - tail >= self.slots.len() as u64 {
                return Err(element);
            }
            if self.head.compare_exchange_weak(head, head + 1, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                self.store(head, element);
                return Ok(());
            }
            // Another pusher took this position: retry with the next one.
            backoff.spin();
        }
    }

    /// Takes the oldest element, or `None` if the ring is empty.
    pub(crate) fn pop(&self) -> Option<Arc<T>> {
        let backoff = Backoff::new();
        loop {
            let tail = self.tail.load(Ordering::Acquire);
            let head = self.head.load(Ordering::Acquire);
            if tail == head {
                return None;
            }
            if self.tail.compare_exchange_weak(tail, tail + 1, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                return Some(self.take(tail));
            }
            // Another popper took this position: retry with the next one.
            backoff.spin();
        }
    }

    /// Stores into a claimed position. The slot's previous occupant (one lap
    /// earlier) was claimed by a popper, who may not have taken it out yet:
    /// wait for it to.
    fn store(&self, position: u64, element: Arc<T>) {
        let slot = &self.slots[(position & self.mask) as usize];
        let raw = Arc::into_raw(element).cast_mut();
        let backoff = Backoff::new();
        while slot.compare_exchange_weak(ptr::null_mut(), raw, Ordering::Release, Ordering::Relaxed).is_err() {
            backoff.snooze();
        }
    }

    /// Takes from a claimed position, waiting for its pusher to store into it.
    ///
    /// A popper one lap later can, rarely, swap out this slot's element
    /// before this popper does (its pusher then refills the slot): the two
    /// poppers then exchange elements. Nothing is lost or duplicated; only
    /// the order of those two elements differs.
    fn take(&self, position: u64) -> Arc<T> {
        let slot = &self.slots[(position & self.mask) as usize];
        let backoff = Backoff::new();
        loop {
            let raw = slot.swap(ptr::null_mut(), Ordering::Acquire);
            if !raw.is_null() {
                // SAFETY: every non-null slot value came from `Arc::into_raw`
                // in `store`, and the swap above made this thread its only
                // holder, so the reference count it stands for moves here.
                return unsafe { Arc::from_raw(raw) };
            }
            backoff.snooze();
        }
    }
}

impl<T> Drop for Ring<T> {
    fn drop(&mut self) {
        for slot in self.slots.iter() {
            let raw = slot.swap(ptr::null_mut(), Ordering::Acquire);
            if !raw.is_null() {
                // SAFETY: as in `take`; `&mut self` means no thread is mid-push or mid-pop.
                drop(unsafe { Arc::from_raw(raw) });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_is_first_in_first_out_and_refuses_a_push_when_full() {
        let ring = Ring::new(4);
        for value in 0..4 {
            ring.push(Arc::new(value)).expect("room");
        }
        assert_eq!(*ring.push(Arc::new(9)).expect_err("full"), 9);
        for value in 0..4 {
            assert_eq!(*ring.pop().expect("an element"), value);
        }
        assert!(ring.pop().is_none());
        // Wraps around: positions keep growing, slots are reused.
        for lap in 0..10 {
            ring.push(Arc::new(lap)).expect("room");
            assert_eq!(*ring.pop().expect("an element"), lap);
        }
    }

    #[test]
    fn concurrent_pushers_and_poppers_lose_and_duplicate_nothing() {
        const PER_THREAD: u64 = 20_000;
        let ring = Arc::new(Ring::new(64));
        let popped = std::thread::scope(|scope| {
            for thread in 0..2u64 {
                let ring = &ring;
                scope.spawn(move || {
                    for index in 0..PER_THREAD {
                        let mut element = Arc::new(thread * PER_THREAD + index);
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
                        while seen.len() < PER_THREAD as usize {
                            match ring.pop() {
                                Some(element) => seen.push(*element),
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
        assert_eq!(sorted, (0..2 * PER_THREAD).collect::<Vec<_>>());
        assert!(ring.pop().is_none());
    }
}
