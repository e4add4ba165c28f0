-- entitle.lua (citizen shard k): the first step of a spread claim, for a batch of citizens.
--
-- bench/spread models a round whose claims are decided on several primaries
-- (docs/scaling.md, "Design: one hot round over several primaries"). Every key here is under
-- the citizen shard's hash tag {c:<programme>:<k>...}; a citizen belongs to shard
-- k = HMAC(citizen) mod N. For each item, in order: the token buckets (this shard's share of
-- the round's bucket, the client address's, the citizen's), then the citizen's holder entry
-- (one per citizen and round: pending or confirmed), then the programme's cooldown bar; if
-- the citizen holds nothing and is not barred, a *pending* holder entry is written, expiring
-- at now + hold_ms (the reaper's cue, lua reap.lua).
--
-- KEYS[1]  holders hash  <p>:{c..}:holders:<round>  citizen hash -> "P <id> <site> <expires_ms>"
--                                                    (pending) | "C <id> <site> <created_ms>"
-- KEYS[2]  pending zset  <p>:{c..}:pending:<round>  citizen hash, score expires_ms
-- KEYS[3]  bars hash     <p>:{c..}:entitled         citizen hash -> "<until_ms> <id>"
-- KEYS[4]  gate hash     <p>:{c..}:gate:<round>     bucket -> "<tokens> <ts_ms>"
-- ARGV[1]  now_ms (the driver's clock: the protocol's safety does not depend on it, only how
--          soon a dead worker's entry is reaped)
-- ARGV[2]  hold_ms     ARGV[3..8] bucket rates and bursts: shard, client, citizen
-- ARGV[9..] items "<citizen hash> <client hash> <reservation_id> <site>"
-- returns  per item {'ok', expires_ms} | {'held', 'P'|'C', id, site} |
--          {'in-cooldown', until_ms} | {'gated', bucket}

local now, hold = tonumber(ARGV[1]), tonumber(ARGV[2])
local n = #ARGV - 8
if not now or not hold or n < 1 then
  return redis.error_reply('ERR entitle: ARGV must be now_ms, hold_ms, six bucket settings, items')
end
local rates = {}
for i = 3, 8 do
  rates[i] = tonumber(ARGV[i])
  if not rates[i] or rates[i] <= 0 then
    return redis.error_reply('ERR entitle: bucket settings must be numbers above 0')
  end
end
local items, cits, gate_fields, gate_at = {}, {}, {'g'}, {g = 1}
for i = 1, n do
  local cit, client, id, site = string.match(ARGV[8 + i], '^(%w+) (%w+) (%S+) (%S+)$')
  if not cit then
    return redis.error_reply('ERR entitle: item ' .. i .. ' is not "cit client id site"')
  end
  items[i] = {cit = cit, id = id, site = site, cf = 'c:' .. client, zf = 'z:' .. cit}
  cits[i] = cit
  for _, f in ipairs({items[i].cf, items[i].zf}) do
    if not gate_at[f] then
      gate_fields[#gate_fields + 1] = f
      gate_at[f] = #gate_fields
    end
  end
end
local held = redis.call('HMGET', KEYS[1], unpack(cits))
local bars = redis.call('HMGET', KEYS[3], unpack(cits))
local saved = redis.call('HMGET', KEYS[4], unpack(gate_fields))
local entry, bar = {}, {}
for i = 1, n do
  if held[i] then entry[cits[i]] = held[i] end
  if bars[i] then bar[cits[i]] = bars[i] end
end

local buckets = {}
local function bucket(field, rate, burst)
  local b = buckets[field]
  if not b then
    local tokens, ts
    local s = saved[gate_at[field]]
    if s then
      local a, c = string.match(s, '^(%S+) (%S+)$')
      tokens, ts = tonumber(a), tonumber(c)
    end
    if not tokens then tokens, ts = burst, now end
    b = {tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000), dirty = false}
    buckets[field] = b
  end
  return b
end
local function round_of(id)
  return string.match(id, '%.(.*)$')
end

local replies, hset, zadd = {}, {}, {}
local expires = now + hold
local shard = bucket('g', rates[3], rates[4])
for i = 1, n do
  local it = items[i]
  local client, citizen = bucket(it.cf, rates[5], rates[6]), bucket(it.zf, rates[7], rates[8])
  if shard.tokens < 1 then
    replies[i] = {'gated', 'global'}
  elseif client.tokens < 1 then
    replies[i] = {'gated', 'client'}
  elseif citizen.tokens < 1 then
    replies[i] = {'gated', 'citizen'}
  else
    shard.tokens, client.tokens, citizen.tokens = shard.tokens - 1, client.tokens - 1,
      citizen.tokens - 1
    shard.dirty, client.dirty, citizen.dirty = true, true, true
    local e = entry[it.cit]
    if e then
      local state, eid, esite = string.match(e, '^(%u) (%S+) (%S+)')
      replies[i] = {'held', state, eid, esite}
    else
      local b = bar[it.cit]
      local until_ms, bid
      if b then
        until_ms, bid = string.match(b, '^(%d+) (%S+)$')
      end
      if until_ms and tonumber(until_ms) > now and round_of(bid) ~= round_of(it.id) then
        replies[i] = {'in-cooldown', until_ms}
      else
        local v = 'P ' .. it.id .. ' ' .. it.site .. ' ' .. expires
        entry[it.cit] = v
        hset[#hset + 1] = it.cit
        hset[#hset + 1] = v
        zadd[#zadd + 1] = expires
        zadd[#zadd + 1] = it.cit
        replies[i] = {'ok', tostring(expires)}
      end
    end
  end
end
if #hset > 0 then
  redis.call('HSET', KEYS[1], unpack(hset))
  redis.call('ZADD', KEYS[2], unpack(zadd))
end
local gate_args = {}
for field, b in pairs(buckets) do
  if b.dirty then
    gate_args[#gate_args + 1] = field
    gate_args[#gate_args + 1] = tostring(b.tokens) .. ' ' .. now
  end
end
if #gate_args > 0 then
  redis.call('HSET', KEYS[4], unpack(gate_args))
  -- a model's simplification: the service's two generations (lua/claim.lua) empty old buckets
  redis.call('PEXPIRE', KEYS[4], 600000)
end
return replies
