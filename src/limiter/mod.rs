//! Limits failed calls to the OAuth Applications API with GCRA quotas keyed to the caller that
//! fails, never to the app it names: a request is answered 429 only when one of its own keys is
//! spent. Three quotas, one per failure class and key kind:
//! - credential failures (a wrong or missing client secret) per credential and per client address;
//! - token failures (a revoked, expired or guessed token under accepted credentials) per
//!   credential, with a default no tighter than GitHub's own rate limit for an app.
//!
//! A credential is a keyed hash of the app credential a request presents ([`keys`]). A
//! credential the upstream has accepted (a 2xx) is *verified* for an hour: it is not held to the
//! credential-failure quotas, so nobody sharing its address can lock it out. Concurrent requests
//! are bounded per key by what the key may still fail ([`flight`]); failures are charged after
//! the upstream answered ([`gcra`]). In shadow mode nothing is refused or held: what would have
//! been refused is reported and leaves the quotas as enforcement would have. What counts as a
//! failure is the caller's rule (`proxy::gate`), not this module's.

mod flight;
mod gcra;
mod keys;
mod shared;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use governor::clock::Clock;
use http::HeaderValue;
use tokio::time::Instant;

use crate::config::{FailedChecksConfig, FailedChecksMode};

pub use flight::IN_FLIGHT_ALLOWANCE;
pub use gcra::{Charged, LimiterClock};
pub use keys::{
    ClientAddress, CredentialHasher, CredentialKey, NoRandomness, address_key, hex, sha256,
};
pub use shared::{BUSY_POLL, SharedKeys, SharedQuotas};

use flight::{Flights, Reserve};
use gcra::{Gcra, Peek};

/// How long a credential stays verified after the upstream last accepted it, in seconds.
const VERIFIED_FOR: Duration = Duration::from_secs(3600);

/// A class of failure, each with its own quotas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// A 401 to an `/applications/{client_id}/...` call: a wrong or missing client secret.
    Credential,
    /// A 404 or 422 to a token operation: the credentials passed, the token did not.
    Token,
}

impl FailureClass {
    /// The class's name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::Credential => "credential",
            FailureClass::Token => "token",
        }
    }
}

/// The kind of key a failure is charged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// The app credential the request presents (a keyed hash of it).
    Credential,
    /// The client's address (the peer, or `X-Forwarded-For` behind a trusted proxy; an IPv6
    /// address by its /64).
    ClientIp,
}

impl KeyKind {
    /// The kind's name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Credential => "credential",
            KeyKind::ClientIp => "client_ip",
        }
    }
}

/// The three quotas, as (class, key kind) pairs, in a fixed order.
pub const QUOTAS: [(FailureClass, KeyKind); 3] = [
    (FailureClass::Credential, KeyKind::Credential),
    (FailureClass::Credential, KeyKind::ClientIp),
    (FailureClass::Token, KeyKind::Credential),
];

/// Why a request may not go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockReason {
    /// The key's quota of failures is spent.
    Spent,
    /// The key had as many requests in flight as failures left, for as long as a request may
    /// wait (`server.request_timeout`).
    InFlight,
}

/// A request refused by one of its keys: which quota, why, and how long to wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocked {
    /// The failure class of the quota.
    pub class: FailureClass,
    /// The key kind of the quota.
    pub kind: KeyKind,
    /// Spent, or too many in flight.
    pub reason: BlockReason,
    /// Time until the key may fail again (the longest, when several keys are spent).
    pub retry_after: Duration,
}

impl Blocked {
    /// `Retry-After` in whole seconds, rounded up and at least 1 (RFC 9110 §10.2.3).
    pub fn retry_after_secs(&self) -> u64 {
        let d = self.retry_after;
        (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
    }
}

/// The keys of one request.
#[derive(Debug, Clone, Copy)]
pub struct CallKeys {
    /// The credential it presents.
    pub credential: CredentialKey,
    /// Its client address key.
    pub client_ip: IpAddr,
    /// Both under the fleet's hashing key, with a shared store that has given it.
    pub shared: Option<SharedKeys>,
}

/// What the gate decided.
#[derive(Debug)]
pub enum Admission {
    /// Forward the request; settle the permit with its outcome.
    Pass(Permit),
    /// Answer 429 (mode `enforce`); `true` when it first waited for calls of its key to finish.
    Limited(Blocked, bool),
    /// Mode `shadow`: would have been answered 429; forward it. The permit changes no quota.
    WouldLimit(Blocked, Permit),
}

/// The outcome of a forwarded request, as far as the quotas care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// A failure of this class.
    Failure(FailureClass),
    /// A 2xx: the upstream accepted the credential.
    Accepted,
    /// Anything else (a 5xx, a gateway error, no answer): nothing is learnt.
    Neutral,
}

