-- settle.lua: copy a lottery round's freeze verdicts from the ledger into its entry records, in
-- one atomic step per chunk (allocator/lottery.py, after allocator/drawjob.py froze the round).
--
-- The freeze is decided in PostgreSQL (the record): entries whose citizen was in the
-- programme's cooldown became `excluded`, the others got a weight (1-4). The citizen reads an
-- entry from Redis, so the verdicts are copied here before the round hash says `frozen`. Only
-- entries whose verdict is not the default (weight 1) are passed. Copying is idempotent: an
-- entry already settled, withdrawn, won (award.lua may run meanwhile on another worker) or
-- excluded keeps its status; a weight is written on any entry not withdrawn. No ledger entry
-- and no `seq`: the ledger already has these states (the freeze wrote them).
--
-- KEYS[1]   round metadata hash    <p>:{r:<round>}:round      closes_ms
-- KEYS[2]   entries hash           <p>:{r:<round>}:entries    entry_id -> record (JSON)
-- ARGV[1], ARGV[2], ... pairs: entry_id, verdict (`x`: excluded; `1`-`4`: the weight, kept
--           in the record as `w`)
-- returns   {'settled', changed} (records changed) | {'open'} when the round has not closed by
--           Redis TIME (nothing written: a freeze happens only after the close)
-- errors    redis.error_reply 'ERR settle: ...' when ARGV is not whole pairs with a non-empty
--           entry_id and a verdict of x or 1-4; checked before anything is written
-- Times are milliseconds since the epoch, from Redis TIME, never from the client; an excluded
-- entry's `updated` is the time of this copy.

if #ARGV == 0 or #ARGV % 2 ~= 0 then
  return redis.error_reply('ERR settle: ARGV must be pairs of entry_id, verdict')
end
for i = 1, #ARGV, 2 do
  local verdict = ARGV[i + 1]
  if ARGV[i] == '' or not (verdict == 'x' or string.match(verdict, '^[1-4]$')) then
    return redis.error_reply('ERR settle: pair at ARGV[' .. i .. '] is malformed')
  end
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local closes = tonumber(redis.call('HGET', KEYS[1], 'closes_ms') or '')
if not closes or now < closes then
  return {'open'}
end

local changed = 0
for i = 1, #ARGV, 2 do
  local entry_id, verdict = ARGV[i], ARGV[i + 1]
  local record = redis.call('HGET', KEYS[2], entry_id)
  if record then
    local e = cjson.decode(record)
    local change = false
    if verdict == 'x' then
      if e.status == 'registered' then
        e.status, e.updated, change = 'excluded', now, true
      end
    elseif e.status ~= 'withdrawn' and e.status ~= 'excluded' and e.w ~= tonumber(verdict) then
      e.w, change = tonumber(verdict), true
    end
    if change then
      redis.call('HSET', KEYS[2], entry_id, cjson.encode(e))
      changed = changed + 1
    end
  end
end
return {'settled', changed}
