//! Token operations in flight per key: the bound that keeps concurrent requests from racing
//! past a quota. A key may have at most as many gated requests in flight as it has failures left
//! (plus [`IN_FLIGHT_ALLOWANCE`]); a request past that waits for one of them to finish, then looks
//! again. Entries exist only while a key has requests in flight, so the table is bounded by the
//! requests being served.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

/// Requests a key may have in flight beyond its failures left. Zero: however many requests
/// race, no more of them reach the upstream at once than the key could fail; only failures
/// regained while they are in flight (one per replenish interval) let more through.
pub const IN_FLIGHT_ALLOWANCE: u32 = 0;

struct Entry {
    count: u32,
    released: Arc<Notify>,
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
    /// in flight; otherwise returns what to wait on: it is notified when any of the key's
    /// requests finishes. `left` (the failures the key may still make) is read under this
    /// table's lock: a finished request is charged before it gives its slot back, so no request
    /// can reserve against a count that a failure has already lowered.
    pub fn try_reserve(&self, key: &K, left: impl FnOnce() -> u32) -> Result<(), Arc<Notify>> {
        let mut t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let limit = left().saturating_add(IN_FLIGHT_ALLOWANCE);
        match t.get_mut(key) {
            Some(e) if e.count >= limit => Err(e.released.clone()),
            Some(e) => {
                e.count += 1;
                Ok(())
            }
            None if limit == 0 => Err(Arc::new(Notify::new())),
            None => {
                t.insert(
                    key.clone(),
                    Entry {
                        count: 1,
                        released: Arc::new(Notify::new()),
                    },
                );
                Ok(())
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
        assert!(f.try_reserve(&1, || 2).is_ok());
        assert!(f.try_reserve(&1, || 2).is_ok());
        let notify = f.try_reserve(&1, || 2).unwrap_err();
        let woken = notify.notified_owned();
        tokio::pin!(woken);
        woken.as_mut().enable();
        assert!(
            f.try_reserve(&2, || 1).is_ok(),
            "other keys are not affected"
        );
        f.release(&1);
        tokio::time::timeout(std::time::Duration::from_secs(1), woken)
            .await
            .expect("the release wakes the waiter");
        assert!(f.try_reserve(&1, || 2).is_ok());
        // Fewer failures left now: the two in flight are already too many.
        assert!(f.try_reserve(&1, || 1).is_err());
        f.release(&1);
        f.release(&1);
        f.release(&2);
        assert!(
            f.table.lock().unwrap().is_empty(),
            "entries go when nothing is in flight"
        );
    }
}
