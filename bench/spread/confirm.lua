-- confirm.lua (citizen shard k): the third step of a spread claim. A pending holder entry whose
-- unit was taken (take.lua answered taken) becomes confirmed, and the programme's cooldown bar
-- is set (until created_ms + cooldown_ms), with one ledger entry each. Only then is the
-- citizen answered 201. Idempotent by reservation_id: the worker and the reaper may both
-- confirm the same entry; the one that finds it confirmed already is told so ('already'): it
-- did not confirm it, and since then the citizen may have been shown the share ('existing')
-- and cancelled it on its stock shard (cancel.lua) with the second half (release.lua) not yet
-- done, which this shard cannot see. The driver reads the record before it answers 201.
--
-- KEYS[1]  holders hash  KEYS[2] pending zset  KEYS[3] bars hash (as entitle.lua's)
-- KEYS[4]  tally hash    <p>:{c..}:tally   seq
-- KEYS[5]  ledger stream <p>:{c..}:ledger  one entry per confirmed holder
-- ARGV[1]  cooldown_ms (0: no bar)
-- ARGV[2..] items "<citizen hash> <reservation_id> <created_ms>"
-- returns  per item 'confirmed' (now) | 'already' (confirmed before, by the reaper or an
--          earlier call) | 'gone' (the entry names another id or none: never after a take
--          that answered taken, see reap.lua, unless the share was cancelled since)

local cooldown = tonumber(ARGV[1])
local n = #ARGV - 1
if not cooldown or n < 1 then
  return redis.error_reply('ERR confirm: ARGV must be cooldown_ms, items')
end
local items, cits = {}, {}
for i = 1, n do
  local cit, id, created = string.match(ARGV[1 + i], '^(%w+) (%S+) (%d+)$')
  if not cit then
    return redis.error_reply('ERR confirm: item ' .. i .. ' is not "cit id created_ms"')
  end
  items[i] = {cit = cit, id = id, created = created}
  cits[i] = cit
end
local held = redis.call('HMGET', KEYS[1], unpack(cits))
local entry = {}
for i = 1, n do
  if held[i] then entry[cits[i]] = held[i] end
end
local seq = tonumber(redis.call('HGET', KEYS[4], 'seq')) or 0
local replies, hset, zrem, bars, ledger = {}, {}, {}, {}, {}
for i = 1, n do
  local it = items[i]
  local e = entry[it.cit]
  local state, eid, site
  if e then
    state, eid, site = string.match(e, '^(%u) (%S+) (%S+)')
  end
  if eid ~= it.id then
    replies[i] = 'gone'
  elseif state == 'C' then
    replies[i] = 'already'
  else
    local v = 'C ' .. it.id .. ' ' .. site .. ' ' .. it.created
    entry[it.cit] = v
    hset[#hset + 1] = it.cit
    hset[#hset + 1] = v
    zrem[#zrem + 1] = it.cit
    if cooldown > 0 then
      bars[#bars + 1] = it.cit
      bars[#bars + 1] = tostring(tonumber(it.created) + cooldown) .. ' ' .. it.id
    end
    ledger[#ledger + 1] = it
    replies[i] = 'confirmed'
  end
end
if #hset > 0 then
  redis.call('HSET', KEYS[1], unpack(hset))
  redis.call('ZREM', KEYS[2], unpack(zrem))
  if #bars > 0 then
    redis.call('HSET', KEYS[3], unpack(bars))
  end
  for _, it in ipairs(ledger) do
    seq = seq + 1
    redis.call('XADD', KEYS[5], '*', 'kind', 'holder', 'cit', it.cit, 'id', it.id, 'seq', seq)
  end
  redis.call('HSET', KEYS[4], 'seq', seq)
end
return replies
