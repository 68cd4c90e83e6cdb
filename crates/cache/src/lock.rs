//! The mutex of one bucket of the hash table: a word taken with one atomic
//! compare-and-swap and given back with a plain release store.
//!
//! A bucket is held for a few compares and a clone of one value, so a
//! thread that finds it taken spins briefly and then yields its core
//! rather than sleep. Not parking waiters is what lets the unlock be a
//! store: a mutex that parks must read, in the same atomic step that frees
//! it, whether anyone sleeps on it. With a read costing one atomic
//! instruction instead of two, a hit takes about a tenth less time on one
//! thread (bench/RESULTS.md).
//!
//! **Invariant:** `held` is true exactly while one `Guard` exists; the
//! value is reached only through that guard.

use std::cell::UnsafeCell;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_utils::Backoff;

/// Aligned to a cache line: a bucket's lock word and the slots it guards
/// (`bucket.rs`) fill one line, and no two buckets share one.
#[repr(align(64))]
pub(crate) struct BucketLock<T> {
    held: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: the value is reached by one thread at a time (see the module's
// invariant), so, as for `std::sync::Mutex<T>`, it needs only `T: Send`.
unsafe impl<T: Send> Sync for BucketLock<T> {}

impl<T: Default> Default for BucketLock<T> {
    fn default() -> Self {
        BucketLock { held: AtomicBool::new(false), value: UnsafeCell::new(T::default()) }
    }
}

impl<T> BucketLock<T> {
    pub(crate) fn lock(&self) -> Guard<'_, T> {
        if self.held.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            self.lock_contended();
        }
        Guard { lock: self, _value: PhantomData }
    }

    #[cold]
    fn lock_contended(&self) {
        let backoff = Backoff::new();
        loop {
            // Wait by reading, which keeps the word's cache line shared,
            // and try again only once it looks free.
            while self.held.load(Ordering::Relaxed) {
                backoff.snooze();
            }
            if self.held.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                return;
            }
        }
    }
}

pub(crate) struct Guard<'a, T> {
    lock: &'a BucketLock<T>,
    /// Makes a guard `Sync` only if `T` is, as `&mut T` is: shared, it
    /// hands out `&T`. (`Send` needs only `T: Send`: the unlock is a store
    /// any thread may make.)
    _value: PhantomData<&'a mut T>,
}

impl<T> Deref for Guard<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: this guard is the one holder (the module's invariant).
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for Guard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`; `&mut self` makes the borrow unique.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for Guard<'_, T> {
    fn drop(&mut self) {
        self.lock.held.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_that_take_the_lock_in_turn_lose_no_increment() {
        // Fewer under Miri, which runs a thousand times slower.
        const PER_THREAD: u64 = if cfg!(miri) { 2_000 } else { 100_000 };
        let lock = BucketLock::<u64>::default();
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..PER_THREAD {
                        // A read and a write apart: two holders at once would lose counts.
                        let mut guard = lock.lock();
                        let seen = *guard;
                        std::hint::spin_loop();
                        *guard = seen + 1;
                    }
                });
            }
        });
        assert_eq!(*lock.lock(), 4 * PER_THREAD);
    }
}
