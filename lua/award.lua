-- award.lua: give lottery winners their reservations, one or many entries in one atomic step.
--
-- The draw (allocator/lottery.py) decides who wins where; this script makes each winner's
-- reservation exactly as claim.lua makes one (stock, pickup code, holder, record, tally, ledger),
-- so pickup, cancel, the desk, reconcile and rebuild treat it like any other, including the
-- citizen's cooldown bar in the round's programme (as claim.lua writes it; cancel.lua lifts
-- it), and marks the entry `won` with its reservation_id. A winner who holds a live bar from
-- another round of the programme (a reservation made after this round's freeze, or a win in
-- another round's later pass) is not given a second share: the entry becomes `excluded` and its
-- units stay at the site (allocator/drawjob.py counts them back for the next pass). It is idempotent per entry: an entry that already has
-- a reservation answers `existing` and changes nothing, so an interrupted award is resumed by
-- running the same items again.
--
-- KEYS[1]   round metadata hash    <p>:{r:<round>}:round        per_person, programme,
--                                                               cooldown_days
-- KEYS[2]   stock hash             <p>:{r:<round>}:stock        site_id -> units left
-- KEYS[3]   holders hash           <p>:{r:<round>}:holders      citizen hash -> reservation_id
-- KEYS[4]   reservations hash      <p>:{r:<round>}:reservations reservation_id -> record (JSON)
-- KEYS[5]   tally hash             <p>:{r:<round>}:tally        reserved:<site>, created, seq
-- KEYS[6]   ledger stream          <p>:{r:<round>}:ledger
-- KEYS[7]   entries hash           <p>:{r:<round>}:entries      entry_id -> record (JSON)
-- KEYS[8]   entitlement hash       <p>:{p:<programme>}:entitled citizen hash ->
--           "<until_ms> <reservation_id>": read and written only when the round has a
--           `programme` (its keys are then all under the programme's tag, one slot)
-- KEYS[9..] per-item keys, by index from ARGV: the site's pickup codes
--           <p>:{r:<round>}:codes:<site> and its holders <p>:{r:<round>}:siteholders:<site>
-- ARGV[1]   number of items n
-- ARGV[2]   floor: the ledger's high-water `seq` for the round, or -1 when not known
-- ARGV[3..] n items, one string each of 8 space-separated fields: codes key index, site-holders
--           key index, entry_id, site_id (where the draw placed it), new reservation_id, three
--           candidate pickup codes
-- returns   one reply per item: {'created', reservation record} | {'existing', reservation
--           record} | {'no-entry'} | {'not-registered', status} (withdrawn: never in the draw) |
--           {'already-reserved'} | {'no-stock', units left} | {'no-code'} |
--           {'in-cooldown', until_ms} (barred by another round's reservation: entry excluded) |
--           {'lost', mark} for every item when the round is lost
-- errors    redis.error_reply 'ERR award: ...' when ARGV is not a whole n >= 1, a whole floor
--           and n items of 8 fields with key indexes inside KEYS[9..]; checked before any write
-- Times are milliseconds since the epoch, from Redis TIME, never from the client.

local HEAD = 3

local function whole(text)
  local x = tonumber(text)
  if x and x == x and x > -math.huge and x < math.huge and x == math.floor(x) then
    return x
  end
  return nil
end

local n = whole(ARGV[1])
local floor = whole(ARGV[2])
if not n or n < 1 or not floor or #ARGV ~= HEAD - 1 + n then
  return redis.error_reply('ERR award: ARGV must be n, floor, then n items')
end
local items = {}
for i = 1, n do
  local f = {}
  for field in string.gmatch(ARGV[HEAD + i - 1], '%S+') do
    f[#f + 1] = field
  end
  if #f ~= 8 then
    return redis.error_reply('ERR award: item ' .. i .. ' must have 8 fields')
  end
  for k = 1, 2 do
    local at = whole(f[k])
    if not at or at < 9 or at > #KEYS then
      return redis.error_reply('ERR award: item ' .. i .. ': key index must point into KEYS[9..]')
    end
    f[k] = at
  end
  items[i] = f
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
  local replies = {}
  for i = 1, n do
    replies[i] = {'lost', lost}
  end
  return replies
end
local first_seq = seq
local round = redis.call('HMGET', KEYS[1], 'per_person', 'programme', 'cooldown_days')
local per_person = tonumber(round[1] or '0')
local programme = round[2] and round[2] ~= ''
local cooldown_ms = (tonumber(round[3]) or 0) * 86400000
local function round_of(id)
  return string.match(id or '', '%.(.*)$')
end
-- the live bar from another round of the programme that refuses this winner, or nil
local function barred(citizen, reservation_id)
  if not programme then
    return nil
  end
  local until_ms, held_id = string.match(redis.call('HGET', KEYS[8], citizen) or '',
    '^(%d+) (%S+)$')
  until_ms = tonumber(until_ms)
  if until_ms and until_ms > now and round_of(held_id) ~= round_of(reservation_id) then
    return until_ms
  end
  return nil
end

local function log(kind, record)
  seq = seq + 1
  redis.call('XADD', KEYS[6], '*', 'kind', kind, 'record', record, 'seq', tostring(seq))
end

local replies = {}
for i = 1, n do
  local f = items[i]
  local codes_key, site_holders_key = KEYS[f[1]], KEYS[f[2]]
  local entry_id, site_id, reservation_id = f[3], f[4], f[5]
  local reply
  local entry = redis.call('HGET', KEYS[7], entry_id)
  if not entry then
    reply = {'no-entry'}
  else
    local e = cjson.decode(entry)
    if e.res then
      reply = {'existing', redis.call('HGET', KEYS[4], e.res)}
    elseif e.status ~= 'registered' then
      reply = {'not-registered', e.status}
    elseif redis.call('HEXISTS', KEYS[3], e.cit) == 1 then
      reply = {'already-reserved'}
    elseif barred(e.cit, reservation_id) then
      local until_ms = barred(e.cit, reservation_id)
      e.status, e.updated = 'excluded', now
      local excluded = cjson.encode(e)
      redis.call('HSET', KEYS[7], entry_id, excluded)
      log('entry', excluded)
      reply = {'in-cooldown', tostring(until_ms)}
    else
      local left = tonumber(redis.call('HGET', KEYS[2], site_id) or '0')
      if per_person < 1 or left < per_person then
        reply = {'no-stock', tostring(left)}
      else
        local code = nil
        for c = 6, 8 do
          if redis.call('HEXISTS', codes_key, f[c]) == 0 then
            code = f[c]
            break
          end
        end
        if not code then
          reply = {'no-code'}
        else
          local record = cjson.encode({
            id = reservation_id, site = site_id, qty = per_person, status = 'confirmed',
            code = code, cit = e.cit, ph = e.ph, mask = e.mask, created = now, updated = now,
          })
          redis.call('HINCRBY', KEYS[2], site_id, -per_person)
          redis.call('HSET', codes_key, code, reservation_id)
          redis.call('SADD', site_holders_key, e.cit)
          redis.call('HSET', KEYS[3], e.cit, reservation_id)
          redis.call('HSET', KEYS[4], reservation_id, record)
          if programme and cooldown_ms > 0 then
            redis.call('HSET', KEYS[8], e.cit, (now + cooldown_ms) .. ' ' .. reservation_id)
          end
          redis.call('HINCRBY', KEYS[5], 'reserved:' .. site_id, per_person)
          redis.call('HINCRBY', KEYS[5], 'created', 1)
          log('reservation', record)
          e.status, e.res, e.updated = 'won', reservation_id, now
          local won = cjson.encode(e)
          redis.call('HSET', KEYS[7], entry_id, won)
          log('entry', won)
          reply = {'created', record}
        end
      end
    end
  end
  replies[i] = reply
end

if seq ~= first_seq then
  redis.call('HSET', KEYS[5], 'seq', tostring(seq))
end
return replies
