-- release.lua (citizen shard k): drop a citizen's holder entry named by its reservation_id,
-- and the cooldown bar that reservation set. The compensation of a spread claim refused
-- sold-out on every sub-pool (the entry is pending: the citizen may try another site at once),
-- the reaper's delete of a dead worker's entry whose unit was never taken (after reap.lua
-- fenced it on every stock shard), and the second half of a cancel (after cancel.lua on the
-- stock shard; the entry is confirmed). Idempotent, and keyed by id: an entry of a newer claim
-- of the same citizen is left alone.
--
-- KEYS[1..5] as confirm.lua's (holders, pending, bars, tally, ledger)
-- ARGV[1..] items "<citizen hash> <reservation_id>"
-- returns  per item 'released' | 'none'

local n = #ARGV
local items, cits = {}, {}
for i = 1, n do
  local cit, id = string.match(ARGV[i], '^(%w+) (%S+)$')
  if not cit then
    return redis.error_reply('ERR release: item ' .. i .. ' is not "cit id"')
  end
  items[i] = {cit = cit, id = id}
  cits[i] = cit
end
if n == 0 then
  return {}
end
local held = redis.call('HMGET', KEYS[1], unpack(cits))
local bars = redis.call('HMGET', KEYS[3], unpack(cits))
local entry, bar = {}, {}
for i = 1, n do
  if held[i] then entry[cits[i]] = held[i] end
  if bars[i] then bar[cits[i]] = bars[i] end
end
local seq = tonumber(redis.call('HGET', KEYS[4], 'seq')) or 0
local replies = {}
local changed = false
for i = 1, n do
  local it = items[i]
  local e = entry[it.cit]
  local state, eid
  if e then
    state, eid = string.match(e, '^(%u) (%S+)')
  end
  if eid == it.id then
    entry[it.cit] = nil
    redis.call('HDEL', KEYS[1], it.cit)
    if state == 'P' then
      redis.call('ZREM', KEYS[2], it.cit)
    else
      seq = seq + 1
      redis.call('XADD', KEYS[5], '*', 'kind', 'released', 'cit', it.cit, 'id', it.id, 'seq', seq)
      changed = true
    end
    replies[i] = 'released'
  else
    replies[i] = 'none'
  end
  local b = bar[it.cit]
  if b and string.match(b, '^%d+ (%S+)$') == it.id then
    bar[it.cit] = nil
    redis.call('HDEL', KEYS[3], it.cit)
  end
end
if changed then
  redis.call('HSET', KEYS[4], 'seq', seq)
end
return replies
