//! Limits failed token operations (guessed tokens or client secrets) with GCRA quotas from
//! governor's keyed rate limiter, one per key kind: the client_id of the call and the client IP.
//! Failures are charged after the upstream answered; a key whose quota is spent gets 429 for
//! every token operation until it recovers. Successful calls are never charged.
//!
//! governor has no non-consuming check, so each key kind keeps one DashMap state store shared by
//! two limiters: `charge` updates it, `probe` runs the same GCRA test over a view that writes the
//! previous state back, so a check never costs a cell. Concurrent guesses can all pass the gate
//! before the first is charged; a failure past a spent quota is therefore kept as debt (the
//! key's theoretical arrival time moves one interval further), so over time a key never fails
//! more often than its quota allows, while successful calls are never held back. Memory is
//! bounded: at most
//! `max_tracked_keys` keys per kind, new keys past that share one overflow bucket, and
//! `housekeep` drops keys that have fully recovered. The only user of governor and ipnet.

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use governor::clock::{Clock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::{Quota, RateLimiter};
use http::HeaderMap;
use ipnet::IpNet;

use crate::config::FailedChecksConfig;

/// The kind of key a failure is charged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// The client_id from the request path.
    ClientId,
    /// The client's IP address (the peer, or `X-Forwarded-For` behind a trusted proxy).
    ClientIp,
}

impl KeyKind {
    /// The kind's name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::ClientId => "client_id",
            KeyKind::ClientIp => "client_ip",
        }
    }
}

/// A spent quota: which key kind, and how long until one more failure is allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocked {
    /// The key kind whose quota is spent (the one with the longer wait when both are).
    pub kind: KeyKind,
    /// Time until the key may fail again.
    pub retry_after: Duration,
}

impl Blocked {
    /// `Retry-After` in whole seconds, rounded up and at least 1 (RFC 9110 §10.2.3).
    pub fn retry_after_secs(&self) -> u64 {
        let d = self.retry_after;
        (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
    }
}

/// The limiter's time source: the monotonic clock, or a manual one that tests advance.
#[derive(Debug, Clone)]
pub struct LimiterClock {
    epoch: Instant,
    manual: Option<Arc<AtomicU64>>,
}

impl LimiterClock {
    /// The monotonic clock.
    pub fn monotonic() -> Self {
        LimiterClock {
            epoch: Instant::now(),
            manual: None,
        }
    }

