//! The failed-check quotas kept in the shared store (`[shared]`), for every replica at once.
//!
//! The gate is one admit script per call (it reads the quotas and reserves an in-flight slot in
//! each quota held, as [`super::flight`] does per replica, so replicas together never let more
//! calls of one key in flight than it may still fail); the charge is one settle script after the
//! answer, run in a task of its own so the answer is not held for it. A key the store reported
//! spent is answered 429 from a local cache until its wait is over, without a round trip
//! (Envoy's local cache of over-limit keys). When the store is unavailable the call goes on as
//! `shared.on_redis_error` says: the replica's own quotas (`local`), or no limit (`allow`); a
//! charge that could not be written is charged to the replica's own quotas (`local`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use super::keys::CredentialHasher;
use super::{
    Admission, BlockReason, Blocked, CallKeys, Charge, Charged, FailedChecks, FailureClass, QUOTAS,
    Settle, Slots, VERIFIED_FOR, hex,
};
use crate::config::{FailedChecksConfig, OnRedisError};
use crate::shared::{self, Admitted, QuotaKeys, QuotaSpec, Store};

/// How often a call held because its key has as many calls in flight (fleet-wide) as failures
/// left asks the store again, in milliseconds. The wait ends at `server.request_timeout`.
pub const BUSY_POLL: Duration = Duration::from_millis(50);

/// The quotas (in [`QUOTAS`] order) a spent key of is answered from the local cache: those keyed
/// to the caller's own credential. An address quota is always asked: someone else may have spent
/// it, and only the store knows whether the caller's credential is verified, which exempts it.
const CACHED: [bool; 3] = [true, false, true];

/// How often a replica checks, while the store answers, that it still has the fleet's hashing
/// key (Redis may have restarted empty between two calls), in seconds.
pub const KEY_CHECK_EVERY: Duration = Duration::from_secs(5);

/// The fleet's hashing key as read from the store, and the hasher made of it.
type FleetKey = (Vec<u8>, Arc<CredentialHasher>);

/// The shared store as the limiter uses it. Clones share everything (a reloaded limiter keeps
/// the store, the hashing key and the cache).
#[derive(Clone)]
pub struct SharedQuotas {
    store: Arc<Store>,
    /// The fleet's hashing key (and the hasher made of it), once read from the store.
    hasher: Arc<RwLock<Option<FleetKey>>>,
    cache: Arc<SpentCache>,
    /// Reservation ids: this process's random tag and a counter.
    process: u64,
    next: Arc<AtomicU64>,
    /// Reservations to give back once the store answers again (their settle was not written,
    /// or their admit timed out after Redis may have run it): at most [`MAX_RELEASES`].
    releases: Arc<Mutex<Vec<(QuotaKeys, String)>>>,
}

/// Reservations kept to give back later, at most; past it they lapse on their own.
pub const MAX_RELEASES: usize = 10_000;

impl std::fmt::Debug for SharedQuotas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedQuotas")
            .field("store", &self.store)
            .field("hashing_key", &self.hasher().is_some())
            .finish_non_exhaustive()
    }
}

