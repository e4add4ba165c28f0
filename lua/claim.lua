-- claim.lua: decide reservations for one round, one or many requests in a single atomic step.
--
-- Each item is checked in order: round window, then the citizen (a duplicate never touches
-- stock), then stock, and only then is anything changed. One item's refusal never affects another.
--
-- KEYS[1]   round metadata hash    <p>:{r:<round>}:round        opens_ms, closes_ms, per_person
-- KEYS[2]   stock hash             <p>:{r:<round>}:stock        site_id -> units left
-- KEYS[3]   holders hash           <p>:{r:<round>}:holders      citizen hash -> reservation_id
-- KEYS[4]   reservations hash      <p>:{r:<round>}:reservations reservation_id -> record (JSON)
-- KEYS[5]   tally hash             <p>:{r:<round>}:tally        reserved:<site>, created
-- KEYS[6]   ledger stream          <p>:{r:<round>}:ledger       one entry per state change
-- KEYS[7..] pickup-code hashes     <p>:{r:<round>}:codes:<site> code -> reservation_id
-- ARGV[1]   number of items n
-- ARGV[2..] n items of 9 values each:
--           codes key index (into KEYS), site_id, citizen hash (hex), phone hash (hex),
--           masked citizen id, new reservation_id, three candidate pickup codes
-- returns   one reply per item, in order:
--           {'created', record} | {'existing', record} | {'already-reserved'} |
--           {'sold-out', units left} | {'not-open', opens_ms, closes_ms} | {'no-round'} |
--           {'no-code'} (every candidate pickup code was taken; retry with new ones)
-- Times are milliseconds since the epoch, from Redis TIME, never from the client.

local n = tonumber(ARGV[1])
if not n or n < 1 or #ARGV ~= 1 + 9 * n then
  return redis.error_reply('ERR claim: ARGV must be n followed by n items of 9 values')
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local round = redis.call('HMGET', KEYS[1], 'opens_ms', 'closes_ms', 'per_person')
local opens, closes, per_person = tonumber(round[1]), tonumber(round[2]), tonumber(round[3])

local replies = {}
for i = 0, n - 1 do
  local base = 2 + 9 * i
  local codes_key = KEYS[tonumber(ARGV[base])]
  local site_id = ARGV[base + 1]
  local citizen = ARGV[base + 2]
  local phone = ARGV[base + 3]
  local masked = ARGV[base + 4]
  local reservation_id = ARGV[base + 5]

  local reply
  if not opens then
    reply = {'no-round'}
  elseif now < opens or now >= closes then
    reply = {'not-open', tostring(opens), tostring(closes)}
  else
    local held = redis.call('HGET', KEYS[3], citizen)
    if held then
      local record = redis.call('HGET', KEYS[4], held)
      local r = cjson.decode(record)
      if r.site == site_id and r.ph == phone then
        reply = {'existing', record}
      else
        reply = {'already-reserved'}
      end
    else
      local left = tonumber(redis.call('HGET', KEYS[2], site_id) or '0')
      if left < per_person then
        reply = {'sold-out', tostring(left)}
      else
        local code = nil
        for c = base + 6, base + 8 do
          if redis.call('HEXISTS', codes_key, ARGV[c]) == 0 then
            code = ARGV[c]
            break
          end
        end
        if not code then
          reply = {'no-code'}
        else
          local record = cjson.encode({
            id = reservation_id, site = site_id, qty = per_person, status = 'confirmed',
            code = code, cit = citizen, ph = phone, mask = masked,
            created = now, updated = now,
          })
          redis.call('HINCRBY', KEYS[2], site_id, -per_person)
          redis.call('HSET', codes_key, code, reservation_id)
          redis.call('HSET', KEYS[3], citizen, reservation_id)
          redis.call('HSET', KEYS[4], reservation_id, record)
          redis.call('HINCRBY', KEYS[5], 'reserved:' .. site_id, per_person)
          redis.call('HINCRBY', KEYS[5], 'created', 1)
          redis.call('XADD', KEYS[6], '*', 'kind', 'reservation', 'record', record)
          reply = {'created', record}
        end
      end
    end
  end
  replies[i + 1] = reply
end
return replies
