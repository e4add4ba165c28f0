-- claim.lua: admit and decide reservations for one round, one or many requests in one atomic step.
--
-- Each item is checked in order: the token buckets (whole round, client address, citizen), the
-- round window, then the citizen (a duplicate never touches stock), then the citizen's cooldown
-- in the round's programme, then stock, and only then is anything changed. One item's refusal
-- never affects another; items are decided in order, so the same citizen twice in one call
-- behaves exactly as two calls would.
--
-- Before any item, the round's integrity: every change to a round bumps its sequence number
-- (tally field `seq`, carried in each ledger entry), and the caller passes the highest `seq` the
-- ledger in PostgreSQL has committed (the floor). A Redis whose `seq` is below the floor has lost
-- changes the ledger has (restored from an old AOF, or emptied): the round is marked lost (tally
-- field `lost`, sticky until `allot rebuild`), every item answers `lost`, and nothing else changes.
--
-- KEYS[1]   round metadata hash    <p>:{r:<round>}:round        opens_ms, closes_ms, per_person,
--                                                               mode, programme, cooldown_days
-- KEYS[2]   stock hash             <p>:{r:<round>}:stock        site_id -> units left
-- KEYS[3]   holders hash           <p>:{r:<round>}:holders      citizen hash -> reservation_id
-- KEYS[4]   reservations hash      <p>:{r:<round>}:reservations reservation_id -> record (JSON)
-- KEYS[5]   tally hash             <p>:{r:<round>}:tally        reserved:<site>, created, seq, lost
-- KEYS[6]   ledger stream          <p>:{r:<round>}:ledger       one entry per state change
-- KEYS[7]   round token bucket     <p>:{r:<round>}:gate:global  hash t (tokens), ts (ms)
-- KEYS[8]   entitlement hash       <p>:{p:<programme>}:entitled citizen hash ->
--           "<until_ms> <reservation_id>": the programme's cooldowns, read and written only when
--           the round hash has a `programme` (a round of a programme has all its keys under the
--           programme's tag {p:<programme>} instead of {r:<round>}, so this is one slot too)
-- KEYS[9..] per-item keys, referred to by index from ARGV:
--           pickup codes of a site <p>:{r:<round>}:codes:<site>      code -> reservation_id
--           holders of a site      <p>:{r:<round>}:siteholders:<site> set of citizen hashes
--           client token bucket    <p>:{r:<round>}:gate:client:<hmac of address>
--           citizen token bucket   <p>:{r:<round>}:gate:citizen:<citizen hash>
--           askers of a group      <p>:{r:<round>}:fair:asked:<dimension>:<group>  set of
--                                  citizen hashes (district, age_band, channel): who reserved
--                                  or was refused sold-out (the fairness report's `asked`)
-- ARGV[1]   number of items n
-- ARGV[2..7] bucket rates (tokens per second) and bursts (tokens):
--           global rate, global burst, client rate, client burst, citizen rate, citizen burst
-- ARGV[8]   floor: the ledger's high-water `seq` for the round, or -1 when the caller does not
--           know it (then only a `lost` mark already set refuses)
-- ARGV[9..] n items, one string each of 18 space-separated fields (one argument per item keeps
--           the client's packing cheap; no field can contain a space):
--           codes key index, site-holders key index, client bucket key index (0: none, a desk's
--           claim skips the per-address bucket), citizen bucket key index, askers key indexes
--           for the district, age band and channel (0: not counted), all into KEYS; site_id,
--           citizen hash (hex), phone hash (hex), masked citizen id, new reservation_id,
--           channel (desk | web | mini-program | api), age band (0-17 | 18-39 | 40-64 | 65+),
--           region (the ID's six-digit issuing prefix), three candidate pickup codes
-- returns   one reply per item, in order:
--           {'created', record} | {'existing', record} | {'already-reserved'} |
--           {'in-cooldown', until_ms} (a live reservation in another round of the programme
--           bars the citizen until then) |
--           {'sold-out', units left} | {'not-open', opens_ms, closes_ms} | {'no-round'} |
--           {'wrong-mode'} (a lottery round: citizens enter it, lua/enter.lua) |
--           {'gated', retry_after_ms, bucket} (bucket: global | client | citizen) |
--           {'no-code'} (every candidate pickup code was taken; retry with new ones) |
--           {'lost', mark} for every item when the round is lost (mark: JSON {at, redis, ledger})
-- errors    redis.error_reply 'ERR claim: ...' when ARGV is not a whole n >= 1, six bucket
--           settings (numbers > 0), a whole floor and n items, or an item has not 18 fields or
--           a key index outside KEYS[9..] (0 allowed where said); all checked before anything
--           is written
-- Times are milliseconds since the epoch, from Redis TIME, never from the client.

local HEAD = 9 -- first item in ARGV
local ITEM_KEYS = 9 -- first per-item key in KEYS
local DAY_MS = 86400000

-- Every argument is checked before anything is written (a script does not roll back: an
-- error on item k must not leave items < k committed).
local function number(text)
  local x = tonumber(text)
  if x and x == x and x > -math.huge and x < math.huge then
    return x
  end
  return nil
end

local function whole(text)
  local x = number(text)
  if x and x == math.floor(x) then
    return x
  end
  return nil
end

local function refuse(why)
  return redis.error_reply('ERR claim: ' .. why)
end

local n = whole(ARGV[1])
local floor = whole(ARGV[8])
if not n or n < 1 or not floor or #ARGV ~= HEAD - 1 + n then
  return refuse('ARGV must be n, six bucket settings, floor, then n items')
end
local settings = {}
for i = 2, 7 do
  settings[i] = number(ARGV[i])
  if not settings[i] or settings[i] <= 0 then
    return refuse('bucket rates and bursts must be numbers above 0')
  end
end
local items = {}
for i = 1, n do
  local f = {}
  for field in string.gmatch(ARGV[HEAD + i - 1], '%S+') do
    f[#f + 1] = field
  end
  if #f ~= 18 then
    return refuse('item ' .. i .. ' must have 18 fields')
  end
  for k = 1, 7 do
    local at = whole(f[k])
    local optional = k == 3 or k >= 5 -- the client bucket and the askers sets may be 0: none
    if not at or (at < ITEM_KEYS and not (optional and at == 0)) or at > #KEYS then
      return refuse('item ' .. i .. ': key index ' .. k .. ' must point into KEYS[9..]')
    end
    f[k] = at
  end
  items[i] = f
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- integrity first (the same few lines open every script that changes a round)
local state = redis.call('HMGET', KEYS[5], 'seq', 'lost')
local seq, lost = tonumber(state[1]) or 0, state[2]
if not lost and seq < floor then
  lost = cjson.encode({at = now, redis = seq, ledger = floor})
  redis.call('HSET', KEYS[5], 'lost', lost)
end
if lost then
  local replies = {}
  for i = 1, n do
    replies[i] = {'lost', lost}
  end
  return replies
end
local first_seq = seq

local round = redis.call('HMGET', KEYS[1], 'opens_ms', 'closes_ms', 'per_person', 'mode',
  'programme', 'cooldown_days')
local opens, closes, per_person = tonumber(round[1]), tonumber(round[2]), tonumber(round[3])
-- a lottery round takes entries, not reservations: refused with the round check, before the
-- round window (the order gate, round, window, citizen, stock is unchanged)
local lottery = round[4] == 'lottery'

-- Cooldown (allocator/entitlement.py): a live reservation in one round of a programme bars its
-- citizen from every other round of it until created + that round's cooldown_days. The bars of
-- this call's citizens are read with one HMGET, kept here while the items are decided (a claim
-- made by an earlier item bars a later one at once), and written as claims are made.
local programme = round[5] and round[5] ~= ''
local cooldown_ms = (tonumber(round[6]) or 0) * DAY_MS
local bars = {}
if programme then
  local citizens = {}
  for i = 1, n do
    citizens[i] = items[i][9]
  end
  local found = redis.call('HMGET', KEYS[8], unpack(citizens))
  for i = 1, n do
    if found[i] then
      local until_ms, held_id = string.match(found[i], '^(%d+) (%S+)$')
      bars[citizens[i]] = {until_ms = tonumber(until_ms), id = held_id}
    end
  end
end
-- the round part of a reservation_id ("<secret>.<round_id>"): a bar set in this very round is
-- the citizen's own reservation here, which the citizen check has already answered
local function round_of(reservation_id)
  return string.match(reservation_id, '%.(.*)$')
end

-- The gate: three token buckets (allocator/gate.py), read once per call, kept here while the
-- items are decided, written once at the end. A claim the gate refuses changes nothing else.
local limits = {
  global = {settings[2], settings[3]},
  client = {settings[4], settings[5]},
  citizen = {settings[6], settings[7]},
}
local buckets = {}
local function bucket(key, kind)
  local b = buckets[key]
  if not b then
    local rate, burst = limits[kind][1], limits[kind][2]
    local saved = redis.call('HMGET', key, 't', 'ts')
    local tokens, ts = tonumber(saved[1]), tonumber(saved[2])
    if not tokens then
      tokens, ts = burst, now
    end
    tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
    b = {tokens = tokens, rate = rate, burst = burst, kind = kind, dirty = false}
    buckets[key] = b
  end
  return b
end

local replies = {}
for i = 0, n - 1 do
  local f = items[i + 1]
  local codes_key = KEYS[f[1]]
  local site_holders_key = KEYS[f[2]]
  local gates = {bucket(KEYS[7], 'global')}
  if f[3] > 0 then
    gates[#gates + 1] = bucket(KEYS[f[3]], 'client')
  end
  gates[#gates + 1] = bucket(KEYS[f[4]], 'citizen')
  local askers = {f[5], f[6], f[7]}
  local site_id = f[8]
  local citizen = f[9]
  local phone = f[10]
  local masked = f[11]
  local reservation_id = f[12]
  local channel, age, reg = f[13], f[14], f[15]
  local function asked()
    for _, at in ipairs(askers) do
      if at > 0 then
        redis.call('SADD', KEYS[at], citizen)
      end
    end
  end

  local wait, refused_by = 0, nil
  for _, b in ipairs(gates) do
    if b.tokens < 1 then
      local need = math.ceil((1 - b.tokens) * 1000 / b.rate)
      if need > wait then
        wait, refused_by = need, b.kind
      end
    end
  end

  local reply
  if refused_by then
    reply = {'gated', tostring(wait), refused_by}
  else
    for _, b in ipairs(gates) do
      b.tokens = b.tokens - 1
      b.dirty = true
    end
    if not opens then
      reply = {'no-round'}
    elseif lottery then
      reply = {'wrong-mode'}
    elseif now < opens or now >= closes then
      reply = {'not-open', tostring(opens), tostring(closes)}
    else
      local held = redis.call('HGET', KEYS[3], citizen)
      if held then
        local record = redis.call('HGET', KEYS[4], held)
        local r = cjson.decode(record)
        if r.site == site_id and r.ph == phone then
          reply = {'existing', record}
        else
          reply = {'already-reserved'}
        end
      else
        -- the cooldown: checked before stock, so a barred citizen never reads or takes a unit
        local bar = bars[citizen]
        local barred = bar and bar.until_ms and bar.until_ms > now
          and round_of(bar.id) ~= round_of(reservation_id)
        local left = barred and 0 or tonumber(redis.call('HGET', KEYS[2], site_id) or '0')
        if barred then
          reply = {'in-cooldown', tostring(bar.until_ms)}
        elseif left < per_person then
          asked()
          reply = {'sold-out', tostring(left)}
        else
          local code = nil
          for c = 16, 18 do
            if redis.call('HEXISTS', codes_key, f[c]) == 0 then
              code = f[c]
              break
            end
          end
          if not code then
            reply = {'no-code'}
          else
            local record = cjson.encode({
              id = reservation_id, site = site_id, qty = per_person, status = 'confirmed',
              code = code, cit = citizen, ph = phone, mask = masked,
              created = now, updated = now, ch = channel, age = age, reg = reg,
            })
            asked()
            redis.call('HINCRBY', KEYS[2], site_id, -per_person)
            redis.call('HSET', codes_key, code, reservation_id)
            redis.call('SADD', site_holders_key, citizen)
            redis.call('HSET', KEYS[3], citizen, reservation_id)
            redis.call('HSET', KEYS[4], reservation_id, record)
            if programme and cooldown_ms > 0 then
              local until_ms = now + cooldown_ms
              redis.call('HSET', KEYS[8], citizen, until_ms .. ' ' .. reservation_id)
              bars[citizen] = {until_ms = until_ms, id = reservation_id}
            end
            redis.call('HINCRBY', KEYS[5], 'reserved:' .. site_id, per_person)
            redis.call('HINCRBY', KEYS[5], 'created', 1)
            seq = seq + 1
            redis.call('XADD', KEYS[6], '*', 'kind', 'reservation', 'record', record,
              'seq', tostring(seq))
            reply = {'created', record}
          end
        end
      end
    end
  end
  replies[i + 1] = reply
end

if seq ~= first_seq then
  redis.call('HSET', KEYS[5], 'seq', tostring(seq))
end
for key, b in pairs(buckets) do
  if b.dirty then
    redis.call('HSET', key, 't', tostring(b.tokens), 'ts', tostring(now))
    -- an idle bucket is full again after burst / rate seconds; then it need not exist
    redis.call('PEXPIRE', key, math.ceil(b.burst / b.rate * 1000) + 1000)
  end
end
return replies
