//! One GCRA quota over a keyed table, on governor's keyed rate limiter: a non-charging peek (how
//! many failures a key may still make, or how long until it may fail again), a charge after the
//! fact, and housekeeping. The only user of governor.
//!
//! governor has no non-consuming check (boinkor-net/governor #15), so one DashMap state store is
//! shared by two limiters: `charge` updates it, `probe` runs the same GCRA test through a view
//! that writes the previous state back. A failure charged past a spent quota is kept as debt
//! (the key's theoretical arrival time moves one more interval), so a key never fails faster
//! than its quota over time. The table holds at most `max_keys` keys; a key that fails while it
//! is full is not tracked (and counted as such): it is never put in a bucket shared with others,
//! so no caller can spend another's quota by filling the table.

use std::hash::Hash;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use governor::clock::{Clock, Reference};
use governor::middleware::{NoOpMiddleware, StateInformationMiddleware};
use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::{Quota, RateLimiter};

/// The gateway's time source: the monotonic clock (for quotas) and the wall clock (for
/// brownout windows), or manual ones that tests advance together.
#[derive(Debug, Clone)]
pub struct LimiterClock {
    epoch: Instant,
    manual: Option<Arc<AtomicU64>>,
    /// The wall-clock time a manual clock starts at.
    wall_epoch: SystemTime,
}

impl LimiterClock {
    /// The monotonic clock.
    pub fn monotonic() -> Self {
        LimiterClock {
            epoch: Instant::now(),
            manual: None,
            wall_epoch: SystemTime::now(),
        }
    }

    /// A clock that stands still until [`LimiterClock::advance`] is called.
    pub fn manual() -> Self {
        Self::manual_at(SystemTime::now())
    }

    /// A manual clock whose wall-clock time starts at `wall`.
    pub fn manual_at(wall: SystemTime) -> Self {
        LimiterClock {
            epoch: Instant::now(),
            manual: Some(Arc::new(AtomicU64::new(0))),
            wall_epoch: wall,
        }
    }

    /// The wall-clock time now: the system's, or a manual clock's start plus its advances.
    pub fn wall_now(&self) -> SystemTime {
        match &self.manual {
            Some(m) => self.wall_epoch + Duration::from_nanos(m.load(Ordering::SeqCst)),
            None => SystemTime::now(),
        }
    }

    /// Moves a manual clock forward by `by`; no effect on the monotonic clock.
    pub fn advance(&self, by: Duration) {
        if let Some(m) = &self.manual {
            let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
            m.fetch_add(nanos, Ordering::SeqCst);
        }
    }
}

impl Clock for LimiterClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        match &self.manual {
            Some(m) => Nanos::from(m.load(Ordering::SeqCst)),
            None => Nanos::from(self.epoch.elapsed()),
        }
    }
}

type Store<K> = DashMapStateStore<K>;

/// The state store the charging limiter writes. The store keeps theoretical arrival times
/// counted from the quota's first limiter's start; a limiter built later (a quota changed by a
/// reload) counts from its own start, `offset` later, and each value is moved by that much on
/// its way in and out, so the keys' state carries over to the new quota unchanged.
struct Shared<K: Hash + Eq + Clone> {
    store: Arc<Store<K>>,
    offset: Nanos,
}

/// A stored arrival time as seen by a limiter started `offset` after the store's origin (one
/// already in that limiter's past reads as its start: no less spent, as GCRA sees it).
fn to_limiter(stored: Nanos, offset: Nanos) -> Nanos {
    stored.saturating_sub(offset)
}

impl<K: Hash + Eq + Clone> StateStore for Shared<K> {
    type Key = K;

    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let offset = self.offset;
        self.store.measure_and_replace(key, |prev| {
            f(prev.map(|p| to_limiter(p, offset))).map(|(t, tat)| (t, tat + offset))
        })
    }
}

impl<K: Hash + Eq + Clone> ShrinkableKeyedStateStore<K> for Shared<K> {
    fn retain_recent(&self, drop_below: Nanos) {
        ShrinkableKeyedStateStore::retain_recent(&*self.store, drop_below + self.offset);
    }

    fn shrink_to_fit(&self) {
        ShrinkableKeyedStateStore::shrink_to_fit(&*self.store);
    }

    fn len(&self) -> usize {
        self.store.len()
    }

    fn is_empty(&self) -> bool {
        self.store.is_empty()
    }
}

/// A read-only view of the same store: the GCRA test runs, but the previous state is written
/// back, and an absent key is never inserted. Arrival times are moved by `offset` as in
/// [`Shared`].
struct Probe<K: Hash + Eq + Clone> {
    store: Arc<Store<K>>,
    offset: Nanos,
}

impl<K: Hash + Eq + Clone> StateStore for Probe<K> {
    type Key = K;

    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        if !self.store.contains_key(key) {
            return f(None).map(|(t, _)| t);
        }
        let offset = self.offset;
        self.store.measure_and_replace(key, |prev| {
            f(prev.map(|p| to_limiter(p, offset))).map(|(t, _)| (t, prev.unwrap_or_default()))
        })
    }
}