    /// A clock that stands still until [`LimiterClock::advance`] is called.
    pub fn manual() -> Self {
        LimiterClock {
            epoch: Instant::now(),
            manual: Some(Arc::new(AtomicU64::new(0))),
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

/// A key in a limiter's table; `Overflow` is the bucket new keys share once the table is full.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Slot<K> {
    Key(K),
    Overflow,
}

type Store<K> = DashMapStateStore<Slot<K>>;

/// The state store the charging limiter writes.
struct Shared<K: Hash + Eq + Clone>(Arc<Store<K>>);

impl<K: Hash + Eq + Clone> StateStore for Shared<K> {
    type Key = Slot<K>;

    fn measure_and_replace<T, F, E>(&self, key: &Self::Key, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        self.0.measure_and_replace(key, f)
    }
}

impl<K: Hash + Eq + Clone> ShrinkableKeyedStateStore<Slot<K>> for Shared<K> {
    fn retain_recent(&self, drop_below: Nanos) {
        ShrinkableKeyedStateStore::retain_recent(&*self.0, drop_below);
    }

    fn shrink_to_fit(&self) {
        ShrinkableKeyedStateStore::shrink_to_fit(&*self.0);
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A read-only view of the same store: the GCRA test runs, but the previous state is written
/// back, and an absent key is never inserted.
struct Probe<K: Hash + Eq + Clone>(Arc<Store<K>>);

impl<K: Hash + Eq + Clone> StateStore for Probe<K> {
    type Key = Slot<K>;

    fn measure_and_replace<T, F, E>(&self, key: &Self::Key, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        if !self.0.contains_key(key) {
            return f(None).map(|(t, _)| t);
        }
        self.0.measure_and_replace(key, |prev| {
            f(prev).map(|(t, _)| (t, prev.unwrap_or_default()))
        })
    }
}

/// One key kind: the shared table, its charging and probing limiters, and the cap.
struct KeyedLimiter<K: Hash + Eq + Clone> {
    store: Arc<Store<K>>,
    /// The clock reading the limiters count from (taken just before they were built; with the
    /// monotonic clock it may precede theirs by nanoseconds, which only makes debt stricter).
    start: Nanos,
    /// One replenish interval.
    period: Nanos,
    charge: RateLimiter<Slot<K>, Shared<K>, LimiterClock, NoOpMiddleware<Nanos>>,
    probe: RateLimiter<Slot<K>, Probe<K>, LimiterClock, NoOpMiddleware<Nanos>>,
    max_keys: usize,
    clock: LimiterClock,
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    fn new(burst: u32, replenish: Duration, max_keys: usize, clock: &LimiterClock) -> Self {
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        // with_period is None only for a zero period, which config validation rejects.
        let quota = Quota::with_period(replenish)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst);
        let store: Arc<Store<K>> = Arc::new(Store::default());
        let start = clock.now();
        KeyedLimiter {
            start,
            period: Nanos::from(replenish),
            charge: RateLimiter::new(quota, Shared(store.clone()), clock.clone()),
            probe: RateLimiter::new(quota, Probe(store.clone()), clock.clone()),
            store,
            max_keys,
            clock: clock.clone(),
        }
    }

    /// The slot a key is counted in: its own while tracked or while there is room (one entry
    /// stays reserved for the overflow bucket), else the shared overflow bucket.
    fn slot(&self, key: K) -> Slot<K> {
        let slot = Slot::Key(key);
        if self.store.contains_key(&slot) || self.store.len() < self.max_keys.saturating_sub(1) {
            slot
        } else {
            Slot::Overflow
        }
    }

    /// Time until `key` may fail again, when its quota is spent; never charges.
    fn blocked(&self, key: K) -> Option<Duration> {
        let slot = Slot::Key(key);
        let slot = if self.store.contains_key(&slot) {
            slot
        } else if self.store.len() >= self.max_keys.saturating_sub(1) {
            Slot::Overflow
        } else {
            return None; // never failed, and room to track it: nothing spent
        };
        self.probe
            .check_key(&slot)
            .err()
            .map(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Charges one failure; returns whether the quota is now spent.
    fn charge(&self, key: K) -> bool {
        let slot = self.slot(key);
        if self.charge.check_key(&slot).is_err() {
            // The quota was already spent: a failure that raced past the gate, among
            // concurrent ones. Keep it as debt: one more interval before the key recovers.
            let now = self.clock.now().duration_since(self.start);
            let period = self.period;
            let _ = self.store.measure_and_replace(&slot, |tat| {
                let tat = tat.unwrap_or(now).max(now);
                Ok::<_, std::convert::Infallible>(((), tat + period))
            });
        }
        self.probe.check_key(&slot).is_err()
    }

    /// Drops recovered keys and returns how many remain.
    fn housekeep(&self) -> usize {
        self.charge.retain_recent();
        self.charge.shrink_to_fit();
        self.charge.len()
    }

    fn len(&self) -> usize {
        self.store.len()
    }
}

/// The failed-check limiter of the whole gateway.
pub struct FailedChecks {
    client_id: KeyedLimiter<Box<str>>,
    client_ip: KeyedLimiter<IpAddr>,
    trusted_proxies: Vec<IpNet>,
}

impl std::fmt::Debug for FailedChecks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailedChecks")
            .field("tracked_client_ids", &self.client_id.len())
            .field("tracked_client_ips", &self.client_ip.len())
            .finish_non_exhaustive()
    }
}

impl FailedChecks {
    /// Builds the limiter from `[failed_checks]`, on `clock`.
    pub fn new(cfg: &FailedChecksConfig, clock: LimiterClock) -> Self {
        FailedChecks {
            client_id: KeyedLimiter::new(
                cfg.client_id_burst,
                cfg.client_id_replenish,
                cfg.max_tracked_keys,
                &clock,
            ),
            client_ip: KeyedLimiter::new(
                cfg.client_ip_burst,
                cfg.client_ip_replenish,
                cfg.max_tracked_keys,
                &clock,
            ),
            trusted_proxies: cfg.trusted_proxies.clone(),
        }
    }

    /// The client IP to key on: the peer; or, when the peer is a trusted proxy, the rightmost
    /// `X-Forwarded-For` entry that is not itself a trusted proxy (entries left of it were
    /// written by the client and prove nothing). An unparsable entry stops the walk at the last
    /// trusted hop.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.is_trusted(peer) {
            return peer;
        }
        let mut client = peer;
        let hops = headers
            .get_all("x-forwarded-for")
            .iter()
            .rev()
            .flat_map(|v| v.to_str().unwrap_or("").rsplit(','));
        for hop in hops {
            let Some(ip) = parse_hop(hop.trim()) else {
                break;
            };
            client = ip;
            if !self.is_trusted(ip) {
                break;
            }
        }
        client
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&ip))
    }

