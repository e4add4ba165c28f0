-- retire.lua: remove a round's definition from under its old hash tag, before the round moves to
-- another programme's tag (allocator/operators.py), but only while it holds nothing else.
--
-- A round's keys share its programme's hash tag ({p:<programme>}, or {r:<round>} without one),
-- so a change of programme moves them. That is allowed only while the round holds nothing in
-- Redis but its definition: no batch, no stock, no reservation, no change in its ledger stream,
-- and only before it opens. Checked and done in one atomic step, so a batch or claim arriving
-- under the old tag either came first (and the move is refused) or finds no round (and changes
-- nothing).
--
-- KEYS[1]  round metadata hash   <p>:{<old tag>}:...round
-- KEYS[2]  stock hash            <p>:{<old tag>}:...stock
-- KEYS[3]  loaded hash           <p>:{<old tag>}:...loaded
-- KEYS[4]  batches hash          <p>:{<old tag>}:...batches
-- KEYS[5]  tally hash            <p>:{<old tag>}:...tally       seq, lost
-- KEYS[6]  reservations hash     <p>:{<old tag>}:...reservations
-- KEYS[7]  holders hash          <p>:{<old tag>}:...holders
-- KEYS[8]  ledger stream         <p>:{<old tag>}:...ledger      (kept: empty, with its group)
-- ARGV[1]  floor: the ledger's high-water `seq` for the round, or -1 when not known (a round
--          Redis has lost data of is never moved; claim.lua explains the check)
-- returns  {'retired'}           the round hash is gone (or was not there); nothing else was
--          {'busy', what}        what: a KEYS index that holds something, 'opened' or 'lost';
--                                nothing changed
-- errors   redis.error_reply 'ERR retire: ...' when ARGV is not one whole floor or KEYS are not
--          8; checked before anything is written
-- Times are milliseconds since the epoch, from Redis TIME.

local function whole(text)
  local x = tonumber(text)
  if x and x == x and x > -math.huge and x < math.huge and x == math.floor(x) then
    return x
  end
  return nil
end

local floor = whole(ARGV[1])
if #ARGV ~= 1 or #KEYS ~= 8 or not floor then
  return redis.error_reply('ERR retire: 8 KEYS and ARGV floor')
end
local state = redis.call('HMGET', KEYS[5], 'seq', 'lost')
if state[2] or (tonumber(state[1]) or 0) < floor then
  return {'busy', 'lost'}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local opens = tonumber(redis.call('HGET', KEYS[1], 'opens_ms') or '')
if opens and opens <= now then
  return {'busy', 'opened'}
end
for i = 2, 7 do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    return {'busy', tostring(i)}
  end
end
if redis.call('EXISTS', KEYS[8]) == 1 and redis.call('XLEN', KEYS[8]) > 0 then
  return {'busy', '8'}
end
redis.call('DEL', KEYS[1])
return {'retired'}
