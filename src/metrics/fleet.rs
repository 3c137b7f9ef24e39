//! The legacy-caller report of the whole fleet (`[shared]`): each replica adds what it counted
//! since its last flush to the shared store (every [`FLUSH_EVERY`], and before a fleet report
//! is read), and `/legacy-clients` shows the store's totals. The client_id cap
//! (`metrics.max_client_ids`) applies to the fleet: the store gives the first ids their own
//! entry and counts the rest under `other`. Entries are kept [`KEEP`] after their last call.
//! The Prometheus series stay per replica (Prometheus sums them).

use std::collections::HashMap;
use std::sync::PoisonError;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::{
    CallOutcome, ClientEntry, LegacyClients, MAX_AGENT_BYTES, MAX_AGENTS, MAX_CLIENT_ID_BYTES,
    Metrics, OTHER_CLIENT_ID, report_json, report_text,
};
use crate::classify::LEGACY_OPERATIONS;
use crate::shared::{Store, Unavailable};

/// How often a replica adds its counts to the fleet's report, in seconds.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Entries in one flush script, at most.
pub const FLUSH_BATCH: usize = 200;

/// How long the fleet's report keeps an entry after its last call, in seconds (30 days).
pub const KEEP: Duration = Duration::from_secs(30 * 24 * 3600);

/// What of an entry the fleet's report already has.
#[derive(Debug, Default)]
pub(super) struct Flushed {
    calls: [u64; LEGACY_OPERATIONS.len()],
    outcomes: [[u64; CallOutcome::ALL.len()]; LEGACY_OPERATIONS.len()],
    /// Counted since the last flush.
    pub(super) dirty: bool,
}

/// One entry of a flush, as the store's script takes it.
#[derive(Serialize)]
struct Delta<'a> {
    id: &'a str,
    other: bool,
    counts: HashMap<String, u64>,
    first: u64,
    last: u64,
    agents: &'a [Box<str>],
}

/// What a flush took, to be given back if the store did not take it.
struct Taken {
    id: Option<Box<str>>,
    calls: [u64; LEGACY_OPERATIONS.len()],
    outcomes: [[u64; CallOutcome::ALL.len()]; LEGACY_OPERATIONS.len()],
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn from_unix(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

impl ClientEntry {
    /// The counts not yet flushed, marked flushed.
    fn take(&mut self) -> Taken {
        let mut t = Taken {
            id: None,
            calls: self.calls,
            outcomes: self.outcomes,
        };
        for (i, n) in t.calls.iter_mut().enumerate() {
            *n -= self.flushed.calls[i];
        }
        for (i, row) in t.outcomes.iter_mut().enumerate() {
            for (j, n) in row.iter_mut().enumerate() {
                *n -= self.flushed.outcomes[i][j];
            }
        }
        self.flushed.calls = self.calls;
        self.flushed.outcomes = self.outcomes;
        self.flushed.dirty = false;
        t
    }

    /// Gives back what [`ClientEntry::take`] took.
    fn untake(&mut self, t: &Taken) {
        for (i, n) in t.calls.iter().enumerate() {
            self.flushed.calls[i] -= n;
        }
        for (i, row) in t.outcomes.iter().enumerate() {
            for (j, n) in row.iter().enumerate() {
                self.flushed.outcomes[i][j] -= n;
            }
        }
        self.flushed.dirty = true;
    }

    fn delta<'a>(&'a self, id: &'a str, other: bool, t: &Taken) -> Delta<'a> {
        let mut counts = HashMap::new();
        for (i, op) in LEGACY_OPERATIONS.iter().enumerate() {
            if t.calls[i] > 0 {
                counts.insert(format!("calls:{}", op.as_str()), t.calls[i]);
            }
            for (j, o) in CallOutcome::ALL.iter().enumerate() {
                if t.outcomes[i][j] > 0 {
                    counts.insert(
                        format!("outcome:{}:{}", op.as_str(), o.as_str()),
                        t.outcomes[i][j],
                    );
                }
            }
        }
        Delta {
            id,
            other,
            counts,
            first: unix(self.first_seen),
            last: unix(self.last_seen),
            agents: &self.agents,
        }
    }

    /// An entry of the fleet's report from the store's fields.
    fn from_fleet(fields: &HashMap<String, String>, agents: Vec<String>) -> Self {
        let num = |k: &str| fields.get(k).and_then(|v| v.parse::<u64>().ok());
        let mut e = ClientEntry::new(None, from_unix(num("first_seen").unwrap_or(0)));
        e.last_seen = from_unix(num("last_seen").unwrap_or(0));
        for (i, op) in LEGACY_OPERATIONS.iter().enumerate() {
            e.calls[i] = num(&format!("calls:{}", op.as_str())).unwrap_or(0);
            for (j, o) in CallOutcome::ALL.iter().enumerate() {
                e.outcomes[i][j] =
                    num(&format!("outcome:{}:{}", op.as_str(), o.as_str())).unwrap_or(0);
            }
        }
        let mut agents: Vec<Box<str>> = agents
            .iter()
            .map(|a| crate::report::shown(a, MAX_AGENT_BYTES).into())
            .collect();
        agents.sort();
        agents.truncate(MAX_AGENTS);
        e.agents = agents;
        e
    }
}

impl LegacyClients {
    /// The entries counted since the last flush, marked flushed, as the store's batches of at
    /// most [`FLUSH_BATCH`] entries (each one script, so Redis is never held long).
    fn take_batches(&self) -> Vec<(String, Vec<Taken>)> {
        let mut t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let table = &mut *t;
        let mut taken = Vec::new();
        for (id, e) in table.by_id.iter_mut().filter(|(_, e)| e.flushed.dirty) {
            let mut tk = e.take();
            tk.id = Some(id.clone());
            taken.push(tk);
        }
        if let Some(e) = table.other.as_mut().filter(|e| e.flushed.dirty) {
            taken.push(e.take());
        }
        let mut batches = Vec::new();
        while !taken.is_empty() {
            let rest = taken.split_off(taken.len().min(FLUSH_BATCH));
            let json = {
                let mut deltas = Vec::with_capacity(taken.len());
                for tk in &taken {
                    let found = match &tk.id {
                        Some(id) => table.by_id.get(id).map(|e| (&**id, false, e)),
                        None => table.other.as_ref().map(|e| (OTHER_CLIENT_ID, true, e)),
                    };
                    if let Some((id, other, e)) = found {
                        deltas.push(e.delta(id, other, tk));
                    }
                }
                serde_json::to_string(&deltas)
            };
            if let Ok(json) = json {
                batches.push((json, taken));
            }
            taken = rest;
        }
        batches
    }

    /// Gives back a batch the store did not take: it goes with the next flush.
    fn untake(&self, taken: Vec<Taken>) {
        let mut t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        for tk in &taken {
            let e = match &tk.id {
                Some(id) => t.by_id.get_mut(id),
                None => t.other.as_mut(),
            };
            if let Some(e) = e {
                e.untake(tk);
            }
        }
    }
}

/// The store's report (see `shared::scripts::REPORT_READ`). An empty Lua table comes out of
/// cjson as `{}`, so a list may arrive as an object.
#[derive(Deserialize)]
struct FleetReport {
    #[serde(default, deserialize_with = "list")]
    clients: Vec<FleetEntry>,
    other: Option<FleetEntry>,
}

#[derive(Deserialize)]
struct FleetEntry {
    #[serde(default)]
    id: String,
    #[serde(default, deserialize_with = "fields")]
    fields: HashMap<String, String>,
    #[serde(default, deserialize_with = "list")]
    agents: Vec<String>,
}

fn list<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Array(items) => items
            .into_iter()
            .map(|v| serde_json::from_value(v).map_err(serde::de::Error::custom))
            .collect(),
        _ => Ok(Vec::new()),
    }
}