/// What a key may do now, by [`Gcra::peek`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peek {
    /// The key may fail this many more times back to back (at least 1).
    Left(u32),
    /// The quota is spent: the time until the key may fail again.
    Spent(Duration),
}

/// What [`Gcra::charge`] did with one failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charged {
    /// Recorded; the key may still fail.
    Recorded,
    /// Recorded, and the quota is now spent.
    Spent,
    /// Not recorded: the table was full and the key not yet in it.
    Untracked,
}

/// One quota (a burst, then one failure per replenish interval) over a bounded keyed table.
pub struct Gcra<K: Hash + Eq + Clone> {
    store: Arc<Store<K>>,
    /// The clock reading the limiters count from (taken just before they were built; with the
    /// monotonic clock it may precede theirs by nanoseconds, which only makes debt stricter).
    start: Nanos,
    /// One replenish interval.
    period: Nanos,
    charge: RateLimiter<K, Shared<K>, LimiterClock, NoOpMiddleware<Nanos>>,
    probe: RateLimiter<K, Probe<K>, LimiterClock, StateInformationMiddleware>,
    max_keys: usize,
    clock: LimiterClock,
}

impl<K: Hash + Eq + Clone> Gcra<K> {
    /// A quota of `burst` failures back to back, then one per `replenish`, for at most
    /// `max_keys` keys. A zero `burst` or `replenish` (which config validation rejects) is
    /// taken as 1 failure or 1 second.
    pub fn new(burst: u32, replenish: Duration, max_keys: usize, clock: &LimiterClock) -> Self {
        let store: Arc<Store<K>> = Arc::new(Store::default());
        Self::over(store, clock.now(), burst, replenish, max_keys, clock)
    }

    /// The same keys, with their state as it is, under another quota: what a reload that
    /// changed `burst` or `replenish` builds. A key's theoretical arrival time carries over, so
    /// a spent key is not refilled; the new burst and interval apply to it from now on. The
    /// two share one table: failures charged through either are seen by both.
    pub fn requota(&self, burst: u32, replenish: Duration, max_keys: usize) -> Self {
        Self::over(
            self.store.clone(),
            self.start,
            burst,
            replenish,
            max_keys,
            &self.clock,
        )
    }

