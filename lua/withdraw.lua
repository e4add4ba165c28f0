-- withdraw.lua: withdraw a lottery entry before the registration window closes, atomically.
--
-- KEYS[1]  round metadata hash   <p>:{r:<round>}:round      closes_ms
-- KEYS[2]  entries hash          <p>:{r:<round>}:entries    entry_id -> record (JSON)
-- KEYS[3]  entrants hash         <p>:{r:<round>}:entrants   citizen hash -> entry_id (live)
-- KEYS[4]  tally hash            <p>:{r:<round>}:tally      entries:<site>, seq, lost
-- KEYS[5]  ledger stream         <p>:{r:<round>}:ledger
-- ARGV[1]  entry_id
-- ARGV[2]  floor: the ledger's high-water `seq` for the round, or -1 when not known (claim.lua
--          explains the integrity check)
-- returns  {'withdrawn', record}   now withdrawn (or was already: withdrawing is idempotent)
--          {'not-open', record}    the window has closed (the entry is frozen, drawn or won)
--          {'not-found'}
--          {'lost', mark}          the round is lost (Redis is behind the ledger)
-- errors   redis.error_reply 'ERR withdraw: ...' when ARGV is not an entry_id (not empty) and a
--          whole floor; checked before anything is written
-- Times are milliseconds since the epoch, from Redis TIME, never from the client.

local function whole(text)
  local x = tonumber(text)
  if x and x == x and x > -math.huge and x < math.huge and x == math.floor(x) then
    return x
  end
  return nil
end

local entry_id = ARGV[1]
local floor = whole(ARGV[2])
if #ARGV ~= 2 or entry_id == '' or not floor then
  return redis.error_reply('ERR withdraw: ARGV must be entry_id, floor')
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

local record = redis.call('HGET', KEYS[2], entry_id)
if not record then
  return {'not-found'}
end
local r = cjson.decode(record)
if r.status == 'withdrawn' then
  return {'withdrawn', record}
end
local closes = tonumber(redis.call('HGET', KEYS[1], 'closes_ms') or '0')
if r.status ~= 'registered' or now >= closes then
  return {'not-open', record}
end

r.status = 'withdrawn'
r.updated = now
record = cjson.encode(r)
redis.call('HSET', KEYS[2], entry_id, record)
if redis.call('HGET', KEYS[3], r.cit) == entry_id then
  redis.call('HDEL', KEYS[3], r.cit)
end
redis.call('HINCRBY', KEYS[4], 'entries:' .. r.site, -1)
seq = redis.call('HINCRBY', KEYS[4], 'seq', 1)
redis.call('XADD', KEYS[5], '*', 'kind', 'entry', 'record', record, 'seq', tostring(seq))
return {'withdrawn', record}
