-- cancel.lua: cancel a reservation and give its units back to the site, atomically.
--
-- KEYS[1]  round metadata hash   <p>:{r:<round>}:round         pickup_end_ms
-- KEYS[2]  stock hash            <p>:{r:<round>}:stock         site_id -> units left
-- KEYS[3]  holders hash          <p>:{r:<round>}:holders       citizen hash -> reservation_id
-- KEYS[4]  reservations hash     <p>:{r:<round>}:reservations  reservation_id -> record (JSON)
-- KEYS[5]  tally hash            <p>:{r:<round>}:tally         reserved:<site>, seq, lost
-- KEYS[6]  ledger stream         <p>:{r:<round>}:ledger
-- KEYS[7]  entitlement hash      <p>:{p:<programme>}:entitled  citizen hash ->
--          "<until_ms> <reservation_id>" (claim.lua); the bar this reservation set is lifted.
--          A round in no programme passes <p>:{r:<round>}:entitled, which holds nothing
-- ARGV[1]  reservation_id
-- ARGV[2]  floor: the ledger's high-water `seq` for the round, or -1 when not known (claim.lua
--          explains the integrity check)
-- returns  {'cancelled', record}          now cancelled (or was already: cancelling is idempotent)
--          {'not-collectable', record}    collected, or past the pickup window (expired)
--          {'not-found'}
--          {'lost', mark}                 the round is lost (Redis is behind the ledger)
-- errors   redis.error_reply 'ERR cancel: ...' when ARGV is not a reservation_id (not empty) and a
--          whole floor; checked before anything is written
-- Times are milliseconds since the epoch, from Redis TIME, never from the client.

local function whole(text)
  local x = tonumber(text)
  if x and x == x and x > -math.huge and x < math.huge and x == math.floor(x) then
    return x
  end
  return nil
end

local reservation_id = ARGV[1]
local floor = whole(ARGV[2])
if #ARGV ~= 2 or reservation_id == '' or not floor then
  return redis.error_reply('ERR cancel: ARGV must be reservation_id, floor')
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local state = redis.call('HMGET', KEYS[5], 'seq', 'lost')
local seq, lost = tonumber(state[1]) or 0, state[2]
if not lost and seq < floor then
  lost = cjson.encode({at = now, redis = seq, ledger = floor})
  redis.call('HSET', KEYS[5], 'lost', lost)
end
if lost then
  return {'lost', lost}
end

local record = redis.call('HGET', KEYS[4], reservation_id)
if not record then
  return {'not-found'}
end
local r = cjson.decode(record)
if r.status == 'cancelled' then
  return {'cancelled', record}
end
local pickup_end = tonumber(redis.call('HGET', KEYS[1], 'pickup_end_ms') or '0')
if r.status ~= 'confirmed' or now >= pickup_end then
  return {'not-collectable', record}
end

r.status = 'cancelled'
r.updated = now
record = cjson.encode(r)
redis.call('HSET', KEYS[4], reservation_id, record)
if redis.call('HGET', KEYS[3], r.cit) == reservation_id then
  redis.call('HDEL', KEYS[3], r.cit)
end
-- a cancelled reservation bars nobody: lift its cooldown (only its own: a later bar stays)
local bar = redis.call('HGET', KEYS[7], r.cit)
if bar and string.match(bar, '^%d+ (%S+)$') == reservation_id then
  redis.call('HDEL', KEYS[7], r.cit)
end
redis.call('HINCRBY', KEYS[2], r.site, r.qty)
redis.call('HINCRBY', KEYS[5], 'reserved:' .. r.site, -r.qty)
seq = redis.call('HINCRBY', KEYS[5], 'seq', 1)
redis.call('XADD', KEYS[6], '*', 'kind', 'reservation', 'record', record, 'seq', tostring(seq))
return {'cancelled', record}
