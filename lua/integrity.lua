-- integrity.lua: compare a round's change sequence in Redis with the ledger's high-water mark,
-- and mark the round lost when Redis is behind (the check every changing script opens with,
-- alone, for readiness, stats, reconcile, rebuild and each worker's once-a-second watch).
--
-- KEYS[1]  round metadata hash   <p>:{r:<round>}:round
-- KEYS[2]  tally hash            <p>:{r:<round>}:tally     seq, lost
-- ARGV[1]  floor: the highest `seq` the ledger in PostgreSQL has committed for the round
--          (-1: the ledger does not know the round; then only a mark already set counts)
-- returns  {'ok', seq, exists}   exists: 1 when the round hash is in Redis, else 0
--          {'lost', mark, exists} mark: JSON {at, redis, ledger}, set by whichever script saw
--                                 it first; it stays until `allot rebuild` rewrites the tally
-- errors   redis.error_reply 'ERR integrity: ...' when ARGV is not one whole number; checked
--          before anything is written
-- The mark's time (`at`) is milliseconds since the epoch, from Redis TIME.

local function whole(text)
  local x = tonumber(text)
  if x and x == x and x > -math.huge and x < math.huge and x == math.floor(x) then
    return x
  end
  return nil
end

local floor = whole(ARGV[1])
if #ARGV ~= 1 or not floor then
  return redis.error_reply('ERR integrity: ARGV must be floor')
end
local exists = redis.call('EXISTS', KEYS[1])
local state = redis.call('HMGET', KEYS[2], 'seq', 'lost')
local seq, lost = tonumber(state[1]) or 0, state[2]
if not lost and seq < floor then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  lost = cjson.encode({at = now, redis = seq, ledger = floor})
  redis.call('HSET', KEYS[2], 'lost', lost)
end
if lost then
  return {'lost', lost, exists}
end
return {'ok', seq, exists}
