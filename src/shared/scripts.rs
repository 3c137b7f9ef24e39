//! The Lua scripts the gateway runs in Redis. Each is atomic (Redis runs one script at a time)
//! and reads the Redis server's own clock (`TIME`), so replicas whose clocks disagree still
//! agree on every quota. Loaded once per connection and called by SHA-1 (`EVALSHA`, falling
//! back to `EVAL` after a `NOSCRIPT`, as redis-rs' `Script` does). Every key a script writes has
//! an expiry, so Redis memory stays bounded without housekeeping.
//!
//! Keys of the quota scripts, in this order (`KEYS[1..7]`):
//! 1. `{prefix}verified:{credential}`: present while the credential is verified;
//! 2. to 4. `{prefix}gcra:{quota}:{key}`: the theoretical arrival time (TAT) of the quotas
//!    credential, client_ip and token, in microseconds of the Redis clock; expires when the key
//!    is back at full burst (TAT reached);
//! 5. to 7. `{prefix}flight:{quota}:{key}`: reservations in flight (a sorted set of reservation
//!    ids scored by when they lapse, in microseconds); expires with its last reservation.
//!
//! GCRA as in redis-cell and rwz/redis-gcra: a key may fail `burst` times back to back, then once
//! per `period`; a failure charged past a spent quota is kept as debt (the TAT moves on).

/// The gate before forwarding: reads the quotas a call is held to, never charges. Refuses when
/// one is spent (answers the longest wait), or when a quota has as many reservations in flight
/// as failures left; otherwise reserves one slot in each quota held.
///
/// `ARGV`: 1 held (`1`: the credential and client_ip quotas, unless the credential is
/// verified), 2 token (`1`: the token quota), 3 to 8 period (µs) and burst of each quota,
/// 9 reservation id, 10 reservation lifetime (ms).
///
/// Returns `{verified, outcome, quota, wait_us}`: outcome 0 reserved, 1 spent (quota 1..3 and
/// the wait until it may fail again), 2 busy (quota 1..3).
pub const ADMIT: &str = r"
redis.replicate_commands()
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local verified = redis.call('EXISTS', KEYS[1])
local held = ARGV[1] == '1' and verified == 0
local wanted = {held, held, ARGV[2] == '1'}
local left = {0, 0, 0}
local worst, worst_wait = 0, -1
for i = 1, 3 do
  if wanted[i] then
    local period = tonumber(ARGV[1 + 2 * i])
    local burst = tonumber(ARGV[2 + 2 * i])
    local tat = tonumber(redis.call('GET', KEYS[1 + i]) or now)
    local over = math.max(tat - now, 0)
    local l = math.floor((burst * period - over) / period)
    if l <= 0 then
      local wait = over - (burst - 1) * period
      if wait > worst_wait then
        worst, worst_wait = i, wait
      end
    end
    left[i] = l
  end
end
if worst > 0 then
  return {verified, 1, worst, math.max(worst_wait, 0)}
end
for i = 1, 3 do
  if wanted[i] then
    redis.call('ZREMRANGEBYSCORE', KEYS[4 + i], '-inf', now)
    if redis.call('ZCARD', KEYS[4 + i]) >= left[i] then
      return {verified, 2, i, 0}
    end
  end
end
local life = tonumber(ARGV[10])
for i = 1, 3 do
  if wanted[i] then
    redis.call('ZADD', KEYS[4 + i], string.format('%.0f', now + life * 1000), ARGV[9])
    -- Never shortens the set's life: an older reservation may last longer.
    if redis.call('PTTL', KEYS[4 + i]) < life then
      redis.call('PEXPIRE', KEYS[4 + i], life)
    end
  end
end
return {verified, 0, 0, 0}
";

/// After the answer: gives back the call's reservation and records its outcome.
///
/// `ARGV`: 1 what (`c` a credential failure, `t` a token failure, `ct` both, for a call whose
/// answer will never be known; `a` accepted; `n` nothing learnt), 2 basic (`1`: the credential
/// can be verified), 3 to 8 period (µs) and burst of each quota, 9 reservation id (`""`:
/// none), 10 how long a verification lasts (ms).
///
/// Returns `{credential, client_ip, token}`: 0 not charged, 1 charged, 2 charged and now spent.
pub const SETTLE: &str = r"
redis.replicate_commands()
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if ARGV[9] ~= '' then
  for i = 1, 3 do
    redis.call('ZREM', KEYS[4 + i], ARGV[9])
  end