    /// Whether a token operation from these keys must be answered 429; never charges. When
    /// both quotas are spent, the one with the longer wait is reported.
    pub fn check(&self, client_id: Option<&str>, client_ip: IpAddr) -> Option<Blocked> {
        let by_id = client_id.and_then(|id| self.client_id.blocked(Box::from(id)));
        let by_ip = self.client_ip.blocked(client_ip);
        match (by_id, by_ip) {
            (Some(a), Some(b)) if b > a => Some(Blocked {
                kind: KeyKind::ClientIp,
                retry_after: b,
            }),
            (Some(a), _) => Some(Blocked {
                kind: KeyKind::ClientId,
                retry_after: a,
            }),
            (None, Some(b)) => Some(Blocked {
                kind: KeyKind::ClientIp,
                retry_after: b,
            }),
            (None, None) => None,
        }
    }

    /// Charges one failure to each key (post-commit: after the upstream answered). Returns the
    /// key kinds whose quota is now spent.
    pub fn charge(&self, client_id: Option<&str>, client_ip: IpAddr) -> [Option<KeyKind>; 2] {
        let id_spent = client_id.is_some_and(|id| self.client_id.charge(Box::from(id)));
        let ip_spent = self.client_ip.charge(client_ip);
        [
            id_spent.then_some(KeyKind::ClientId),
            ip_spent.then_some(KeyKind::ClientIp),
        ]
    }

    /// Drops keys that have fully recovered and releases their memory. Returns the keys still
    /// tracked per kind: `(client_id, client_ip)`.
    pub fn housekeep(&self) -> (usize, usize) {
        (self.client_id.housekeep(), self.client_ip.housekeep())
    }

    /// Keys tracked per kind right now: `(client_id, client_ip)`.
    pub fn tracked(&self) -> (usize, usize) {
        (self.client_id.len(), self.client_ip.len())
    }
}