/// One failure as charged by [`Permit::settle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge {
    /// The quota's class.
    pub class: FailureClass,
    /// The quota's key kind.
    pub kind: KeyKind,
    /// What the quota did with it.
    pub result: Charged,
}

/// Keys tracked per quota (in [`QUOTAS`] order) and credentials verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tracked {
    /// Keys in each quota's table, in [`QUOTAS`] order.
    pub quotas: [usize; 3],
    /// Credentials verified now.
    pub verified: usize,
}

struct Quota<K: std::hash::Hash + Eq + Clone> {
    gcra: Gcra<K>,
    /// Shared with the limiters a reload builds: a request admitted before it releases its
    /// slot in the same table.
    flights: Arc<Flights<K>>,
}

impl<K: std::hash::Hash + Eq + Clone> Quota<K> {
    fn new(q: crate::config::QuotaConfig, max_keys: usize, clock: &LimiterClock) -> Self {
        Quota {
            gcra: Gcra::new(q.burst, q.replenish, max_keys, clock),
            flights: Arc::new(Flights::new()),
        }
    }

    /// The same keys and in-flight slots under `q`.
    fn requota(&self, q: crate::config::QuotaConfig, max_keys: usize) -> Self {
        Quota {
            gcra: self.gcra.requota(q.burst, q.replenish, max_keys),
            flights: self.flights.clone(),
        }
    }
}

/// The failed-check limiter of the whole gateway.
pub struct FailedChecks {
    hasher: CredentialHasher,
    by_credential: Quota<CredentialKey>,
    by_client_ip: Quota<IpAddr>,
    token_by_credential: Quota<CredentialKey>,
    /// Credentials the upstream accepted, with the clock reading (nanoseconds) of the last time.
    verified: Arc<RwLock<HashMap<CredentialKey, AtomicU64>>>,
    max_keys: usize,
    shadow: bool,
    clock: LimiterClock,
    /// The quotas in a shared store (`[shared]`), if any.
    shared: Option<SharedQuotas>,
    /// Each quota's parameters for the store's scripts.
    specs: [crate::shared::QuotaSpec; 3],
}

impl std::fmt::Debug for FailedChecks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailedChecks")
            .field("tracked", &self.tracked())
            .field("shadow", &self.shadow)
            .finish_non_exhaustive()
    }
}

/// Which quotas a request is held to, and the slots it took in each.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Slots {
    credential: bool,
    client_ip: bool,
    token: bool,
}

impl FailedChecks {
    /// Builds the limiter from `[failed_checks]`, on `clock`.
    ///
    /// # Errors
    /// [`NoRandomness`] when the operating system gives no random bytes for the hashing key.
    pub fn new(cfg: &FailedChecksConfig, clock: LimiterClock) -> Result<Self, NoRandomness> {
        let max = cfg.max_tracked_keys;
        Ok(FailedChecks {
            hasher: CredentialHasher::new()?,
            by_credential: Quota::new(cfg.credential, max, &clock),
            by_client_ip: Quota::new(cfg.client_ip, max, &clock),
            token_by_credential: Quota::new(cfg.token, max, &clock),
            verified: Arc::new(RwLock::new(HashMap::new())),
            max_keys: max,
            shadow: cfg.mode == FailedChecksMode::Shadow,
            clock,
            shared: None,
            specs: shared::specs(cfg),
        })
    }

    /// This limiter with its quotas kept in a shared store (`[shared]`): every replica using
    /// the store shares them; while the store is unavailable, the quotas of this limiter apply
    /// (`shared.on_redis_error = "local"`) or none (`"allow"`).
    pub fn with_shared_opt(mut self, shared: Option<SharedQuotas>) -> Self {
        self.shared = shared;
        self
    }