end
local function charge(i)
  local period = tonumber(ARGV[1 + 2 * i])
  local burst = tonumber(ARGV[2 + 2 * i])
  local tat = math.max(tonumber(redis.call('GET', KEYS[1 + i]) or now), now) + period
  redis.call('SET', KEYS[1 + i], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
  if math.floor((burst * period - (tat - now)) / period) <= 0 then
    return 2
  end
  return 1
end
local what = ARGV[1]
local basic = ARGV[2] == '1'
local out = {0, 0, 0}
if what == 'c' or what == 'ct' then
  redis.call('DEL', KEYS[1])
  out[1] = charge(1)
  out[2] = charge(2)
end
if what == 't' or what == 'ct' then
  out[3] = charge(3)
end
if (what == 't' or what == 'a') and basic then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[10])
end
return out
";

/// Adds one replica's deprecated calls since its last flush to the fleet's report.
///
/// `KEYS[1]`: `{prefix}report:clients`, the client_ids with an entry of their own (a sorted set
/// scored by last seen, Unix seconds); `KEYS[2]`: `{prefix}report:other`, the entry of every
/// client_id past the cap. An id's entry is the hash `{prefix}report:client:{hex of the id}`
/// and its user agents the set `{prefix}report:agents:{hex of the id}`
/// (`{prefix}report:other-agents` for `other`): whatever a caller puts in a client_id, no two
/// keys can collide.
/// `ARGV`: 1 prefix, 2 the cap on client_ids with an entry (`metrics.max_client_ids`, for the
/// whole fleet), 3 how long an entry is kept after its last call (seconds), 4 user agents kept
/// per entry, 5 the batch as JSON: `[{"id", "other", "counts": {field: n}, "first", "last",
/// "agents": [..]}]`, counts under `calls:{operation}` and `outcome:{operation}:{outcome}`.
pub const REPORT_ADD: &str = r"
redis.replicate_commands()
local prefix = ARGV[1]
local cap = tonumber(ARGV[2])
local keep = tonumber(ARGV[3])
local max_agents = tonumber(ARGV[4])
local batch = cjson.decode(ARGV[5])
local function hex(id)
  return (string.gsub(id, '.', function(c) return string.format('%02x', string.byte(c)) end))
end
local t = redis.call('TIME')
local now = tonumber(t[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - keep)
for _, e in ipairs(batch) do
  local key = KEYS[2]
  local agents = prefix .. 'report:other-agents'
  if not e.other then
    local known = redis.call('ZSCORE', KEYS[1], e.id)
    if known or redis.call('ZCARD', KEYS[1]) < cap then
      redis.call('ZADD', KEYS[1], now, e.id)
      key = prefix .. 'report:client:' .. hex(e.id)
      agents = prefix .. 'report:agents:' .. hex(e.id)
    end
  end
  for field, n in pairs(e.counts) do
    redis.call('HINCRBY', key, field, n)
  end
  local first = tonumber(redis.call('HGET', key, 'first_seen') or e.first)
  redis.call('HSET', key, 'first_seen', string.format('%.0f', math.min(first, e.first)))
  local last = tonumber(redis.call('HGET', key, 'last_seen') or e.last)
  redis.call('HSET', key, 'last_seen', string.format('%.0f', math.max(last, e.last)))
  for _, a in ipairs(e.agents) do
    if redis.call('SCARD', agents) < max_agents or redis.call('SISMEMBER', agents, a) == 1 then
      redis.call('SADD', agents, a)
    end
  end
  redis.call('EXPIRE', key, keep)
  if redis.call('EXISTS', agents) == 1 then
    redis.call('EXPIRE', agents, keep)
  end
end
redis.call('EXPIRE', KEYS[1], keep)
return #batch
";

/// The fleet's report: every entry as JSON, `{"clients": [{"id", "fields": {..}, "agents":
/// [..]}], "other": {"fields": {..}, "agents": [..]} or absent}`.
///
/// `KEYS` and `ARGV[1..3]` as [`REPORT_ADD`].
pub const REPORT_READ: &str = r"
redis.replicate_commands()
local prefix = ARGV[1]
local keep = tonumber(ARGV[3])
local t = redis.call('TIME')
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(t[1]) - keep)
local function hex(id)
  return (string.gsub(id, '.', function(c) return string.format('%02x', string.byte(c)) end))
end
local function entry(key, agents)
  local flat = redis.call('HGETALL', key)
  if #flat == 0 then
    return nil
  end
  local fields = {}
  for i = 1, #flat, 2 do
    fields[flat[i]] = flat[i + 1]
  end
  return {fields = fields, agents = redis.call('SMEMBERS', agents)}
end
local clients = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local e = entry(prefix .. 'report:client:' .. hex(id), prefix .. 'report:agents:' .. hex(id))
  if e then
    e.id = id
    table.insert(clients, e)
  end
end
return cjson.encode({clients = clients, other = entry(KEYS[2], prefix .. 'report:other-agents')})
";
