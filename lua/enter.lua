-- enter.lua: admit and decide lottery entries for one round, one or many requests in one atomic
-- step (the entries' claim.lua).
--
-- Each item is checked in order, as claim.lua checks a claim: the token buckets (whole round,
-- client address, citizen; the same gate as claim.lua, allocator/gate.py), the round (it must
-- be a lottery round), the registration window, then the citizen, then the citizen's cooldown
-- in the round's programme (as claim.lua), and only then is anything changed. There is no stock check: entries take no units. One item's refusal never affects
-- another; items are decided in order, so the same citizen twice in one call behaves exactly as
-- two calls would. The round's integrity comes first, as in claim.lua (`seq` against the floor).
--
-- KEYS[1]   round metadata hash    <p>:{r:<round>}:round      opens_ms, closes_ms, mode,
--                                                             programme
-- KEYS[2]   entries hash           <p>:{r:<round>}:entries    entry_id -> record (JSON)
-- KEYS[3]   entrants hash          <p>:{r:<round>}:entrants   citizen hash -> entry_id (live)
-- KEYS[4]   tally hash             <p>:{r:<round>}:tally      entries:<site>, seq, lost
-- KEYS[5]   ledger stream          <p>:{r:<round>}:ledger     one entry per state change
-- KEYS[6]   round token bucket     <p>:{r:<round>}:gate:global
-- KEYS[7]   entitlement hash       <p>:{p:<programme>}:entitled citizen hash ->
--           "<until_ms> <reservation_id>" (claim.lua and award.lua write it): read, never
--           written, and only when the round hash has a `programme` (then every key here is
--           under the programme's tag, one slot)
-- KEYS[8..] per-item keys, referred to by index from ARGV: client and citizen token buckets
--           <p>:{r:<round>}:gate:client:<hmac of address>, <p>:{r:<round>}:gate:citizen:<hash>
-- ARGV[1]   number of items n
-- ARGV[2..7] bucket rates (tokens per second) and bursts (tokens), as claim.lua's ARGV[2..7]
-- ARGV[8]   floor: the ledger's high-water `seq` for the round, or -1 when not known
-- ARGV[9..] n items, one string each of 10 space-separated fields: client bucket key index
--           (0: none, a desk's entry skips the per-address bucket), citizen bucket key index
--           (into KEYS), site_id, citizen hash, phone hash, masked citizen id, new entry_id,
--           accept_district (0 or 1), channel (desk | web | mini-program | api), age band
--           (0-17 | 18-39 | 40-64 | 65+, at the round's opening date; for the fairness report)
-- returns   one reply per item, in order:
--           {'created', record} | {'existing', record} (same citizen and phone: the entry, now
--           with this item's site_id and accept_district) | {'already-entered'} (another phone) |
--           {'in-cooldown', until_ms} (a live reservation in another round of the programme
--           bars the citizen until then: no entry is made, an existing one is left unchanged) |
--           {'not-open', opens_ms, closes_ms} | {'no-round'} | {'wrong-mode'} (an fcfs round) |
--           {'gated', retry_after_ms, bucket} | {'lost', mark} for every item when lost
--           record: JSON {id, site, acc (0|1), status, cit, ph, mask, created, updated, ch,
--           age}; ch and age are those of the item that created the entry (a later item of
--           the same citizen changes only site and acc)
-- errors    redis.error_reply 'ERR enter: ...' when ARGV is not a whole n >= 1, six bucket
--           settings (numbers > 0), a whole floor and n items, or an item has not 10 fields, a
--           key index outside KEYS[8..] (0 allowed for the client bucket) or accept_district
--           not 0/1; all checked before any write
-- Times are milliseconds since the epoch, from Redis TIME, never from the client.

local HEAD = 9
local ITEM_KEYS = 8 -- first per-item key in KEYS

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
  return redis.error_reply('ERR enter: ' .. why)
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
  if #f ~= 10 then
    return refuse('item ' .. i .. ' must have 10 fields')
  end
  for k = 1, 2 do
    local at = whole(f[k])
    if not at or (at < ITEM_KEYS and not (k == 1 and at == 0)) or at > #KEYS then
      return refuse('item ' .. i .. ': key index ' .. k .. ' must point into KEYS[8..]')
    end
    f[k] = at
  end
  if f[8] ~= '0' and f[8] ~= '1' then
    return refuse('item ' .. i .. ': accept_district must be 0 or 1')
  end
  items[i] = f
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- integrity first (the same few lines open every script that changes a round)
local state = redis.call('HMGET', KEYS[4], 'seq', 'lost')
local seq, lost = tonumber(state[1]) or 0, state[2]
if not lost and seq < floor then
  lost = cjson.encode({at = now, redis = seq, ledger = floor})
  redis.call('HSET', KEYS[4], 'lost', lost)
end
if lost then
  local replies = {}
  for i = 1, n do
    replies[i] = {'lost', lost}
  end
  return replies
end
local first_seq = seq

local round = redis.call('HMGET', KEYS[1], 'opens_ms', 'closes_ms', 'mode', 'programme')
local opens, closes, mode = tonumber(round[1]), tonumber(round[2]), round[3]

-- Cooldown, as claim.lua reads it: the bars of this call's citizens, one HMGET. A bar set by a
-- reservation of this very round (a won entry's, after the draw) is not a bar on entering it:
-- entering is closed by then anyway. Entries set no bar (only reservations do).
local bars = {}
if round[4] and round[4] ~= '' then
  local citizens = {}
  for i = 1, n do
    citizens[i] = items[i][4]
  end
  local found = redis.call('HMGET', KEYS[7], unpack(citizens))
  for i = 1, n do
    if found[i] then
      local until_ms, held_id = string.match(found[i], '^(%d+) (%S+)$')
      bars[citizens[i]] = {until_ms = tonumber(until_ms), id = held_id}
    end
  end
end
local function round_of(id)
  return string.match(id or '', '%.(.*)$')
end
local function barred(citizen, entry_id)
  local bar = bars[citizen]
  if bar and bar.until_ms and bar.until_ms > now and round_of(bar.id) ~= round_of(entry_id) then
    return bar.until_ms
  end
  return nil
end

-- The gate, exactly as in claim.lua (tests/test_lottery.py compares the two functions).
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

local function log_entry(record)
  seq = seq + 1
  redis.call('XADD', KEYS[5], '*', 'kind', 'entry', 'record', record, 'seq', tostring(seq))
end

local replies = {}
for i = 1, n do
  local f = items[i]
  local gates = {bucket(KEYS[6], 'global')}
  if f[1] > 0 then
    gates[#gates + 1] = bucket(KEYS[f[1]], 'client')
  end
  gates[#gates + 1] = bucket(KEYS[f[2]], 'citizen')
  local site_id, citizen, phone, masked, entry_id = f[3], f[4], f[5], f[6], f[7]
  local accept = tonumber(f[8])
  local channel, age = f[9], f[10]

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
    elseif mode ~= 'lottery' then
      reply = {'wrong-mode'}
    elseif now < opens or now >= closes then
      reply = {'not-open', tostring(opens), tostring(closes)}
    else
      local held = redis.call('HGET', KEYS[3], citizen)
      local until_ms = barred(citizen, entry_id)
      if held then
        local record = redis.call('HGET', KEYS[2], held)
        local r = cjson.decode(record)
        if r.ph ~= phone then
          reply = {'already-entered'}
        elseif until_ms then
          reply = {'in-cooldown', tostring(until_ms)}
        else
          -- the last choice before close counts
          if r.site ~= site_id or r.acc ~= accept then
            if r.site ~= site_id then
              redis.call('HINCRBY', KEYS[4], 'entries:' .. r.site, -1)
              redis.call('HINCRBY', KEYS[4], 'entries:' .. site_id, 1)
            end
            r.site, r.acc, r.updated = site_id, accept, now
            record = cjson.encode(r)
            redis.call('HSET', KEYS[2], held, record)
            log_entry(record)
          end
          reply = {'existing', record}
        end
      elseif until_ms then
        reply = {'in-cooldown', tostring(until_ms)}
      else
        local record = cjson.encode({
          id = entry_id, site = site_id, acc = accept, status = 'registered',
          cit = citizen, ph = phone, mask = masked, created = now, updated = now,
          ch = channel, age = age,
        })
        redis.call('HSET', KEYS[2], entry_id, record)
        redis.call('HSET', KEYS[3], citizen, entry_id)
        redis.call('HINCRBY', KEYS[4], 'entries:' .. site_id, 1)
        log_entry(record)
        reply = {'created', record}
      end
    end
  end
  replies[i] = reply
end

if seq ~= first_seq then
  redis.call('HSET', KEYS[4], 'seq', tostring(seq))
end
for key, b in pairs(buckets) do
  if b.dirty then
    redis.call('HSET', key, 't', tostring(b.tokens), 'ts', tostring(now))
    redis.call('PEXPIRE', key, math.ceil(b.burst / b.rate * 1000) + 1000)
  end
end
return replies