    /// This limiter under a reloaded `[failed_checks]`: the same hashing key, the same keys
    /// with their state, in-flight slots and verified credentials, under the new quotas, mode,
    /// trusted proxies and table size. Nothing is refilled: a changed quota applies to every
    /// existing key at once, from its state as it is (see [`gcra`]). Both limiters share their
    /// tables, so requests admitted by this one settle into the same state.
    pub fn reconfigured(&self, cfg: &FailedChecksConfig) -> Self {
        let max = cfg.max_tracked_keys;
        FailedChecks {
            hasher: self.hasher.clone(),
            by_credential: self.by_credential.requota(cfg.credential, max),
            by_client_ip: self.by_client_ip.requota(cfg.client_ip, max),
            token_by_credential: self.token_by_credential.requota(cfg.token, max),
            verified: self.verified.clone(),
            max_keys: max,
            shadow: cfg.mode == FailedChecksMode::Shadow,
            clock: self.clock.clone(),
            shared: self.shared.clone(),
            specs: shared::specs(cfg),
        }
    }

    /// The keys of a request: the credential in `authorization` (after query credentials were
    /// moved there), or `client_id` alone when it presents none; and `client`, the client address
    /// ([`ClientAddress::resolve`]: the peer, or `X-Forwarded-For` behind a trusted proxy).
    pub fn keys(
        &self,
        authorization: Option<&HeaderValue>,
        client_id: &str,
        client: IpAddr,
    ) -> CallKeys {
        let client_ip = address_key(client);
        CallKeys {
            credential: self.hasher.key(authorization, client_id),
            client_ip,
            shared: self
                .shared
                .as_ref()
                .and_then(|s| s.keys(authorization, client_id, client_ip)),
        }
    }

    /// Whether the upstream accepted this credential within the last hour.
    pub fn is_verified(&self, key: &CredentialKey) -> bool {
        let now = self.now_nanos();
        let horizon = u64::try_from(VERIFIED_FOR.as_nanos()).unwrap_or(u64::MAX);
        self.verified
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .is_some_and(|at| now.saturating_sub(at.load(Ordering::Relaxed)) < horizon)
    }

    /// The gate before forwarding: refuses (or, in shadow mode, reports) a request one of whose
    /// keys is spent; otherwise takes one in-flight slot in each quota the request is held to,
    /// waiting (until `wait_until` at most) while a key has as many requests in flight as
    /// failures left. Every call to the OAuth Applications API with a credential not verified is
    /// held to the credential-failure quotas; every token operation (`token_operation`) to the
    /// token-failure quota.
    pub async fn admit(
        self: &Arc<Self>,
        keys: CallKeys,
        token_operation: bool,
        wait_until: Instant,
    ) -> Admission {
        if let Some(shared) = &self.shared {
            if let Some(admission) = self
                .admit_shared(shared, keys, token_operation, wait_until)
                .await
            {
                return admission;
            }
            if shared.store().on_error() == crate::config::OnRedisError::Allow {
                return Admission::Pass(self.permit(keys, Slots::default(), false, true));
            }
        }
        let verified = self.is_verified(&keys.credential);
        let wanted = Slots {
            credential: !verified,
            client_ip: !verified,
            token: token_operation,
        };
        let mut waited = false;
        loop {
            if let Some(blocked) = self.spent(&keys, wanted) {
                if !self.shadow {
                    return Admission::Limited(blocked, waited);
                }
                let permit = self.permit(keys, Slots::default(), waited, true);
                return Admission::WouldLimit(blocked, permit);
            }
            let busy = match self.try_reserve(&keys, wanted) {
                Ok(()) => return Admission::Pass(self.permit(keys, wanted, waited, false)),
                Err(busy) => busy,
            };
            let Some(woken) = busy.woken else {
                continue; // spent since the look above: the next look says so
            };
            let blocked = Blocked {
                class: busy.class,
                kind: busy.kind,
                reason: BlockReason::InFlight,
                retry_after: Duration::from_secs(1),
            };
            if self.shadow {
                // Nothing waits in shadow mode: report what enforce would have held.
                let permit = self.permit(keys, Slots::default(), waited, true);
                return Admission::WouldLimit(blocked, permit);
            }
            waited = true;
            if tokio::time::timeout_at(wait_until, woken).await.is_err()
                || Instant::now() >= wait_until
            {
                return Admission::Limited(blocked, true);
            }
        }
    }

