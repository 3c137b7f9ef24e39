//! Token operations in flight per key: the bound that keeps concurrent requests from racing
//! past a quota. A key may have at most as many gated requests in flight as it has failures left
//! (plus [`IN_FLIGHT_ALLOWANCE`]); a request past that waits for one of them to finish, then looks
//! again. Entries exist only while a key has requests in flight, so the table is bounded by the
//! requests being served.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};

use std::pin::Pin;

use tokio::sync::Notify;
use tokio::sync::futures::OwnedNotified;

/// Requests a key may have in flight beyond its failures left. Zero: however many requests
/// race, no more of them reach the upstream at once than the key could fail; only failures
/// regained while they are in flight (one per replenish interval) let more through.
pub const IN_FLIGHT_ALLOWANCE: u32 = 0;

struct Entry {
    count: u32,
    released: Arc<Notify>,
}

/// What [`Flights::try_reserve`] did.
pub enum Reserve {
    /// One slot taken; give it back with [`Flights::release`].
    Taken,
    /// As many in flight as failures left: resolves when one of them finishes.
    Full(Pin<Box<OwnedNotified>>),
    /// No failure left at all: the quota is spent.
    NoneLeft,
}

/// In-flight counts per key of one quota.
pub struct Flights<K> {
    table: Mutex<HashMap<K, Entry>>,
}

impl<K: Hash + Eq + Clone> Flights<K> {
    /// An empty table.
    pub fn new() -> Self {
        Flights {
            table: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one in-flight slot for `key` when it has fewer than `left() + IN_FLIGHT_ALLOWANCE`
    /// in flight. `left` (the failures the key may still make) is read under this table's lock:
    /// a finished request is charged before it gives its slot back, so no request can reserve
    /// against a count that a failure has already lowered.
    pub fn try_reserve(&self, key: &K, left: impl FnOnce() -> u32) -> Reserve {
        let mut t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let limit = left().saturating_add(IN_FLIGHT_ALLOWANCE);
        match t.get_mut(key) {
            Some(e) if e.count >= limit => {
                // Registered under the lock that every release takes: no release can slip in
                // between the look and the wait.
                let mut woken = Box::pin(e.released.clone().notified_owned());
                woken.as_mut().enable();
                Reserve::Full(woken)
            }
            Some(e) => {
                e.count += 1;
                Reserve::Taken
            }
            None if limit == 0 => Reserve::NoneLeft,
            None => {
                t.insert(
                    key.clone(),
                    Entry {
                        count: 1,
                        released: Arc::new(Notify::new()),
                    },
                );
                Reserve::Taken
            }
        }
    }

    /// Gives back one slot of `key` and wakes everything waiting on it.
    pub fn release(&self, key: &K) {
        let mut t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = t.get_mut(key) {
            e.count = e.count.saturating_sub(1);
            e.released.notify_waiters();
            if e.count == 0 {
                t.remove(key);
            }
        }
    }
}

impl<K: Hash + Eq + Clone> Default for Flights<K> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn at_most_left_in_flight_and_a_release_wakes_the_waiter() {
        let f = Flights::<u8>::new();
        assert!(matches!(f.try_reserve(&1, || 2), Reserve::Taken));
        assert!(matches!(f.try_reserve(&1, || 2), Reserve::Taken));
        let Reserve::Full(woken) = f.try_reserve(&1, || 2) else {
            panic!("a third is one too many")
        };
        assert!(
            matches!(f.try_reserve(&2, || 1), Reserve::Taken),
            "other keys"
        );
        assert!(matches!(f.try_reserve(&3, || 0), Reserve::NoneLeft));
        f.release(&1);
        tokio::time::timeout(std::time::Duration::from_secs(1), woken)
            .await
            .expect("the release wakes the waiter");
        assert!(matches!(f.try_reserve(&1, || 2), Reserve::Taken));
        // Fewer failures left now: the two in flight are already too many.
        assert!(matches!(f.try_reserve(&1, || 1), Reserve::Full(_)));
        f.release(&1);
        f.release(&1);
        f.release(&2);
        assert!(
            f.table.lock().unwrap().is_empty(),
            "entries go when nothing is in flight"
        );
    }

    #[tokio::test]
    async fn a_waiter_is_woken_even_when_the_last_slot_goes_before_it_waits() {
        let f = Flights::<u8>::new();
        assert!(matches!(f.try_reserve(&1, || 1), Reserve::Taken));
        let Reserve::Full(woken) = f.try_reserve(&1, || 1) else {
            panic!()
        };
        // The holder finishes (the entry goes) and a newcomer takes the slot, all before the
        // waiter is first polled: it is still woken, by the release it registered for.
        f.release(&1);
        assert!(matches!(f.try_reserve(&1, || 1), Reserve::Taken));
        tokio::time::timeout(std::time::Duration::from_secs(1), woken)
            .await
            .expect("no wake-up is lost");
    }
}
