-- restore_cooldowns.lua: put one round's cooldowns back into its programme's entitlement hash as
-- the ledger has them (allot rebuild, allocator/rebuild.py), in one atomic step.
--
-- The hash is shared by every round of the programme, and the others may be serving meanwhile:
-- only this round's bars are touched. A bar of this round that the ledger does not have as a
-- live reservation (cancelled, or lost from the ledger) is removed; each live one whose end is
-- still ahead is written, unless the citizen holds a later-ending bar from another round.
--
-- KEYS[1]   entitlement hash   <p>:{p:<programme>}:entitled   citizen hash ->
--           "<until_ms> <reservation_id>" (claim.lua writes it, cancel.lua lifts it)
-- ARGV[1]   round_id (the part of a reservation_id after its dot)
-- ARGV[2..] triples, one per live reservation of the round in the ledger: citizen hash (hex),
--           until_ms (created + the round's cooldown_days), reservation_id
-- returns   {removed, written}: bars of this round removed, bars written
-- errors    redis.error_reply 'ERR restore_cooldowns: ...' when ARGV is not a round_id and whole
--           triples (citizen and reservation_id not empty, until_ms whole); checked before
--           anything is written
-- A bar whose until_ms has passed by Redis TIME is not written (it bars nobody).

local function whole(text)
  local x = tonumber(text)
  if x and x == x and x > -math.huge and x < math.huge and x == math.floor(x) then
    return x
  end
  return nil
end

local round_id = ARGV[1]
if not round_id or round_id == '' or (#ARGV - 1) % 3 ~= 0 then
  return redis.error_reply('ERR restore_cooldowns: ARGV must be round_id, then triples')
end
local live = {}
local order = {}
for i = 2, #ARGV, 3 do
  local citizen, until_ms, reservation_id = ARGV[i], whole(ARGV[i + 1]), ARGV[i + 2]
  if citizen == '' or not until_ms or reservation_id == '' then
    return redis.error_reply('ERR restore_cooldowns: triple at ARGV[' .. i .. '] is malformed')
  end
  live[citizen] = {until_ms = until_ms, id = reservation_id}
  order[#order + 1] = citizen
end

local function round_of(reservation_id)
  return string.match(reservation_id or '', '%.(.*)$')
end
local function parse(value)
  local until_ms, held_id = string.match(value or '', '^(%d+) (%S+)$')
  return tonumber(until_ms), held_id
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local removed, written = 0, 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local citizen = all[i]
  local _, held_id = parse(all[i + 1])
  if round_of(held_id) == round_id and (not live[citizen] or live[citizen].id ~= held_id) then
    redis.call('HDEL', KEYS[1], citizen)
    removed = removed + 1
  end
end
for _, citizen in ipairs(order) do
  local bar = live[citizen]
  if bar.until_ms > now then
    local until_ms, held_id = parse(redis.call('HGET', KEYS[1], citizen))
    if not until_ms or round_of(held_id) == round_id or until_ms < bar.until_ms then
      redis.call('HSET', KEYS[1], citizen, bar.until_ms .. ' ' .. bar.id)
      written = written + 1
    end
  end
end
return {removed, written}