    /// The spent quota with the longest wait among those wanted, if any; never charges.
    fn spent(&self, keys: &CallKeys, wanted: Slots) -> Option<Blocked> {
        let peeks = [
            wanted
                .credential
                .then(|| self.by_credential.gcra.peek(&keys.credential)),
            wanted
                .client_ip
                .then(|| self.by_client_ip.gcra.peek(&keys.client_ip)),
            wanted
                .token
                .then(|| self.token_by_credential.gcra.peek(&keys.credential)),
        ];
        let mut blocked: Option<Blocked> = None;
        for (peek, (class, kind)) in peeks.into_iter().zip(QUOTAS) {
            if let Some(Peek::Spent(wait)) = peek
                && blocked.is_none_or(|b| wait > b.retry_after)
            {
                blocked = Some(Blocked {
                    class,
                    kind,
                    reason: BlockReason::Spent,
                    retry_after: wait,
                });
            }
        }
        blocked
    }

    /// Takes a slot in every wanted quota, or none. Each quota's failures left are read under
    /// its in-flight table's lock ([`Flights::try_reserve`]).
    fn try_reserve(&self, keys: &CallKeys, wanted: Slots) -> Result<(), Busy> {
        let busy = |i: usize, r: Reserve| Busy {
            class: QUOTAS[i].0,
            kind: QUOTAS[i].1,
            woken: match r {
                Reserve::Full(woken) => Some(woken),
                Reserve::Taken | Reserve::NoneLeft => None,
            },
        };
        if wanted.credential {
            let q = &self.by_credential;
            let r = q
                .flights
                .try_reserve(&keys.credential, || left(q.gcra.peek(&keys.credential)));
            if !matches!(r, Reserve::Taken) {
                return Err(busy(0, r));
            }
        }
        if wanted.client_ip {
            let q = &self.by_client_ip;
            let r = q
                .flights
                .try_reserve(&keys.client_ip, || left(q.gcra.peek(&keys.client_ip)));
            if !matches!(r, Reserve::Taken) {
                let taken = Slots {
                    credential: wanted.credential,
                    ..Slots::default()
                };
                self.release(keys, taken);
                return Err(busy(1, r));
            }
        }
        if wanted.token {
            let q = &self.token_by_credential;
            let r = q
                .flights
                .try_reserve(&keys.credential, || left(q.gcra.peek(&keys.credential)));
            if !matches!(r, Reserve::Taken) {
                self.release(
                    keys,
                    Slots {
                        token: false,
                        ..wanted
                    },
                );
                return Err(busy(2, r));
            }
        }
        Ok(())
    }

    fn release(&self, keys: &CallKeys, slots: Slots) {
        if slots.credential {
            self.by_credential.flights.release(&keys.credential);
        }
        if slots.client_ip {
            self.by_client_ip.flights.release(&keys.client_ip);
        }
        if slots.token {
            self.token_by_credential.flights.release(&keys.credential);
        }
    }

    fn permit(self: &Arc<Self>, keys: CallKeys, slots: Slots, waited: bool, inert: bool) -> Permit {
        Permit {
            limiter: self.clone(),
            keys,
            slots,
            waited,
            inert,
            shared: None,
        }
    }

    /// Charges a failure of `class` and updates the verified credentials.
    fn settle(&self, keys: &CallKeys, settle: Settle) -> [Option<Charge>; 2] {
        let verify = |k: &CredentialKey| {
            // Only a credential the caller presented can be verified: an answer to a call with
            // no Basic credentials proves nothing about whoever else names the same client_id.
            if k.is_basic() {
                self.verify(k);
            }
        };
        let charge = |class, kind, result| {
            Some(Charge {
                class,
                kind,
                result,
            })
        };
        match settle {
            Settle::Failure(FailureClass::Credential) => {
                self.unverify(&keys.credential);
                [
                    charge(
                        FailureClass::Credential,
                        KeyKind::Credential,
                        self.by_credential.gcra.charge(&keys.credential),
                    ),
                    charge(
                        FailureClass::Credential,
                        KeyKind::ClientIp,
                        self.by_client_ip.gcra.charge(&keys.client_ip),
                    ),
                ]
            }
            // The upstream judged the token, so it accepted the credentials.
            Settle::Failure(FailureClass::Token) => {
                verify(&keys.credential);
                [
                    charge(
                        FailureClass::Token,
                        KeyKind::Credential,
                        self.token_by_credential.gcra.charge(&keys.credential),
                    ),
                    None,
                ]
            }
            Settle::Accepted => {
                verify(&keys.credential);
                [None, None]
            }
            Settle::Neutral => [None, None],
        }
    }

