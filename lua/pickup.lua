-- pickup.lua: hand a reservation's units over at the counter, once, at the right site.
--
-- KEYS[1]  round metadata hash   <p>:{r:<round>}:round         pickup_end_ms
-- KEYS[2]  reservations hash     <p>:{r:<round>}:reservations  reservation_id -> record (JSON)
-- KEYS[3]  pickup-code hash      <p>:{r:<round>}:codes:<site>  code -> reservation_id
-- KEYS[4]  tally hash            <p>:{r:<round>}:tally         reserved:<site>, collected:<site>,
--                                                              seq, lost
-- KEYS[5]  ledger stream         <p>:{r:<round>}:ledger
-- ARGV[1]  pickup code
-- ARGV[2]  citizen hash to check against the reservation, or '' for no check
-- ARGV[3]  floor: the ledger's high-water `seq` for the round, or -1 when not known (claim.lua
--          explains the integrity check)
-- returns  {'collected', record}
--          {'not-collectable', record, why}   why: collected | cancelled | expired | citizen
--          {'not-found'}                      no such code at this site in this round
--          {'lost', mark}                     the round is lost (Redis is behind the ledger)
-- errors   redis.error_reply 'ERR pickup: ...' when ARGV is not a code (not empty), a citizen
--          hash (or '') and a whole floor; checked before anything is written
-- Times are milliseconds since the epoch, from Redis TIME, never from the client.

local function whole(text)
  local x = tonumber(text)
  if x and x == x and x > -math.huge and x < math.huge and x == math.floor(x) then
    return x
  end
  return nil
end

local code = ARGV[1]
local citizen = ARGV[2]
local floor = whole(ARGV[3])
if #ARGV ~= 3 or code == '' or not floor then
  return redis.error_reply('ERR pickup: ARGV must be code, citizen, floor')
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local state = redis.call('HMGET', KEYS[4], 'seq', 'lost')
local seq, lost = tonumber(state[1]) or 0, state[2]
if not lost and seq < floor then
  lost = cjson.encode({at = now, redis = seq, ledger = floor})
  redis.call('HSET', KEYS[4], 'lost', lost)
end
if lost then
  return {'lost', lost}
end

local reservation_id = redis.call('HGET', KEYS[3], code)
if not reservation_id then
  return {'not-found'}
end
local record = redis.call('HGET', KEYS[2], reservation_id)
if not record then
  return {'not-found'}
end
local r = cjson.decode(record)
if r.status ~= 'confirmed' then
  return {'not-collectable', record, r.status}
end
local pickup_end = tonumber(redis.call('HGET', KEYS[1], 'pickup_end_ms') or '0')
if now >= pickup_end then
  return {'not-collectable', record, 'expired'}
end
if citizen ~= '' and citizen ~= r.cit then
  return {'not-collectable', record, 'citizen'}
end

r.status = 'collected'
r.updated = now
record = cjson.encode(r)
redis.call('HSET', KEYS[2], reservation_id, record)
redis.call('HINCRBY', KEYS[4], 'reserved:' .. r.site, -r.qty)
redis.call('HINCRBY', KEYS[4], 'collected:' .. r.site, r.qty)
seq = redis.call('HINCRBY', KEYS[4], 'seq', 1)
redis.call('XADD', KEYS[5], '*', 'kind', 'reservation', 'record', record, 'seq', tostring(seq))
return {'collected', record}
