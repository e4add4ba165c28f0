-- expire.lua: after a round's pickup window, record its uncollected reservations as expired,
-- one bounded chunk of the reservations hash per call (an HSCAN step).
--
-- A `confirmed` reservation becomes `expired` (and nothing else ever does): its units move from
-- the tally's `reserved:<site>` to `expired:<site>`, the round's `seq` is bumped and the record
-- goes to the ledger stream, one entry per reservation, like every other change. Its holder is
-- kept: an expired reservation is still the citizen's share of the round. Running a chunk twice,
-- or two runners at once, changes nothing more: the status check makes each move happen once.
--
-- Runners are coordinated by a lock in the sweep hash (owner, until): a runner naming itself
-- takes the lock for `ttl` ms, renews it with every chunk and gives it up after the last one;
-- while another owner holds it the answer is `busy`. A round whose sweep finished is marked
-- `done` = the pickup_end_ms it was swept for (an operator who moves pickup_end gets a new sweep).
--
-- KEYS[1]  round metadata hash   <p>:{r:<round>}:round         pickup_end_ms
-- KEYS[2]  reservations hash     <p>:{r:<round>}:reservations  reservation_id -> record (JSON)
-- KEYS[3]  tally hash            <p>:{r:<round>}:tally         reserved:<site>, expired:<site>,
--                                                              seq, lost
-- KEYS[4]  ledger stream         <p>:{r:<round>}:ledger
-- KEYS[5]  sweep hash            <p>:{r:<round>}:sweep         owner, until (ms), done (ms)
-- ARGV[1]  HSCAN cursor: '0' to start, then the cursor the previous chunk answered
-- ARGV[2]  chunk size: the HSCAN COUNT (whole, 1 to 1000)
-- ARGV[3]  runner: a name unique to the caller, or '' to run one chunk without the lock and
--          without looking at `done` (the carry-over makes sure with it that nothing is left)
-- ARGV[4]  lock time (ms, whole >= 1): how long the lock holds without a renewal
-- ARGV[5]  floor: the ledger's high-water `seq` for the round, or -1 when not known (claim.lua
--          explains the integrity check)
-- returns  {'swept', next cursor, reservations expired by this chunk}  next cursor '0': the
--                                  sweep is complete (`done` set, the lock given up)
--          {'done'}                the round was swept for its current pickup_end already
--          {'not-yet', pickup_end_ms}  the pickup window has not ended (Redis TIME)
--          {'busy', until_ms}      another runner holds the lock until then
--          {'no-round'}
--          {'lost', mark}          the round is lost (Redis is behind the ledger)
-- errors   redis.error_reply 'ERR expire: ...' when ARGV is not a cursor (decimal digits), a chunk
--          size of 1 to 1000, a runner (or ''), a whole lock time >= 1 and a whole floor;
--          checked before anything is written
-- Times are milliseconds since the epoch, from Redis TIME, never from the client.

local function whole(text)
  local x = tonumber(text)
  if x and x == x and x > -math.huge and x < math.huge and x == math.floor(x) then
    return x
  end
  return nil
end

local cursor, runner = ARGV[1], ARGV[3]
local count, ttl, floor = whole(ARGV[2]), whole(ARGV[4]), whole(ARGV[5])
if #ARGV ~= 5 or not string.match(cursor or '', '^%d+$') or not count or count < 1
    or count > 1000 or not ttl or ttl < 1 or not floor then
  return redis.error_reply('ERR expire: ARGV must be cursor, count, runner, ttl, floor')
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local state = redis.call('HMGET', KEYS[3], 'seq', 'lost')
local seq, lost = tonumber(state[1]) or 0, state[2]
if not lost and seq < floor then
  lost = cjson.encode({at = now, redis = seq, ledger = floor})
  redis.call('HSET', KEYS[3], 'lost', lost)
end
if lost then
  return {'lost', lost}
end

local pickup_end = redis.call('HGET', KEYS[1], 'pickup_end_ms')
if not pickup_end then
  return {'no-round'}
end
if now < tonumber(pickup_end) then
  return {'not-yet', pickup_end}
end
if runner ~= '' then
  local sweep = redis.call('HMGET', KEYS[5], 'owner', 'until', 'done')
  if cursor == '0' and sweep[3] == pickup_end then
    return {'done'}
  end
  local until_ms = tonumber(sweep[2]) or 0
  if sweep[1] and sweep[1] ~= runner and until_ms > now then
    return {'busy', tostring(until_ms)}
  end
  redis.call('HSET', KEYS[5], 'owner', runner, 'until', tostring(now + ttl))
end

local step = redis.call('HSCAN', KEYS[2], cursor, 'COUNT', count)
local next_cursor, found = step[1], step[2]
local expired = 0
for i = 1, #found, 2 do
  local r = cjson.decode(found[i + 1])
  if r.status == 'confirmed' then
    r.status = 'expired'
    r.updated = now
    local record = cjson.encode(r)
    redis.call('HSET', KEYS[2], found[i], record)
    redis.call('HINCRBY', KEYS[3], 'reserved:' .. r.site, -r.qty)
    redis.call('HINCRBY', KEYS[3], 'expired:' .. r.site, r.qty)
    seq = seq + 1
    redis.call('XADD', KEYS[4], '*', 'kind', 'reservation', 'record', record,
      'seq', tostring(seq))
    expired = expired + 1
  end
end
if expired > 0 then
  redis.call('HSET', KEYS[3], 'seq', tostring(seq))
end
if next_cursor == '0' and runner ~= '' then
  redis.call('HSET', KEYS[5], 'done', pickup_end)
  redis.call('HDEL', KEYS[5], 'owner', 'until')
end
return {'swept', next_cursor, tostring(expired)}