    fn verify(&self, key: &CredentialKey) {
        let now = self.now_nanos();
        {
            let map = self.verified.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(at) = map.get(key) {
                at.store(now, Ordering::Relaxed);
                return;
            }
            if map.len() >= self.max_keys {
                return;
            }
        }
        self.verified
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(*key, AtomicU64::new(now));
    }

    fn unverify(&self, key: &CredentialKey) {
        let present = self
            .verified
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(key);
        if present {
            self.verified
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(key);
        }
    }

    fn now_nanos(&self) -> u64 {
        self.clock.now().as_u64()
    }

    /// Drops keys that have fully recovered and verifications that expired, releases their
    /// memory, and returns what is still tracked.
    pub fn housekeep(&self) -> Tracked {
        let now = self.now_nanos();
        let horizon = u64::try_from(VERIFIED_FOR.as_nanos()).unwrap_or(u64::MAX);
        {
            let mut map = self
                .verified
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            map.retain(|_, at| now.saturating_sub(at.load(Ordering::Relaxed)) < horizon);
            map.shrink_to_fit();
        }
        if let Some(shared) = &self.shared {
            shared.housekeep();
        }
        self.by_credential.gcra.housekeep();
        self.by_client_ip.gcra.housekeep();
        self.token_by_credential.gcra.housekeep();
        self.tracked()
    }

    /// What is tracked right now.
    pub fn tracked(&self) -> Tracked {
        Tracked {
            quotas: [
                self.by_credential.gcra.len(),
                self.by_client_ip.gcra.len(),
                self.token_by_credential.gcra.len(),
            ],
            verified: self
                .verified
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .len(),
        }
    }
}

/// Failures left by a peek: none when the quota is spent.
fn left(peek: Peek) -> u32 {
    match peek {
        Peek::Left(n) => n,
        Peek::Spent(_) => 0,
    }
}

/// A quota with no slot for a request: which one, and what to wait on (`None`: spent).
struct Busy {
    class: FailureClass,
    kind: KeyKind,
    woken: Option<std::pin::Pin<Box<tokio::sync::futures::OwnedNotified>>>,
}

/// A request let through the gate. Holds its in-flight slots until it is settled or dropped,
/// so the charge for its answer lands before the next waiter looks at the quota.
pub struct Permit {
    limiter: Arc<FailedChecks>,
    keys: CallKeys,
    slots: Slots,
    waited: bool,
    inert: bool,
    /// Its reservation in the shared store, when the store let it through.
    shared: Option<shared::Hold>,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("waited", &self.waited)
            .field("inert", &self.inert)
            .finish_non_exhaustive()
    }
}

impl Permit {
    /// Whether the request waited at the gate for another of its key's requests to finish.
    pub fn waited(&self) -> bool {
        self.waited
    }

    /// Records the request's outcome (charges a failure, verifies or unverifies the credential)
    /// and gives back its slots. A shadow-mode request that would have been refused changes
    /// nothing, as enforcement would never have forwarded it.
    pub fn settle(mut self, settle: Settle) -> [Option<Charge>; 3] {
        if self.inert {
            return [None; 3];
        }
        if let Some(hold) = self.shared.take() {
            let outcome = match settle {
                Settle::Failure(FailureClass::Credential) => crate::shared::Outcome::Credential,
                Settle::Failure(FailureClass::Token) => crate::shared::Outcome::Token,
                Settle::Accepted => crate::shared::Outcome::Accepted,
                Settle::Neutral => crate::shared::Outcome::Neutral,
            };
            return self
                .limiter
                .settle_shared(&self.keys, hold, outcome, Some(settle));
        }
        let [a, b] = self.limiter.settle(&self.keys, settle);
        [a, b, None]
    }

