-- reap.lua (stock shard j): the reaper's question to a stock shard about pending entries past
-- their expiry: was the unit taken here? For each reservation_id: a record -> {'taken', code,
-- created_ms} (the reaper then confirms, confirm.lua); none -> the id is fenced (record
-- 'void', so that a slow worker's take.lua can never take it later) and {'void'} is answered.
-- Only when every stock shard of the site answered void does the reaper delete the entry
-- (release.lua). Idempotent: fencing twice, or after a take, changes nothing.
--
-- KEYS[1]  records hash  <p>:{s..}:records  reservation_id -> record JSON | 'void'
-- ARGV[1..] reservation_ids
-- returns  per id {'taken', code, created_ms} | {'void'}

if #ARGV == 0 then
  return {}
end
local known = redis.call('HMGET', KEYS[1], unpack(ARGV))
local replies, fence = {}, {}
for i = 1, #ARGV do
  local rec = known[i]
  if rec and rec ~= 'void' then
    local r = cjson.decode(rec)
    replies[i] = {'taken', r.code, tostring(r.created)}
  else
    if not rec then
      fence[#fence + 1] = ARGV[i]
      fence[#fence + 1] = 'void'
    end
    replies[i] = {'void'}
  end
end
if #fence > 0 then
  redis.call('HSET', KEYS[1], unpack(fence))
end
return replies