    fn over(
        store: Arc<Store<K>>,
        start: Nanos,
        burst: u32,
        replenish: Duration,
        max_keys: usize,
        clock: &LimiterClock,
    ) -> Self {
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(replenish)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst);
        // governor counts from the clock reading taken when each limiter is built; this one is
        // taken just before, so the offset may be short by nanoseconds (reads a few nanoseconds
        // stricter, writes as many more lenient: nothing a quota in seconds can tell).
        let offset = clock.now().saturating_sub(start);
        Gcra {
            start,
            period: Nanos::from(replenish),
            charge: RateLimiter::new(
                quota,
                Shared {
                    store: store.clone(),
                    offset,
                },
                clock.clone(),
            ),
            probe: RateLimiter::<K, Probe<K>, LimiterClock, NoOpMiddleware<Nanos>>::new(
                quota,
                Probe {
                    store: store.clone(),
                    offset,
                },
                clock.clone(),
            )
            .with_middleware::<StateInformationMiddleware>(),
            store,
            max_keys,
            clock: clock.clone(),
        }
    }

    /// How many more failures `key` may make now, or how long until it may fail again; never
    /// charges and never inserts.
    pub fn peek(&self, key: &K) -> Peek {
        match self.probe.check_key(key) {
            // The snapshot counts the cells left after the probed one.
            Ok(snapshot) => Peek::Left(snapshot.remaining_burst_capacity().saturating_add(1)),
            Err(not_until) => Peek::Spent(not_until.wait_time_from(self.clock.now())),
        }
    }

    /// Charges one failure to `key`. A failure past a spent quota (one that raced past the gate
    /// among concurrent ones) is kept as debt: one more interval before the key recovers.
    pub fn charge(&self, key: &K) -> Charged {
        if !self.store.contains_key(key) && self.store.len() >= self.max_keys {
            return Charged::Untracked;
        }
        if self.charge.check_key(key).is_err() {
            let now = self.clock.now().duration_since(self.start);
            let period = self.period;
            let _ = self.store.measure_and_replace(key, |tat| {
                let tat = tat.unwrap_or(now).max(now);
                Ok::<_, std::convert::Infallible>(((), tat + period))
            });
        }
        match self.peek(key) {
            Peek::Left(_) => Charged::Recorded,
            Peek::Spent(_) => Charged::Spent,
        }
    }

    /// Drops keys that have fully recovered, releases their memory, and returns how many
    /// remain.
    pub fn housekeep(&self) -> usize {
        self.charge.retain_recent();
        self.charge.shrink_to_fit();
        self.charge.len()
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.store.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gcra(burst: u32, secs: u64, max_keys: usize) -> (Gcra<u32>, LimiterClock) {
        let clock = LimiterClock::manual();
        (
            Gcra::new(burst, Duration::from_secs(secs), max_keys, &clock),
            clock,
        )
    }

    #[test]
    fn exactly_burst_failures_then_spent_with_the_wait() {
        let (g, _clock) = gcra(10, 6, 100);
        for i in 0..10u32 {
            assert_eq!(g.peek(&1), Peek::Left(10 - i), "before failure {i}");
            let want = if i == 9 {
                Charged::Spent
            } else {
                Charged::Recorded
            };
            assert_eq!(g.charge(&1), want);
        }
        // Peeking never charges: still exactly one interval to wait.
        for _ in 0..100 {
            assert_eq!(g.peek(&1), Peek::Spent(Duration::from_secs(6)));
        }
        assert_eq!(g.peek(&2), Peek::Left(10), "other keys are unaffected");
    }

    #[test]
    fn failures_past_a_spent_quota_are_kept_as_debt() {
        let (g, clock) = gcra(3, 60, 100);
        for _ in 0..30 {
            g.charge(&1);
        }
        // 3 within the burst; 27 over it, each one more interval on top of the spent wait.
        assert_eq!(g.peek(&1), Peek::Spent(Duration::from_secs(28 * 60)));
        clock.advance(Duration::from_secs(28 * 60));
        assert_eq!(g.peek(&1), Peek::Left(1));
    }

    #[test]
    fn recovers_one_failure_per_interval() {
        let (g, clock) = gcra(10, 6, 100);
        for _ in 0..10 {
            g.charge(&1);
        }
        clock.advance(Duration::from_millis(5_500));
        assert_eq!(g.peek(&1), Peek::Spent(Duration::from_millis(500)));
        clock.advance(Duration::from_millis(500));
        assert_eq!(g.peek(&1), Peek::Left(1));
        clock.advance(Duration::from_secs(6 * 9));
        assert_eq!(g.peek(&1), Peek::Left(10));
    }

    #[test]
    fn a_full_table_tracks_no_new_key_and_keeps_the_old_ones() {
        let (g, _clock) = gcra(1, 60, 1000);
        for k in 0..1_000_000u32 {
            g.charge(&k);
        }
        assert_eq!(g.len(), 1000);
        assert_eq!(g.charge(&5_000_000), Charged::Untracked);
        // An untracked key is not limited: nothing it did was recorded, and it shares no bucket.
        assert_eq!(g.peek(&5_000_000), Peek::Left(1));
        // A key tracked before the table filled keeps its own state.
        assert!(matches!(g.peek(&0), Peek::Spent(_)));
    }

    #[test]
    fn a_new_quota_keeps_each_keys_state() {
        let (g, clock) = gcra(10, 6, 1000);
        for _ in 0..10 {
            g.charge(&1);
        }
        g.charge(&2);
        clock.advance(Duration::from_secs(3));
        // Tighter: the key that spent 10 is 5 over the new burst of 5 and waits for them too:
        // its arrival time (60 s) less 4 intervals of tolerance, from now (3 s): 33 s.
        let tighter = g.requota(5, Duration::from_secs(6), 1000);
        assert_eq!(tighter.peek(&1), Peek::Spent(Duration::from_secs(33)));
        // Key 2 failed once and recovered half an interval: 5 - 1 left under the new burst.
        assert_eq!(tighter.peek(&2), Peek::Left(4));
        assert_eq!(
            tighter.peek(&3),
            Peek::Left(5),
            "an unknown key gets the new burst"
        );
        // Looser: nothing is refilled, the larger burst adds room on top of what is used.
        clock.advance(Duration::from_secs(3));
        let looser = tighter.requota(20, Duration::from_secs(6), 1000);
        assert_eq!(looser.peek(&1), Peek::Left(11));
        // Both views share one table: a charge through the new one is seen by the old.
        looser.charge(&3);
        assert_eq!(g.peek(&3), Peek::Left(9));
        assert_eq!(g.len(), 3);
        // Housekeeping through the new one counts from the same origin: at 36 s the keys that
        // recovered long ago go, key 1 (arrival time 60 s) stays with its state.
        clock.advance(Duration::from_secs(30));
        assert_eq!(looser.housekeep(), 1);
        assert_eq!(looser.peek(&1), Peek::Left(16));
    }

    #[test]
    fn housekeeping_drops_recovered_keys_only() {
        let (g, clock) = gcra(10, 6, 1000);
        for k in 0..100u32 {
            g.charge(&k);
        }
        for _ in 0..10 {
            g.charge(&1000);
        }
        assert_eq!(g.len(), 101);
        // One-failure keys recover after one interval; governor keeps one more interval of
        // slack before dropping them. Key 1000 (ten failures) is far from recovered.
        clock.advance(Duration::from_secs(6));
        assert_eq!(g.housekeep(), 101);
        clock.advance(Duration::from_millis(6_001));
        assert_eq!(g.housekeep(), 1);
        // Its state survived: it has regained two failures, not a fresh burst of ten.
        assert_eq!(g.peek(&1000), Peek::Left(2));
    }
}