    /// Records a forwarded request whose answer will never be known (its client went away and
    /// it could not be seen through): a failure of each class it was held to, as the worst it
    /// could have been, so hanging up never buys an uncharged guess. Gives back its slots.
    pub fn abandon(mut self) -> [Option<Charge>; 3] {
        if self.inert {
            return [None; 3];
        }
        if let Some(hold) = self.shared.take() {
            let outcome = hold.abandoned();
            let local = match outcome {
                crate::shared::Outcome::Token => Some(Settle::Failure(FailureClass::Token)),
                crate::shared::Outcome::Neutral => None,
                _ => Some(Settle::Failure(FailureClass::Credential)),
            };
            return self.limiter.settle_shared(&self.keys, hold, outcome, local);
        }
        let held = |class| self.limiter.settle(&self.keys, Settle::Failure(class));
        let [a, b] = match self.slots.credential || self.slots.client_ip {
            true => held(FailureClass::Credential),
            false => [None, None],
        };
        let [c, _] = match self.slots.token {
            true => held(FailureClass::Token),
            false => [None, None],
        };
        [a, b, c]
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(hold) = self.shared.take() {
            self.limiter
                .settle_shared(&self.keys, hold, crate::shared::Outcome::Neutral, None);
        }
        self.limiter.release(&self.keys, self.slots);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn limiter(adjust: impl FnOnce(&mut FailedChecksConfig)) -> (Arc<FailedChecks>, LimiterClock) {
        let mut cfg = Config::default().failed_checks;
        adjust(&mut cfg);
        let clock = LimiterClock::manual();
        (
            Arc::new(FailedChecks::new(&cfg, clock.clone()).unwrap()),
            clock,
        )
    }

    fn keys(l: &FailedChecks, secret: &str, ip: &str) -> CallKeys {
        use base64::Engine as _;
        let enc = base64::engine::general_purpose::STANDARD.encode(format!("Iv1.app:{secret}"));
        let auth = HeaderValue::try_from(format!("Basic {enc}")).unwrap();
        l.keys(Some(&auth), "Iv1.app", ip.parse().unwrap())
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    async fn fail(
        l: &Arc<FailedChecks>,
        k: CallKeys,
        class: FailureClass,
        token_op: bool,
    ) -> Option<Blocked> {
        match l.admit(k, token_op, far()).await {
            Admission::Pass(p) => {
                p.settle(Settle::Failure(class));
                None
            }
            Admission::Limited(b, _) => Some(b),
            Admission::WouldLimit(..) => panic!("not in shadow mode"),
        }
    }

    #[tokio::test]
    async fn a_wrong_secret_never_spends_the_right_one() {
        let (l, _clock) = limiter(|_| {});
        // The attacker guesses from another address, always the same wrong secret.
        for _ in 0..10 {
            assert_eq!(
                fail(
                    &l,
                    keys(&l, "wrong", "192.0.2.66"),
                    FailureClass::Credential,
                    true
                )
                .await,
                None
            );
        }
        let b = fail(
            &l,
            keys(&l, "wrong", "192.0.2.66"),
            FailureClass::Credential,
            true,
        )
        .await
        .expect("the attacker's own credential is spent");
        assert_eq!(
            (b.class, b.kind, b.retry_after_secs()),
            (FailureClass::Credential, KeyKind::Credential, 6)
        );
        let app = keys(&l, "right", "192.0.2.1");
        assert!(matches!(
            l.admit(app, true, far()).await,
            Admission::Pass(_)
        ));
    }

    #[tokio::test]
    async fn a_reload_keeps_every_key_and_applies_the_new_quota_at_once() {
        let (l, _clock) = limiter(|_| {});
        for _ in 0..10 {
            fail(
                &l,
                keys(&l, "wrong", "192.0.2.66"),
                FailureClass::Credential,
                true,
            )
            .await;
        }
        // Half the burst (10) spent by another credential: spent under a burst of 5.
        for _ in 0..5 {
            fail(
                &l,
                keys(&l, "half", "192.0.2.67"),
                FailureClass::Credential,
                true,
            )
            .await;
        }
        let mut cfg = Config::default().failed_checks;
        cfg.credential.burst = 5;
        let reloaded = Arc::new(l.reconfigured(&cfg));
        // Same hashing key: the same secret is the same key to both.
        assert_eq!(
            keys(&l, "wrong", "192.0.2.66").credential,
            keys(&reloaded, "wrong", "192.0.2.66").credential
        );
        let spent = fail(
            &reloaded,
            keys(&reloaded, "wrong", "192.0.2.66"),
            FailureClass::Credential,
            true,
        )
        .await;
        assert!(spent.is_some(), "a reload refilled a spent key");
        let half = fail(
            &reloaded,
            keys(&reloaded, "half", "192.0.2.67"),
            FailureClass::Credential,
            true,
        )
        .await;
        assert!(
            half.is_some(),
            "the tighter burst did not apply to an existing key"
        );
        assert!(
            fail(
                &reloaded,
                keys(&reloaded, "fresh", "192.0.2.68"),
                FailureClass::Credential,
                true
            )
            .await
            .is_none()
        );
        assert_eq!(reloaded.tracked().quotas, l.tracked().quotas, "one table");
    }

    #[tokio::test]
    async fn a_verified_credential_is_not_held_to_its_address() {
        let (l, _clock) = limiter(|_| {});
        let app = keys(&l, "right", "192.0.2.1");
        let Admission::Pass(p) = l.admit(app, true, far()).await else {
            panic!()
        };
        p.settle(Settle::Accepted);
        // Thirty wrong secrets from the app's own address spend the address.
        for i in 0..30 {
            fail(
                &l,
                keys(&l, &format!("guess{i}"), "192.0.2.1"),
                FailureClass::Credential,
                true,
            )
            .await;
        }
        let b = fail(
            &l,
            keys(&l, "guess-more", "192.0.2.1"),
            FailureClass::Credential,
            true,
        )
        .await;
        assert_eq!(b.map(|b| b.kind), Some(KeyKind::ClientIp));
        assert!(
            matches!(l.admit(app, true, far()).await, Admission::Pass(_)),
            "the verified app goes on"
        );
        // A 401 takes the verification away (a rotated secret): the address holds it again.
        let Admission::Pass(p) = l.admit(app, true, far()).await else {
            panic!()
        };
        p.settle(Settle::Failure(FailureClass::Credential));
        assert!(matches!(
            l.admit(app, true, far()).await,
            Admission::Limited(..)
        ));
    }

    #[tokio::test]
    async fn token_failures_count_against_the_credential_only() {
        let (l, _clock) = limiter(|c| {
            c.token.burst = 3;
            c.client_ip.burst = 1;
        });
        let app = keys(&l, "right", "192.0.2.1");
        for _ in 0..3 {
            assert_eq!(fail(&l, app, FailureClass::Token, true).await, None);
        }
        let b = fail(&l, app, FailureClass::Token, true).await.unwrap();
        assert_eq!(
            (b.class, b.kind),
            (FailureClass::Token, KeyKind::Credential)
        );
        // Another credential at the same address is untouched (its one address failure is still
        // there); non-token calls are not held.
        assert!(matches!(
            l.admit(keys(&l, "other", "192.0.2.1"), true, far()).await,
            Admission::Pass(_)
        ));
        assert!(matches!(
            l.admit(app, false, far()).await,
            Admission::Pass(_)
        ));
    }

    #[tokio::test]
    async fn concurrent_requests_wait_for_failures_left_and_successes_flow() {
        let (l, _clock) = limiter(|c| c.client_ip.burst = 2);
        // Two wrong secrets in flight use both failures the address has left.
        let (a, b) = (keys(&l, "g1", "192.0.2.9"), keys(&l, "g2", "192.0.2.9"));
        let Admission::Pass(pa) = l.admit(a, true, far()).await else {
            panic!()
        };
        let Admission::Pass(pb) = l.admit(b, true, far()).await else {
            panic!()
        };
        let third = tokio::spawn({
            let l = l.clone();
            let k = keys(&l, "g3", "192.0.2.9");
            async move { matches!(l.admit(k, true, far()).await, Admission::Pass(_)) }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!third.is_finished(), "a third waits");
        // The first was a success after all (a 2xx): the waiter goes on.
        pa.settle(Settle::Accepted);
        assert!(third.await.unwrap());
        // The second fails: one failure left, one in flight (the third's permit was dropped).
        pb.settle(Settle::Failure(FailureClass::Credential));
        let Admission::Pass(pc) = l.admit(keys(&l, "g4", "192.0.2.9"), true, far()).await else {
            panic!()
        };
        let waiting = l.admit(
            keys(&l, "g5", "192.0.2.9"),
            true,
            Instant::now() + Duration::from_millis(50),
        );
        let Admission::Limited(blocked, true) = waiting.await else {
            panic!("held past its wait")
        };
        assert_eq!(blocked.reason, BlockReason::InFlight);
        pc.settle(Settle::Failure(FailureClass::Credential));
        let Admission::Limited(blocked, _) =
            l.admit(keys(&l, "g6", "192.0.2.9"), true, far()).await
        else {
            panic!()
        };
        assert_eq!(
            (blocked.kind, blocked.reason),
            (KeyKind::ClientIp, BlockReason::Spent)
        );
    }

    #[tokio::test]
    async fn shadow_mode_reports_but_never_refuses_or_charges_the_extra() {
        let (l, _clock) = limiter(|c| {
            c.mode = FailedChecksMode::Shadow;
            c.credential.burst = 2;
        });
        let k = keys(&l, "wrong", "192.0.2.1");
        let mut would = 0;
        for _ in 0..5 {
            match l.admit(k, true, far()).await {
                Admission::Pass(p) => {
                    p.settle(Settle::Failure(FailureClass::Credential));
                }
                Admission::WouldLimit(b, p) => {
                    assert_eq!(b.retry_after_secs(), 6);
                    would += 1;
                    p.settle(Settle::Failure(FailureClass::Credential));
                }
                Admission::Limited(..) => panic!("shadow mode refused"),
            }
        }
        assert_eq!(would, 3);
        // The would-be refusals left the quota as enforcement would: one interval, no debt.
        let Admission::WouldLimit(b, _) = l.admit(k, true, far()).await else {
            panic!()
        };
        assert_eq!(b.retry_after, Duration::from_secs(6));
    }

    #[tokio::test]
    async fn shadow_mode_reports_calls_in_flight_past_failures_left_without_holding_them() {
        let (l, _clock) = limiter(|c| {
            c.mode = FailedChecksMode::Shadow;
            c.client_ip.burst = 1;
        });
        let Admission::Pass(first) = l.admit(keys(&l, "g1", "192.0.2.1"), true, far()).await else {
            panic!()
        };
        // One failure left and one call in flight: enforce would hold a second; shadow says so
        // at once and forwards it.
        let second = l.admit(keys(&l, "g2", "192.0.2.1"), true, far());
        let Ok(Admission::WouldLimit(b, _)) =
            tokio::time::timeout(Duration::from_millis(100), second).await
        else {
            panic!("shadow mode held or refused a call")
        };
        assert_eq!(
            (b.kind, b.reason),
            (KeyKind::ClientIp, BlockReason::InFlight)
        );
        drop(first);
    }

    #[tokio::test]
    async fn a_token_failure_verifies_the_credential_that_passed() {
        let (l, _clock) = limiter(|_| {});
        let app = keys(&l, "right", "192.0.2.1");
        let Admission::Pass(p) = l.admit(app, true, far()).await else {
            panic!()
        };
        p.settle(Settle::Failure(FailureClass::Token));
        assert!(
            l.is_verified(&app.credential),
            "the upstream judged the token"
        );
    }

    #[tokio::test]
    async fn an_abandoned_call_is_charged_for_each_quota_it_was_held_to() {
        let (l, _clock) = limiter(|_| {});
        let Admission::Pass(p) = l.admit(keys(&l, "g", "192.0.2.1"), true, far()).await else {
            panic!()
        };
        let charged: Vec<_> = p
            .abandon()
            .into_iter()
            .flatten()
            .map(|c| (c.class, c.kind))
            .collect();
        assert_eq!(charged, QUOTAS);
    }

    #[tokio::test]
    async fn only_presented_credentials_are_verified() {
        let (l, _clock) = limiter(|_| {});
        let anonymous = l.keys(None, "Iv1.app", "192.0.2.1".parse().unwrap());
        let Admission::Pass(p) = l.admit(anonymous, false, far()).await else {
            panic!()
        };
        p.settle(Settle::Accepted);
        assert!(!l.is_verified(&anonymous.credential));
    }

    #[tokio::test]
    async fn verification_expires_after_an_hour() {
        let (l, clock) = limiter(|_| {});
        let app = keys(&l, "right", "192.0.2.1");
        let Admission::Pass(p) = l.admit(app, true, far()).await else {
            panic!()
        };
        p.settle(Settle::Accepted);
        assert!(l.is_verified(&app.credential));
        assert_eq!(l.housekeep().verified, 1);
        clock.advance(VERIFIED_FOR);
        assert!(!l.is_verified(&app.credential));
        assert_eq!(l.housekeep().verified, 0);
    }
}
