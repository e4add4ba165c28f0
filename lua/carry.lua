-- carry.lua: step (a) of a carry-over, on the earlier round: take every site's unclaimed units
-- (remaining stock + units of expired reservations) out of the round, count them as
-- `carried_out`, and record the amounts under the carry's name, once.
--
-- Step (b) is load_batch.lua on the later round, with the recorded amounts as its items and the
-- same batch_id (the two rounds may live on different Cluster slots, so they cannot share one
-- script). A crash between the steps is healed by replaying the same request: this script then
-- answers `replay` with the amounts it recorded, and load_batch loads them (or answers replay).
-- No unit is carried twice: what is carried leaves the stock and the `expired:<site>` tally, so
-- a second carry from the same round finds nothing (and records 0).
--
-- Only after the round's pickup window (Redis TIME), and only once no unit is still reserved
-- (every confirmed reservation expired: expire.lua, which the caller runs first); otherwise
-- nothing is changed.
--
-- KEYS[1]  round metadata hash   <p>:{r:<round>}:round    pickup_end_ms
-- KEYS[2]  stock hash            <p>:{r:<round>}:stock    site_id -> units left
-- KEYS[3]  tally hash            <p>:{r:<round>}:tally    reserved:<site>, expired:<site>,
--                                                         carried_out:<site>,
--                                                         carried_expired:<site>, seq, lost
-- KEYS[4]  ledger stream         <p>:{r:<round>}:ledger
-- KEYS[5]  carries hash          <p>:{r:<round>}:carries  "<to_round>/<batch_id>" -> record
-- ARGV[1]  the later round's round_id (not empty)
-- ARGV[2]  the carry's batch_id (not empty)
-- ARGV[3]  floor: the ledger's high-water `seq` for the round, or -1 when not known (claim.lua
--          explains the integrity check)
-- returns  {'carried', record}     record: JSON {to, batch_id, items: [[site, units], ...],
--                                  parts: [[site, from_remaining, from_expired], ...], at};
--                                  sites with nothing to carry are left out (an empty list may
--                                  be encoded as {})
--          {'replay', record}      this carry was recorded before: its amounts, nothing changed
--          {'not-ready', pickup_end_ms}  the pickup window has not ended
--          {'unswept', units}      units are still reserved (confirmed reservations not yet
--                                  expired): run expire.lua to the end, then again
--          {'no-round'}
--          {'lost', mark}          the round is lost (Redis is behind the ledger)
-- errors   redis.error_reply 'ERR carry: ...' when ARGV is not a round_id, a batch_id (neither
--          empty) and a whole floor; checked before anything is written
-- Times are milliseconds since the epoch, from Redis TIME, never from the client.

local function whole(text)
  local x = tonumber(text)
  if x and x == x and x > -math.huge and x < math.huge and x == math.floor(x) then
    return x
  end
  return nil
end

local to_round, batch_id = ARGV[1], ARGV[2]
local floor = whole(ARGV[3])
if #ARGV ~= 3 or not to_round or to_round == '' or not batch_id or batch_id == ''
    or not floor then
  return redis.error_reply('ERR carry: ARGV must be to_round, batch_id, floor')
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local state = redis.call('HMGET', KEYS[3], 'seq', 'lost')
local seq, lost = tonumber(state[1]) or 0, state[2]
if not lost and seq < floor then
  lost = cjson.encode({at = now, redis = seq, ledger = floor})
  redis.call('HSET', KEYS[3], 'lost', lost)
end
if lost then
  return {'lost', lost}
end

local pickup_end = redis.call('HGET', KEYS[1], 'pickup_end_ms')
if not pickup_end then
  return {'no-round'}
end
local name = to_round .. '/' .. batch_id
local seen = redis.call('HGET', KEYS[5], name)
if seen then
  return {'replay', seen}
end
if now < tonumber(pickup_end) then
  return {'not-ready', pickup_end}
end

local tally = redis.call('HGETALL', KEYS[3])
local reserved, expired = 0, {}
for i = 1, #tally, 2 do
  local field, value = tally[i], tonumber(tally[i + 1])
  if string.sub(field, 1, 9) == 'reserved:' then
    reserved = reserved + value
  elseif string.sub(field, 1, 8) == 'expired:' then
    expired[string.sub(field, 9)] = value
  end
end
if reserved > 0 then
  return {'unswept', tostring(reserved)}
end

local units = {}
local stock = redis.call('HGETALL', KEYS[2])
for i = 1, #stock, 2 do
  units[stock[i]] = {tonumber(stock[i + 1]), 0}
end
for site, value in pairs(expired) do
  units[site] = units[site] or {0, 0}
  units[site][2] = value
end
local sites = {}
for site, u in pairs(units) do
  if u[1] + u[2] > 0 then
    sites[#sites + 1] = site
  end
end
table.sort(sites)

local items, parts = {}, {}
for _, site in ipairs(sites) do
  local from_remaining, from_expired = units[site][1], units[site][2]
  items[#items + 1] = {site, from_remaining + from_expired}
  parts[#parts + 1] = {site, from_remaining, from_expired}
  if from_remaining > 0 then
    redis.call('HINCRBY', KEYS[2], site, -from_remaining)
  end
  if from_expired > 0 then
    redis.call('HINCRBY', KEYS[3], 'expired:' .. site, -from_expired)
    redis.call('HINCRBY', KEYS[3], 'carried_expired:' .. site, from_expired)
  end
  redis.call('HINCRBY', KEYS[3], 'carried_out:' .. site, from_remaining + from_expired)
end
local record = cjson.encode({
  to = to_round, batch_id = batch_id, items = items, parts = parts, at = now,
})
redis.call('HSET', KEYS[5], name, record)
seq = redis.call('HINCRBY', KEYS[3], 'seq', 1)
redis.call('XADD', KEYS[4], '*', 'kind', 'carry', 'record', record, 'seq', tostring(seq))
return {'carried', record}
