-- cancel.lua (stock shard j): the first half of a spread cancel: the record becomes cancelled
-- and its units go back to the sub-pool, with a ledger entry. The second half is release.lua
-- on the citizen shard (holder entry and cooldown bar). Stock first: a worker dying between
-- the two leaves a holder entry naming a cancelled reservation (the citizen cannot claim again
-- until the cancel is retried), never two live shares. Idempotent.
--
-- KEYS[1] stock  KEYS[2] records  KEYS[3] tally  KEYS[4] ledger (as take.lua's)
-- ARGV[1] reservation_id   ARGV[2] now_ms
-- returns {'cancelled', site, cit} (now, or before) | {'not-found'}

local id, now = ARGV[1], tonumber(ARGV[2])
local rec = redis.call('HGET', KEYS[2], id)
if not rec or rec == 'void' then
  return {'not-found'}
end
local r = cjson.decode(rec)
if r.status == 'cancelled' then
  return {'cancelled', r.site, r.cit}
end
r.status = 'cancelled'
r.updated = now
local record = cjson.encode(r)
redis.call('HSET', KEYS[2], id, record)
redis.call('HINCRBY', KEYS[1], r.site, r.qty)
local seq = redis.call('HINCRBY', KEYS[3], 'seq', 1)
redis.call('HINCRBY', KEYS[3], 'reserved:' .. r.site, -r.qty)
redis.call('XADD', KEYS[4], '*', 'kind', 'cancelled', 'record', record, 'seq', seq)
return {'cancelled', r.site, r.cit}