/// One `X-Forwarded-For` entry: an address, maybe with a port or in brackets.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Ok(sa) = hop.parse::<std::net::SocketAddr>() {
        return Some(sa.ip().to_canonical());
    }
    hop.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .and_then(|h| h.parse::<IpAddr>().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn limiter(adjust: impl FnOnce(&mut FailedChecksConfig)) -> (FailedChecks, LimiterClock) {
        let mut cfg = Config::default().failed_checks;
        adjust(&mut cfg);
        let clock = LimiterClock::manual();
        (FailedChecks::new(&cfg, clock.clone()), clock)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn exactly_burst_failures_then_blocked_with_retry_after() {
        let (l, _clock) = limiter(|_| {});
        let a = ip("192.0.2.1");
        for i in 0..10 {
            assert_eq!(l.check(Some("Iv1.app"), a), None, "failure {i} should pass");
            let spent = l.charge(Some("Iv1.app"), a);
            assert_eq!(
                spent[0].is_some(),
                i == 9,
                "client_id spent after {}",
                i + 1
            );
        }
        let b = l
            .check(Some("Iv1.app"), a)
            .expect("blocked after 10 failures");
        assert_eq!(b.kind, KeyKind::ClientId);
        assert_eq!(b.retry_after, Duration::from_secs(6));
        assert_eq!(b.retry_after_secs(), 6);
        // Checking never charges: still exactly one replenish interval to wait.
        for _ in 0..100 {
            assert_eq!(
                l.check(Some("Iv1.app"), a).unwrap().retry_after,
                Duration::from_secs(6)
            );
        }
    }

    #[test]
    fn failures_that_raced_past_the_gate_are_kept_as_debt() {
        let (l, clock) = limiter(|_| {});
        let a = ip("192.0.2.1");
        // Twenty concurrent guesses all passed the gate before any answer came back.
        for _ in 0..20 {
            assert_eq!(l.check(Some("Iv1.app"), a), None);
        }
        for _ in 0..20 {
            l.charge(Some("Iv1.app"), a);
        }
        // Ten were within the burst; the other ten cost one interval each, on top of the
        // interval a spent quota always waits.
        let b = l.check(Some("Iv1.app"), a).unwrap();
        assert_eq!(b.retry_after, Duration::from_secs(66));
        clock.advance(Duration::from_secs(66));
        assert_eq!(l.check(Some("Iv1.app"), a), None);
        l.charge(Some("Iv1.app"), a);
        assert_eq!(
            l.check(Some("Iv1.app"), a).unwrap().retry_after,
            Duration::from_secs(6)
        );
    }

    #[test]
    fn recovers_after_the_replenish_interval() {
        let (l, clock) = limiter(|_| {});
        let a = ip("192.0.2.1");
        for _ in 0..10 {
            l.charge(Some("Iv1.app"), a);
        }
        clock.advance(Duration::from_millis(5_500));
        let b = l.check(Some("Iv1.app"), a).unwrap();
        assert_eq!(b.retry_after, Duration::from_millis(500));
        assert_eq!(b.retry_after_secs(), 1, "rounded up");
        clock.advance(Duration::from_millis(500));
        assert_eq!(l.check(Some("Iv1.app"), a), None);
        // One more failure spends it again for a full interval.
        l.charge(Some("Iv1.app"), a);
        assert_eq!(
            l.check(Some("Iv1.app"), a).unwrap().retry_after,
            Duration::from_secs(6)
        );
    }

    #[test]
    fn other_keys_are_unaffected() {
        let (l, _clock) = limiter(|_| {});
        for _ in 0..10 {
            l.charge(Some("Iv1.app"), ip("192.0.2.1"));
        }
        assert!(
            l.check(Some("Iv1.app"), ip("192.0.2.99")).is_some(),
            "client_id follows the app"
        );
        assert_eq!(l.check(Some("Iv1.other"), ip("192.0.2.2")), None);
        assert_eq!(l.check(None, ip("192.0.2.2")), None);
    }

    #[test]
    fn client_ip_quota_spans_client_ids() {
        let (l, _clock) = limiter(|_| {});
        let a = ip("2001:db8::1");
        for i in 0..30 {
            l.charge(Some(&format!("Iv1.{i}")), a);
        }
        let b = l.check(Some("Iv1.fresh"), a).unwrap();
        assert_eq!(b.kind, KeyKind::ClientIp);
        assert_eq!(b.retry_after, Duration::from_secs(2));
    }

    #[test]
    fn longer_wait_wins_when_both_are_spent() {
        let (l, _clock) = limiter(|c| {
            c.client_id_burst = 1;
            c.client_ip_burst = 1;
            c.client_ip_replenish = Duration::from_secs(60);
        });
        l.charge(Some("Iv1.app"), ip("192.0.2.1"));
        let b = l.check(Some("Iv1.app"), ip("192.0.2.1")).unwrap();
        assert_eq!(
            (b.kind, b.retry_after),
            (KeyKind::ClientIp, Duration::from_secs(60))
        );
    }

    #[test]
    fn a_million_sprayed_keys_stay_under_the_cap_and_keep_limiting() {
        let (l, _clock) = limiter(|c| {
            c.max_tracked_keys = 1000;
            c.client_ip_burst = 1_000_000_000;
        });
        let a = ip("192.0.2.1");
        let mut blocked = 0;
        for i in 0..1_000_000u32 {
            let id = format!("made-up-{i}");
            if l.check(Some(&id), a).is_some() {
                blocked += 1;
                continue;
            }
            l.charge(Some(&id), a);
        }
        let (ids, _) = l.tracked();
        assert!(ids <= 1000, "{ids} client_ids tracked");
        // 999 own keys plus the overflow bucket's burst of 10; everything else was refused.
        assert_eq!(blocked, 1_000_000 - 999 - 10);
        assert!(
            l.check(Some("made-up-new"), a).is_some(),
            "overflow bucket still limits"
        );
        // A key tracked before the table filled keeps its own quota.
        assert_eq!(l.check(Some("made-up-0"), a), None);
    }

    #[test]
    fn housekeeping_drops_recovered_keys_only() {
        let (l, clock) = limiter(|_| {});
        // Each client_id fails from its own address, so only the client_id quotas are tested.
        let a = ip("192.0.2.1");
        for i in 0..100u8 {
            l.charge(Some(&format!("Iv1.{i}")), IpAddr::from([198, 51, 100, i]));
        }
        for _ in 0..10 {
            l.charge(Some("Iv1.busy"), a);
        }
        assert_eq!(l.tracked(), (101, 101));
        // Single-failure keys recover after one interval; governor keeps one more interval of
        // slack before dropping them. Iv1.busy (ten failures) is far from recovered.
        clock.advance(Duration::from_secs(6));
        assert_eq!(l.housekeep().0, 101);
        clock.advance(Duration::from_millis(6_001));
        // The addresses recover too, except the one Iv1.busy failed from.
        assert_eq!(l.housekeep(), (1, 1));
        // Its state survived: it has regained two failures, not a fresh burst of ten.
        l.charge(Some("Iv1.busy"), a);
        assert!(l.check(Some("Iv1.busy"), a).is_none());
        l.charge(Some("Iv1.busy"), a);
        assert!(l.check(Some("Iv1.busy"), a).is_some());
    }

    #[test]
    fn client_ip_from_forwarded_for_only_behind_trusted_proxies() {
        let (l, _clock) = limiter(|c| {
            c.trusted_proxies = vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
        });
        let hdr = |v: &[&str]| {
            let mut h = HeaderMap::new();
            for x in v {
                h.append("x-forwarded-for", x.parse().unwrap());
            }
            h
        };
        let cases: &[(&str, &[&str], &str)] = &[
            // Untrusted peer: its own address, whatever it claims.
            ("198.51.100.7", &["203.0.113.5"], "198.51.100.7"),
            // Trusted peer: the rightmost untrusted hop.
            ("10.1.2.3", &["203.0.113.5"], "203.0.113.5"),
            (
                "10.1.2.3",
                &["1.1.1.1, 203.0.113.5, 10.9.9.9"],
                "203.0.113.5",
            ),
            (
                "10.1.2.3",
                &["1.1.1.1", "203.0.113.5, 10.9.9.9"],
                "203.0.113.5",
            ),
            ("10.1.2.3", &["[2001:db8::5]:443"], "2001:db8::5"),
            ("10.1.2.3", &["203.0.113.5:8443"], "203.0.113.5"),
            // No header, garbage, or only trusted hops: the last trusted address reached.
            ("10.1.2.3", &[], "10.1.2.3"),
            ("10.1.2.3", &["not-an-ip"], "10.1.2.3"),
            ("10.1.2.3", &["203.0.113.5, garbage, 10.9.9.9"], "10.9.9.9"),
            ("10.1.2.3", &["10.4.4.4, 10.9.9.9"], "10.4.4.4"),
            // IPv4-mapped IPv6 peers count as IPv4.
            ("::ffff:10.1.2.3", &["203.0.113.5"], "203.0.113.5"),
            ("fd00::1", &["2001:db8::9"], "2001:db8::9"),
        ];
        for (peer, xff, want) in cases {
            assert_eq!(l.client_ip(ip(peer), &hdr(xff)), ip(want), "{peer} {xff:?}");
        }
    }
}
