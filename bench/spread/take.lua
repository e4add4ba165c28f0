-- take.lua (stock shard j): the second step of a spread claim: take a unit of the site's
-- sub-pool on this shard for each entitled citizen, or answer sold-out.
--
-- Every key is under the stock shard's hash tag {s:<round>:<j>...}. The record written here is
-- the reservation (what pickup and cancel work on); the citizen's holder entry and cooldown bar
-- live on the citizen shard (confirm.lua). A reservation_id the reaper has fenced (record
-- 'void', reap.lua) is never taken: that is what lets the reaper delete a dead worker's pending
-- entry without racing a slow worker's take. Taking is idempotent by reservation_id.
--
-- KEYS[1]  stock hash     <p>:{s..}:stock          site -> units left in this sub-pool
-- KEYS[2]  records hash   <p>:{s..}:records        reservation_id -> record JSON | 'void'
-- KEYS[3]  tally hash     <p>:{s..}:tally          seq, reserved:<site>
-- KEYS[4]  ledger stream  <p>:{s..}:ledger         one entry per reservation
-- KEYS[5..] per-item keys by index: codes:<site> (code -> id), siteholders:<site> (set),
--          fair:asked:<dimension>:<group> (sets, as lua/claim.lua's)
-- ARGV[1]  now_ms   ARGV[2] per_person
-- ARGV[3..] items "<cit> <phone hash> <mask> <id> <site> <channel> <age band> <region>
--          <codes idx> <siteholders idx> <asked idx> <asked idx> <asked idx> <code1> <code2>
--          <code3>" (asked idx 0: not counted)
-- returns  per item {'taken', code, created_ms} (also for an id taken before: idempotent) |
--          {'sold-out', left} | {'void'} | {'no-code'}

local now, per_person = tonumber(ARGV[1]), tonumber(ARGV[2])
local n = #ARGV - 2
if not now or not per_person or n < 1 then
  return redis.error_reply('ERR take: ARGV must be now_ms, per_person, items')
end
local PATTERN = '^(%w+) (%w+) (%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%d+) (%d+) (%d+) (%d+) (%d+) (%w+) (%w+) (%w+)$'
local items, ids, sites, site_list = {}, {}, {}, {}
local codes_of = {}
for i = 1, n do
  local cit, ph, mask, id, site, ch, age, reg, k1, k2, a1, a2, a3, c1, c2, c3 =
    string.match(ARGV[2 + i], PATTERN)
  if not cit then
    return redis.error_reply('ERR take: item ' .. i .. ' is not laid out as ARGV[3..] says')
  end
  local it = {cit = cit, ph = ph, mask = mask, id = id, site = site, ch = ch, age = age,
    reg = reg, codes = tonumber(k1), holders = tonumber(k2),
    asked = {tonumber(a1), tonumber(a2), tonumber(a3)}, c = {c1, c2, c3}}
  if it.codes < 5 or it.codes > #KEYS or it.holders < 5 or it.holders > #KEYS then
    return redis.error_reply('ERR take: item ' .. i .. ': a key index must point into KEYS[5..]')
  end
  items[i] = it
  ids[i] = id
  if not sites[site] then
    sites[site] = true
    site_list[#site_list + 1] = site
  end
  local c = codes_of[it.codes]
  if not c then
    c = {list = {}, at = {}}
    codes_of[it.codes] = c
  end
  for _, code in ipairs(it.c) do
    if not c.at[code] then
      c.list[#c.list + 1] = code
      c.at[code] = true
    end
  end
end

local known = redis.call('HMGET', KEYS[2], unpack(ids))
local stock = redis.call('HMGET', KEYS[1], unpack(site_list))
local tally_fields = {'seq'}
for s = 1, #site_list do
  tally_fields[s + 1] = 'reserved:' .. site_list[s]
end
local state = redis.call('HMGET', KEYS[3], unpack(tally_fields))
local seq = tonumber(state[1]) or 0
local left, reserved = {}, {}
for s = 1, #site_list do
  left[site_list[s]] = tonumber(stock[s]) or 0
  reserved[site_list[s]] = tonumber(state[s + 1]) or 0
end
local taken = {}
for at, c in pairs(codes_of) do
  local found = redis.call('HMGET', KEYS[at], unpack(c.list))
  local t = {}
  for j = 1, #c.list do
    if found[j] then t[c.list[j]] = true end
  end
  taken[at] = t
end

local before = {}
for i = 1, n do
  if known[i] then before[ids[i]] = known[i] end
end
local replies, made, asked = {}, {}, {}
local function ask(it)
  for _, at in ipairs(it.asked) do
    if at > 0 then
      local set = asked[at]
      if not set then
        set = {}
        asked[at] = set
      end
      set[#set + 1] = it.cit
    end
  end
end
local qty = tostring(per_person)
local now_text = tostring(now)
for i = 1, n do
  local it = items[i]
  local had = before[it.id]
  if had == 'void' then
    replies[i] = {'void'}
  elseif had then
    local r = cjson.decode(had)
    replies[i] = {'taken', r.code, tostring(r.created)}
  elseif left[it.site] < per_person then
    ask(it)
    replies[i] = {'sold-out', tostring(left[it.site])}
  else
    local t = taken[it.codes]
    local code = (not t[it.c[1]] and it.c[1]) or (not t[it.c[2]] and it.c[2])
      or (not t[it.c[3]] and it.c[3]) or nil
    if not code then
      replies[i] = {'no-code'}
    else
      t[code] = true
      ask(it)
      left[it.site] = left[it.site] - per_person
      reserved[it.site] = reserved[it.site] + per_person
      local record = '{"id":"' .. it.id .. '","site":"' .. it.site .. '","qty":' .. qty
        .. ',"status":"confirmed","code":"' .. code .. '","cit":"' .. it.cit .. '","ph":"'
        .. it.ph .. '","mask":"' .. it.mask .. '","created":' .. now_text .. ',"updated":'
        .. now_text .. ',"ch":"' .. it.ch .. '","age":"' .. it.age .. '","reg":"' .. it.reg
        .. '"}'
      before[it.id] = record
      made[#made + 1] = {it = it, code = code, record = record}
      replies[i] = {'taken', code, now_text}
    end
  end
end

if #made > 0 then
  local stock_args, tally_args, records_args, codes_args, holders_args = {}, {}, {}, {}, {}
  for s = 1, #site_list do
    local site = site_list[s]
    stock_args[#stock_args + 1] = site
    stock_args[#stock_args + 1] = left[site]
    tally_args[#tally_args + 1] = 'reserved:' .. site
    tally_args[#tally_args + 1] = reserved[site]
  end
  for _, m in ipairs(made) do
    local it = m.it
    records_args[#records_args + 1] = it.id
    records_args[#records_args + 1] = m.record
    local c = codes_args[it.codes]
    if not c then
      c = {}
      codes_args[it.codes] = c
    end
    c[#c + 1] = m.code
    c[#c + 1] = it.id
    local h = holders_args[it.holders]
    if not h then
      h = {}
      holders_args[it.holders] = h
    end
    h[#h + 1] = it.cit
  end
  redis.call('HSET', KEYS[1], unpack(stock_args))
  redis.call('HSET', KEYS[2], unpack(records_args))
  for at, c in pairs(codes_args) do
    redis.call('HSET', KEYS[at], unpack(c))
  end
  for at, h in pairs(holders_args) do
    redis.call('SADD', KEYS[at], unpack(h))
  end
  for _, m in ipairs(made) do
    seq = seq + 1
    redis.call('XADD', KEYS[4], '*', 'kind', 'reservation', 'record', m.record, 'seq', seq)
  end
  tally_args[#tally_args + 1] = 'seq'
  tally_args[#tally_args + 1] = seq
  redis.call('HSET', KEYS[3], unpack(tally_args))
end
for at, set in pairs(asked) do
  redis.call('SADD', KEYS[at], unpack(set))
end
return replies