impl SharedQuotas {
    /// The quotas in `store`, with a spent-key cache of at most `max_cached` keys.
    pub fn new(store: Arc<Store>, max_cached: usize) -> Self {
        // Random, with the process id and start time mixed in, so two replicas never share
        // reservation ids even if the system gives no random bytes.
        let mut tag = [0u8; 8];
        if let Ok(key) = CredentialHasher::random_key() {
            tag.copy_from_slice(&key[..8]);
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let process = u64::from_le_bytes(tag) ^ (u64::from(std::process::id()) << 32) ^ nanos;
        SharedQuotas {
            store,
            hasher: Arc::new(RwLock::new(None)),
            cache: Arc::new(SpentCache::new(max_cached)),
            process,
            next: Arc::new(AtomicU64::new(0)),
            releases: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    fn hasher(&self) -> Option<Arc<CredentialHasher>> {
        let h = self.hasher.read().unwrap_or_else(PoisonError::into_inner);
        h.as_ref().map(|(_, h)| h.clone())
    }

    /// Keeps the store usable for the life of the process: agrees on the fleet's hashing key
    /// with the store (this replica's own, or a random one, is written when the store has none:
    /// at first contact, or after Redis came back empty) whenever the store is down or has no
    /// key yet, and every [`KEY_CHECK_EVERY`] otherwise; that call is also the probe that finds
    /// a down store answering again. Returns after one round if `once`.
    pub async fn maintain(&self, once: bool) {
        let mut since_check = Duration::ZERO;
        loop {
            let ours = {
                let h = self.hasher.read().unwrap_or_else(PoisonError::into_inner);
                h.as_ref().map(|(k, _)| k.clone())
            };
            if ours.is_none() || !self.store.is_up() || since_check >= KEY_CHECK_EVERY {
                since_check = Duration::ZERO;
                let candidate = match ours.clone() {
                    Some(k) => Some(k),
                    None => CredentialHasher::random_key().ok().map(|k| k.to_vec()),
                };
                if let Some(candidate) = candidate
                    && let Ok(key) = self.store.hashing_key(&candidate).await
                    && !key.is_empty()
                    && ours.as_deref() != Some(&key[..])
                {
                    if ours.is_some() {
                        tracing::warn!(
                            "the shared store's hashing key changed (Redis restarted empty?): quota keys start afresh"
                        );
                    }
                    let hasher = Arc::new(CredentialHasher::with_key(&key));
                    *self.hasher.write().unwrap_or_else(PoisonError::into_inner) =
                        Some((key, hasher));
                }
            }
            if self.store.is_up() {
                self.give_back().await;
            }
            if once {
                return;
            }
            tokio::time::sleep(shared::PROBE_INTERVAL).await;
            since_check += shared::PROBE_INTERVAL;
        }
    }

    /// The call's keys under the fleet's hashing key, once it is known.
    pub(super) fn keys(
        &self,
        authorization: Option<&http::HeaderValue>,
        client_id: &str,
        client_ip: std::net::IpAddr,
    ) -> Option<SharedKeys> {
        let h = self.hasher()?;
        Some(SharedKeys {
            credential: h.key(authorization, client_id).tag(),
            client_ip: h.address_tag(client_ip),
        })
    }

    /// Keeps a reservation to give back once the store answers again.
    fn release_later(&self, keys: QuotaKeys, id: String) {
        let mut r = self.releases.lock().unwrap_or_else(PoisonError::into_inner);
        if r.len() < MAX_RELEASES {
            r.push((keys, id));
        }
    }

    /// Gives back the reservations kept while the store was unavailable (up to 1,000 a round).
    async fn give_back(&self) {
        let batch: Vec<(QuotaKeys, String)> = {
            let mut r = self.releases.lock().unwrap_or_else(PoisonError::into_inner);
            let n = r.len().min(1000);
            r.drain(..n).collect()
        };
        let specs = [QuotaSpec {
            period_us: 1,
            burst: 1,
        }; 3];
        for (i, (keys, id)) in batch.iter().enumerate() {
            let given = self
                .store
                .settle(
                    keys,
                    shared::Outcome::Neutral,
                    false,
                    &specs,
                    id,
                    VERIFIED_FOR,
                )
                .await;
            if given.is_err() {
                let mut r = self.releases.lock().unwrap_or_else(PoisonError::into_inner);
                for rest in batch.into_iter().skip(i) {
                    if r.len() < MAX_RELEASES {
                        r.push(rest);
                    }
                }
                return;
            }
        }
    }

    fn reservation_id(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{:016x}:{n:x}", self.process)
    }

    /// Drops cached keys whose wait is over.
    pub(super) fn housekeep(&self) {
        self.cache.housekeep();
    }
}

/// A call's keys under the fleet's hashing key: tags of 16 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedKeys {
    credential: [u8; 16],
    client_ip: [u8; 16],
}

impl SharedKeys {
    /// The tag a quota (in [`QUOTAS`] order) is keyed by.
    fn of(&self, quota: usize) -> [u8; 16] {
        match quota {
            1 => self.client_ip,
            _ => self.credential,
        }
    }
}

/// Each quota's parameters for the scripts, in [`QUOTAS`] order.
pub(super) fn specs(cfg: &FailedChecksConfig) -> [QuotaSpec; 3] {
    [cfg.credential, cfg.client_ip, cfg.token].map(|q| QuotaSpec {
        period_us: u64::try_from(q.replenish.as_micros())
            .unwrap_or(u64::MAX)
            .max(1),
        burst: q.burst,
    })
}

/// A call's reservation in the store, given back when it is settled or dropped.
#[derive(Debug)]
pub(super) struct Hold {
    keys: QuotaKeys,
    id: String,
    /// The quotas (in [`QUOTAS`] order) the call was held to.
    held: [bool; 3],
    basic: bool,
}

/// Keys the store reported spent, each until its wait is over: at most `max` of them.
struct SpentCache {
    max: usize,
    table: Mutex<HashMap<(u8, [u8; 16]), Instant>>,
}

impl SpentCache {
    fn new(max: usize) -> Self {
        SpentCache {
            max,
            table: Mutex::new(HashMap::new()),
        }
    }

    /// The cached spent quota with the longest wait among those the call is held to.
    fn blocked(&self, keys: &SharedKeys, held: [bool; 3]) -> Option<Blocked> {
        let now = Instant::now();
        let t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        if t.is_empty() {
            return None;
        }
        let mut worst: Option<Blocked> = None;
        for (i, (class, kind)) in QUOTAS.into_iter().enumerate() {
            let Some(until) = held[i]
                .then(|| t.get(&(i as u8, keys.of(i))))
                .flatten()
                .filter(|until| **until > now)
            else {
                continue;
            };
            let wait = *until - now;
            if worst.is_none_or(|b| wait > b.retry_after) {
                worst = Some(Blocked {
                    class,
                    kind,
                    reason: BlockReason::Spent,
                    retry_after: wait,
                });
            }
        }
        worst
    }

    fn insert(&self, quota: usize, tag: [u8; 16], until: Instant) {
        let mut t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        if t.len() >= self.max {
            let now = Instant::now();
            t.retain(|_, u| *u > now);
            if t.len() >= self.max {
                return;
            }
        }
        t.insert((quota as u8, tag), until);
    }

    fn housekeep(&self) {
        let now = Instant::now();
        let mut t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        t.retain(|_, u| *u > now);
        t.shrink_to_fit();
    }
}

impl FailedChecks {
    /// The gate in the shared store; `None` when the store is unavailable (no hashing key yet,
    /// down, an error or a timeout): the caller goes on as `shared.on_redis_error` says.
    pub(super) async fn admit_shared(
        self: &Arc<Self>,
        shared: &SharedQuotas,
        keys: CallKeys,
        token_operation: bool,
        wait_until: Instant,
    ) -> Option<Admission> {
        let sk = keys.shared?;
        if !shared.store.is_up() {
            return None;
        }
        let verified_here = self.is_verified(&keys.credential);
        // The quotas the call is held to that the cache may answer ([`CACHED`]).
        let cached = [
            !verified_here && CACHED[0],
            CACHED[1],
            token_operation && CACHED[2],
        ];
        if let Some(b) = shared.cache.blocked(&sk, cached) {
            return Some(self.refuse(keys, b, false));
        }
        let names = shared
            .store
            .quota_keys(&hex(&sk.credential), &hex(&sk.client_ip));
        let id = shared.reservation_id();
        // Lapses on its own only if this replica dies (or could not give it back): after the
        // longest exchange (`server.request_timeout`, the span to `wait_until`) from when it was
        // taken, and a second.
        let life = wait_until.saturating_duration_since(Instant::now()) + Duration::from_secs(1);
        let mut waited = false;
        loop {
            let answer = match shared
                .store
                .admit(&names, true, token_operation, &self.specs, &id, life)
                .await
            {
                Ok(a) => a,
                Err(shared::Unavailable) => {
                    // Redis may have run it before the timeout: give the slot back when it
                    // answers again.
                    shared.release_later(names, id);
                    return None;
                }
            };
            // The fleet's word on the credential, for the cache and the local fallback.
            if answer.verified && keys.credential.is_basic() {
                self.verify(&keys.credential);
            } else if !answer.verified && verified_here {
                self.unverify(&keys.credential);
            }
            let held = [!answer.verified, !answer.verified, token_operation];
            let blocked = |quota: usize, reason, retry_after| Blocked {
                class: QUOTAS[quota].0,
                kind: QUOTAS[quota].1,
                reason,
                retry_after,
            };
            match answer.admitted {
                Admitted::Reserved => {
                    let hold = Hold {
                        keys: names,
                        id,
                        held,
                        basic: keys.credential.is_basic(),
                    };
                    let mut permit = self.permit(keys, Slots::default(), waited, false);
                    permit.shared = Some(hold);
                    return Some(Admission::Pass(permit));
                }
                Admitted::Spent(quota, wait) => {
                    // Only what `blocked` reads: an address entry would only take room.
                    if CACHED[quota]
                        && let Some(until) = Instant::now().checked_add(wait)
                    {
                        shared.cache.insert(quota, sk.of(quota), until);
                    }
                    return Some(self.refuse(
                        keys,
                        blocked(quota, BlockReason::Spent, wait),
                        waited,
                    ));
                }
                Admitted::Busy(quota) => {
                    let b = blocked(quota, BlockReason::InFlight, Duration::from_secs(1));
                    if self.shadow {
                        return Some(self.refuse(keys, b, waited));
                    }
                    waited = true;
                    let next = Instant::now() + BUSY_POLL;
                    if next >= wait_until {
                        return Some(Admission::Limited(b, true));
                    }
                    tokio::time::sleep_until(next).await;
                }
            }
        }
    }

    /// Refused by `b`: answered 429, or forwarded unheld in shadow mode.
    fn refuse(self: &Arc<Self>, keys: CallKeys, b: Blocked, waited: bool) -> Admission {
        if self.shadow {
            Admission::WouldLimit(b, self.permit(keys, Slots::default(), waited, true))
        } else {
            Admission::Limited(b, waited)
        }
    }

    /// Records a call let through by the store: the local view of the credential now, the
    /// store's in a task of its own. Returns the charges as written (a quota found spent by the
    /// charge is logged by that task).
    pub(super) fn settle_shared(
        self: &Arc<Self>,
        keys: &CallKeys,
        hold: Hold,
        outcome: shared::Outcome,
        local: Option<Settle>,
    ) -> [Option<Charge>; 3] {
        match outcome {
            shared::Outcome::Credential | shared::Outcome::Both => self.unverify(&keys.credential),
            shared::Outcome::Token | shared::Outcome::Accepted if keys.credential.is_basic() => {
                self.verify(&keys.credential)
            }
            _ => {}
        }
        let charge = |class, kind| {
            Some(Charge {
                class,
                kind,
                result: Charged::Recorded,
            })
        };
        let (credential, token) = match outcome {
            shared::Outcome::Credential => (true, false),
            shared::Outcome::Token => (false, true),
            shared::Outcome::Both => (true, true),
            shared::Outcome::Accepted | shared::Outcome::Neutral => (false, false),
        };
        let charges = [
            credential
                .then(|| charge(FailureClass::Credential, QUOTAS[0].1))
                .flatten(),
            credential
                .then(|| charge(FailureClass::Credential, QUOTAS[1].1))
                .flatten(),
            token
                .then(|| charge(FailureClass::Token, QUOTAS[2].1))
                .flatten(),
        ];
        let Some(shared) = self.shared.clone() else {
            return charges;
        };
        let this = self.clone();
        let keys = *keys;
        let write = async move {
            let answer = shared
                .store
                .settle(
                    &hold.keys,
                    outcome,
                    hold.basic,
                    &this.specs,
                    &hold.id,
                    VERIFIED_FOR,
                )
                .await;
            match answer {
                Ok(charged) => {
                    for (i, c) in charged.into_iter().enumerate() {
                        if c == shared::Charged::Spent {
                            tracing::info!(
                                class = QUOTAS[i].0.as_str(),
                                key_kind = QUOTAS[i].1.as_str(),
                                "failed-check quota spent (shared)"
                            );
                        }
                    }
                }
                // Not written (or not known to be): the replica's own quotas keep it
                // (`local`), so an outage never buys an uncharged failure (a charge Redis ran
                // just before the timeout counts twice: never fewer); the reservation is given
                // back once Redis answers.
                Err(shared::Unavailable) => {
                    shared.release_later(hold.keys.clone(), hold.id.clone());
                    if let Some(settle) = local
                        && shared.store.on_error() == OnRedisError::Local
                    {
                        this.settle(&keys, settle);
                        if outcome == shared::Outcome::Both {
                            this.settle(&keys, Settle::Failure(FailureClass::Token));
                        }
                    }
                }
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(write);
            }
            // No runtime (the process is ending): the replica's own quotas keep it.
            Err(_) => {
                if let Some(settle) = local {
                    self.settle(&keys, settle);
                    if outcome == shared::Outcome::Both {
                        self.settle(&keys, Settle::Failure(FailureClass::Token));
                    }
                }
            }
        }
        charges
    }
}

impl Hold {
    /// What a call whose answer will never be known is charged with: a failure of each class
    /// it was held to.
    pub(super) fn abandoned(&self) -> shared::Outcome {
        match (self.held[0] || self.held[1], self.held[2]) {
            (true, true) => shared::Outcome::Both,
            (true, false) => shared::Outcome::Credential,
            (false, true) => shared::Outcome::Token,
            (false, false) => shared::Outcome::Neutral,
        }
    }
}