fn fields<'de, D>(d: D) -> Result<HashMap<String, String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Object(m) => Ok(m
            .into_iter()
            .filter_map(|(k, v)| match v {
                serde_json::Value::String(s) => Some((k, s)),
                serde_json::Value::Number(n) => Some((k, n.to_string())),
                _ => None,
            })
            .collect()),
        _ => Ok(HashMap::new()),
    }
}

impl Metrics {
    /// Adds this replica's deprecated calls since the last flush to the fleet's report.
    ///
    /// # Errors
    /// [`Unavailable`] when the store did not take them; they go with the next flush.
    pub async fn flush_report(&self, store: &Store) -> Result<(), Unavailable> {
        let _one_at_a_time = self.flush.lock().await;
        let mut batches = self.clients.take_batches().into_iter();
        while let Some((batch, taken)) = batches.next() {
            let answer = store
                .report_add(&batch, self.clients.max(), KEEP, MAX_AGENTS)
                .await;
            if answer.is_err() {
                self.clients.untake(taken);
                for (_, taken) in batches {
                    self.clients.untake(taken);
                }
                return answer;
            }
        }
        Ok(())
    }

    /// The fleet's legacy-caller report (JSON, or the text table when `text`), after adding
    /// this replica's latest calls; `None` when the store is unavailable (the caller shows this
    /// replica's report, which says `"scope": "replica"`).
    pub async fn fleet_report(&self, store: &Store, text: bool) -> Option<Vec<u8>> {
        // Unflushed calls stay for the next flush: the report is still the store's.
        let _ = self.flush_report(store).await;
        let json = store.report_read(self.clients.max(), KEEP).await.ok()?;
        let report: FleetReport = serde_json::from_str(&json).ok()?;
        let entries: Vec<(String, ClientEntry)> = report
            .clients
            .iter()
            .filter(|c| !c.id.is_empty() && c.id.len() <= MAX_CLIENT_ID_BYTES)
            .map(|c| {
                (
                    c.id.clone(),
                    ClientEntry::from_fleet(&c.fields, c.agents.clone()),
                )
            })
            .collect();
        let other = report
            .other
            .map(|o| ClientEntry::from_fleet(&o.fields, o.agents));
        let view = entries.iter().map(|(id, e)| (id.as_str(), e)).collect();
        Some(match text {
            true => report_text(view, other.as_ref()).into_bytes(),
            false => report_json(view, other.as_ref(), self.clients.max(), "fleet"),
        })
    }
}
