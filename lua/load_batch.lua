-- load_batch.lua: add an operator's inventory batch to a round, all or nothing, once per batch_id.
--
-- KEYS[1]  round metadata hash   <p>:{r:<round>}:round
-- KEYS[2]  stock hash            <p>:{r:<round>}:stock     site_id -> units left
-- KEYS[3]  loaded hash           <p>:{r:<round>}:loaded    site_id -> units ever loaded
-- KEYS[4]  batches hash          <p>:{r:<round>}:batches   batch_id -> digest
-- KEYS[5]  ledger stream         <p>:{r:<round>}:ledger
-- KEYS[6]  tally hash            <p>:{r:<round>}:tally     seq, lost
-- ARGV[1]  batch_id
-- ARGV[2]  digest of the batch's contents (hex), compared on a replay
-- ARGV[3]  the items as JSON [[site_id, units], ...], recorded in the ledger
-- ARGV[4]  floor: the ledger's high-water `seq` for the round, or -1 when not known (claim.lua
--          explains the integrity check)
-- ARGV[5..] pairs: site_id, units (whole, >= 1); the caller has checked the sites exist
-- returns  {'loaded', units added} | {'replay'} (same batch_id, same digest: nothing changed) |
--          {'conflict'} (same batch_id, other contents) | {'no-round'} |
--          {'lost', mark} (the round is lost: Redis is behind the ledger)
-- errors   redis.error_reply 'ERR load_batch: ...' when ARGV is not batch_id, digest and items
--          (none empty), a whole floor and site/unit pairs (site_id not empty, whole units >= 1);
--          checked before anything is changed
-- Times (the ledger entry's `at`, the lost mark's) are ms since the epoch, from Redis TIME.

local function whole(text)
  local x = tonumber(text)
  if x and x == x and x > -math.huge and x < math.huge and x == math.floor(x) then
    return x
  end
  return nil
end

local batch_id, digest, items = ARGV[1], ARGV[2], ARGV[3]
local floor = whole(ARGV[4])
if not floor or (#ARGV - 4) % 2 ~= 0 or #ARGV < 6 or batch_id == '' or digest == ''
    or items == '' then
  return redis.error_reply(
    'ERR load_batch: ARGV needs batch_id, digest, items, floor and site/unit pairs')
end
for i = 5, #ARGV, 2 do
  local units = whole(ARGV[i + 1])
  if ARGV[i] == '' or not units or units < 1 then
    return redis.error_reply('ERR load_batch: each pair is a site_id and whole units >= 1')
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local state = redis.call('HMGET', KEYS[6], 'seq', 'lost')
local seq, lost = tonumber(state[1]) or 0, state[2]
if not lost and seq < floor then
  lost = cjson.encode({at = now, redis = seq, ledger = floor})
  redis.call('HSET', KEYS[6], 'lost', lost)
end
if lost then
  return {'lost', lost}
end

if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'no-round'}
end
local seen = redis.call('HGET', KEYS[4], batch_id)
if seen then
  if seen == digest then
    return {'replay'}
  end
  return {'conflict'}
end

local added = 0
for i = 5, #ARGV, 2 do
  local units = whole(ARGV[i + 1])
  redis.call('HINCRBY', KEYS[2], ARGV[i], units)
  redis.call('HINCRBY', KEYS[3], ARGV[i], units)
  added = added + units
end
redis.call('HSET', KEYS[4], batch_id, digest)
seq = redis.call('HINCRBY', KEYS[6], 'seq', 1)
redis.call('XADD', KEYS[5], '*', 'kind', 'batch', 'batch_id', batch_id, 'digest', digest,
  'items', items, 'at', tostring(now), 'seq', tostring(seq))
return {'loaded', tostring(added)}
