-- enter.lua: admit and decide lottery entries for one round, one or many requests in one atomic
-- step (the entries' claim.lua).
--
-- Each item is checked in order, as claim.lua checks a claim: the token buckets (whole round,
-- client address, citizen; the same gate as claim.lua, in the same hashes: an entry and a claim
-- of one citizen spend one bucket), the round (it must be a lottery round), the registration
-- window, then the citizen, then the citizen's cooldown in the round's programme (as
-- claim.lua), and only then is anything changed. There is no stock check: entries take no
-- units. One item's refusal never affects another; items are decided in order, so the same
-- citizen twice in one call behaves exactly as two calls would. The round's integrity comes
-- first, as in claim.lua (`seq` against the floor).
--
-- Lean in claim.lua's way (docs/performance.md, "Entries, lean"): every hash this call needs is
-- read with one HMGET per key (entrants, the entries they hold, the tally, the buckets, the
-- cooldowns), the items are decided on those copies and everything is written at the end with
-- one command per key (plus one XADD per change). A new entry's record is built by hand from
-- fields checked against patterns of plain ASCII characters. Decisions are exactly those of the
-- script it replaced (tests/fixtures/enter_v1.lua; tests/test_enter_differential.py).
--
-- KEYS[1]   round metadata hash    <p>:{r:<round>}:round      opens_ms, closes_ms, mode,
--                                                             programme
-- KEYS[2]   entries hash           <p>:{r:<round>}:entries    entry_id -> record (JSON)
-- KEYS[3]   entrants hash          <p>:{r:<round>}:entrants   citizen hash -> entry_id (live)
-- KEYS[4]   tally hash             <p>:{r:<round>}:tally      entries:<site>, seq, lost
-- KEYS[5]   ledger stream          <p>:{r:<round>}:ledger     one entry per state change
-- KEYS[6]   entitlement hash       <p>:{p:<programme>}:entitled citizen hash ->
--           "<until_ms> <reservation_id>" (claim.lua and award.lua write it): read, never
--           written, and only when the round hash has a `programme` (then every key here is
--           under the programme's tag, one slot)
-- KEYS[7]   token buckets, even    <p>:{r:<round>}:gate:0     claim.lua's KEYS[7] and KEYS[8]:
-- KEYS[8]   token buckets, odd     <p>:{r:<round>}:gate:1     the round's buckets ("The gate")
-- ARGV[1]   number of items n (1..2000)
-- ARGV[2..7] bucket rates (tokens per second) and bursts (tokens), as claim.lua's ARGV[2..7]
-- ARGV[8]   floor: the ledger's high-water `seq` for the round, or -1 when not known
-- ARGV[9..] n items, one string each: first, at fixed widths, the citizen hash (64 characters),
--           the phone hash (64) and the client address hash (32; 32 '-': none, a desk's entry
--           skips the per-address bucket), all of 0-9 a-z A-Z; then 6 fields, each after one
--           space: site_id, masked citizen id, new entry_id (<secret>.<round_id>),
--           accept_district (0 or 1), channel (desk | web | mini-program | api), age band
--           (0-17 | 18-39 | 40-64 | 65+, at the round's opening date; for the fairness report)
-- returns   one reply per item, in order:
--           {'created', created_ms} (the new record is the caller's item with this:
--           allocator/entries.py builds it) | {'existing', record} (same citizen and phone: the
--           entry, now with this item's site_id and accept_district) | {'already-entered'}
--           (another phone) | {'in-cooldown', until_ms} (a live reservation in another round of
--           the programme bars the citizen until then: no entry is made, an existing one is left
--           unchanged) | {'not-open', opens_ms, closes_ms} | {'no-round'} | {'wrong-mode'} (an
--           fcfs round) | {'gated', retry_after_ms, bucket} | {'lost', mark} for every item when
--           lost
--           record: JSON {id, site, acc (0|1), status, cit, ph, mask, created, updated, ch,
--           age}; ch and age are those of the item that created the entry (a later item of
--           the same citizen changes only site and acc)
-- errors    redis.error_reply 'ERR enter: ...' when ARGV is not a whole n in 1..2000, six
--           bucket settings (numbers > 0), a whole floor and n items, or an item is not laid
--           out as above (widths, characters, accept_district 0/1, the channel and age band one
--           of theirs); all checked before any write
-- Times are milliseconds since the epoch, from Redis TIME, never from the client.

local HEAD = 9 -- first item in ARGV
local MAX_ITEMS = 2000 -- HMGET arguments go through unpack (Lua's C stack holds about 8000)
-- One item (see ARGV[9..]): as claim.lua's, every field that goes into a new record is made of
-- characters JSON never escapes, checked here; the record is built by concatenation.
local HASHES = 160 -- citizen hash 64, phone hash 64, client hash 32
local NO_CLIENT = '--------------------------------'
local REST = '^ ([%w_%-]+) ([%d%*X]+) ([%w_%-]+%.[%w_%-]+) ([01]) (%S+) (%S+)$'
local function channel_ok(ch)
  return ch == 'web' or ch == 'api' or ch == 'mini-program' or ch == 'desk'
end
local function age_band_ok(age)
  return age == '18-39' or age == '40-64' or age == '65+' or age == '0-17'
end
local function alnum(b)
  return b and ((b >= 97 and b <= 122) or (b >= 48 and b <= 57) or (b >= 65 and b <= 90))
end

local function number(text)
  local x = tonumber(text)
  if x and x == x and x > -math.huge and x < math.huge then
    return x
  end
  return nil
end

local function whole(text)
  local x = number(text)
  if x and x == math.floor(x) then
    return x
  end
  return nil
end

local function refuse(why)
  return redis.error_reply('ERR enter: ' .. why)
end

local n = whole(ARGV[1])
local floor = whole(ARGV[8])
if not n or n < 1 or n > MAX_ITEMS or not floor or #ARGV ~= HEAD - 1 + n then
  return refuse('ARGV must be n (1..' .. MAX_ITEMS .. '), six bucket settings, floor, then n items')
end
local settings = {false, number(ARGV[2]), number(ARGV[3]), number(ARGV[4]), number(ARGV[5]),
  number(ARGV[6]), number(ARGV[7])} -- read as settings[2..7], like ARGV
for i = 2, 7 do
  if not settings[i] or settings[i] <= 0 then
    return refuse('bucket rates and bursts must be numbers above 0')
  end
end
local items = {}
for i = 1, n do
  local text = ARGV[HEAD + i - 1]
  local cit, ph, client = string.sub(text, 1, 64), string.sub(text, 65, 128),
    string.sub(text, 129, HASHES)
  local site, mask, id, acc, ch, age = string.match(text, REST, HASHES + 1)
  local b1 = string.byte(text, 1)
  local b64, b65 = string.byte(text, 64, 65)
  local b128, b129 = string.byte(text, 128, 129)
  local b160 = string.byte(text, HASHES)
  local none = client == NO_CLIENT
  if not (site and tonumber(cit, 36) and tonumber(ph, 36) and (none or tonumber(client, 36))
      and alnum(b1) and alnum(b64) and alnum(b65) and alnum(b128)
      and (none or (alnum(b129) and alnum(b160))) and channel_ok(ch) and age_band_ok(age)) then
    return refuse('item ' .. i .. ' is not laid out as ARGV[9..] says')
  end
  items[i] = {
    site = site, cit = cit, ph = ph, mask = mask, id = id, acc = tonumber(acc), ch = ch,
    age = age, client = not none and client,
  }
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_text = tostring(now)

-- integrity first (the same few lines open every script that changes a round)
local state = redis.call('HMGET', KEYS[4], 'seq', 'lost')
local seq, lost = tonumber(state[1]) or 0, state[2]
if not lost and seq < floor then
  lost = cjson.encode({at = now, redis = seq, ledger = floor})
  redis.call('HSET', KEYS[4], 'lost', lost)
end
if lost then
  local replies = {}
  for i = 1, n do
    replies[i] = {'lost', lost}
  end
  return replies
end
local first_seq = seq

local round = redis.call('HMGET', KEYS[1], 'opens_ms', 'closes_ms', 'mode', 'programme')
local opens, closes, mode = tonumber(round[1]), tonumber(round[2]), round[3]
local open = opens and mode == 'lottery' and now >= opens and now < closes

-- The gate: three token buckets (allocator/gate.py), the same arithmetic as lua/enter.lua's.
-- All of a round's buckets are fields of one hash (`g`; `c:<client hash>`; `z:<citizen hash>`),
-- value "<tokens> <ts_ms>", in two generations of W ms each: generation g = floor(now / W)
-- lives in KEYS[7 + g % 2] and its field `_g` says "<g>:<W>". A bucket is read from the current
-- generation, else from the previous one, and written to the current one; the hash of the
-- generation before that is emptied before its key is used again. W is longer than any bucket
-- takes to fill up from empty, so a bucket missing from both is full, exactly as the expired
-- key of the one-key-per-bucket layout was (its TTL was burst / rate + 1 s). A call with other
-- bucket settings than the last (W changed) finds no generation of its own: all buckets full.
local limits = {
  global = {settings[2], settings[3]},
  client = {settings[4], settings[5]},
  citizen = {settings[6], settings[7]},
}
local width = math.max(math.ceil(settings[3] / settings[2] * 1000),
  math.ceil(settings[5] / settings[4] * 1000), math.ceil(settings[7] / settings[6] * 1000)) + 1000
local generation = math.floor(now / width)
local mark = generation .. ':' .. width
local current_key = KEYS[7 + generation % 2]
local previous_key = KEYS[7 + (generation - 1) % 2]

local gate_fields, gate_at = {'_g', 'g'}, {g = 2}
for i = 1, n do
  local item = items[i]
  if item.client then
    item.client_field = 'c:' .. item.client
    if not gate_at[item.client_field] then
      gate_fields[#gate_fields + 1] = item.client_field
      gate_at[item.client_field] = #gate_fields
    end
  end
  item.citizen_field = 'z:' .. item.cit
  if not gate_at[item.citizen_field] then
    gate_fields[#gate_fields + 1] = item.citizen_field
    gate_at[item.citizen_field] = #gate_fields
  end
end
local current = redis.call('HMGET', current_key, unpack(gate_fields))
local previous = redis.call('HMGET', previous_key, unpack(gate_fields))
local current_ours = current[1] == mark
local previous_ours = previous[1] == (generation - 1) .. ':' .. width

local buckets = {}
local function bucket(field, kind)
  local b = buckets[field]
  if not b then
    local rate, burst = limits[kind][1], limits[kind][2]
    local at = gate_at[field]
    local saved = (current_ours and current[at]) or (previous_ours and previous[at])
    local tokens, ts
    if saved then
      local t_text, ts_text = string.match(saved, '^(%S+) (%S+)$')
      tokens, ts = tonumber(t_text), tonumber(ts_text)
    end
    if not tokens then
      tokens, ts = burst, now
    end
    tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
    b = {tokens = tokens, rate = rate, burst = burst, kind = kind, dirty = false}
    buckets[field] = b
  end
  return b
end


-- What the items need, read once: the entrants' entries and their records, the cooldowns.
local held, records, bars = {}, {}, {}
if open then
  local citizens = {}
  for i = 1, n do
    citizens[i] = items[i].cit
  end
  local found = redis.call('HMGET', KEYS[3], unpack(citizens))
  local ids = {}
  for i = 1, n do
    if found[i] and not held[citizens[i]] then
      held[citizens[i]] = found[i]
      ids[#ids + 1] = found[i]
    end
  end
  if #ids > 0 then
    local got = redis.call('HMGET', KEYS[2], unpack(ids))
    for j = 1, #ids do
      records[ids[j]] = got[j]
    end
  end
  -- Cooldown, as claim.lua reads it. A bar set by a reservation of this very round (a won
  -- entry's, after the draw) is not a bar on entering it: entering is closed by then anyway.
  -- Entries set no bar (only reservations do).
  if round[4] and round[4] ~= '' then
    local bars_found = redis.call('HMGET', KEYS[6], unpack(citizens))
    for i = 1, n do
      if bars_found[i] then
        local until_ms, held_id = string.match(bars_found[i], '^(%d+) (%S+)$')
        bars[citizens[i]] = {until_ms = tonumber(until_ms), id = held_id}
      end
    end
  end
end
local function round_of(id)
  return string.match(id or '', '%.(.*)$')
end
local function barred(citizen, entry_id)
  local bar = bars[citizen]
  if bar and bar.until_ms and bar.until_ms > now and round_of(bar.id) ~= round_of(entry_id) then
    return bar.until_ms
  end
  return nil
end

-- the longest wait of the buckets so far and the first bucket that asks for it
local function short(b, wait, refused_by)
  if b.tokens < 1 then
    local need = math.ceil((1 - b.tokens) * 1000 / b.rate)
    if need > wait then
      return need, b.kind
    end
  end
  return wait, refused_by
end

-- decided here, written after the loop
local changed, changed_at = {}, {} -- entry_ids whose record changed, in order; id -> position
local logged = {} -- records for the ledger, in order (one per change)
local entrants_args = {}
local counts = {} -- site -> change of its entries:<site>
local function count(site, by)
  counts[site] = (counts[site] or 0) + by
end

local replies = {}
local global = bucket('g', 'global')
for i = 1, n do
  local item = items[i]
  local client = item.client_field and bucket(item.client_field, 'client')
  local citizen_b = bucket(item.citizen_field, 'citizen')

  local wait, refused_by = short(global, 0, nil)
  if client then
    wait, refused_by = short(client, wait, refused_by)
  end
  wait, refused_by = short(citizen_b, wait, refused_by)

  local reply
  if refused_by then
    reply = {'gated', tostring(wait), refused_by}
  else
    global.tokens = global.tokens - 1
    global.dirty = true
    if client then
      client.tokens = client.tokens - 1
      client.dirty = true
    end
    citizen_b.tokens = citizen_b.tokens - 1
    citizen_b.dirty = true
    if not opens then
      reply = {'no-round'}
    elseif mode ~= 'lottery' then
      reply = {'wrong-mode'}
    elseif not open then
      reply = {'not-open', tostring(opens), tostring(closes)}
    else
      local cit, site_id = item.cit, item.site
      local holding = held[cit]
      local until_ms = barred(cit, item.id)
      if holding then
        local record = records[holding]
        local r = cjson.decode(record)
        if r.ph ~= item.ph then
          reply = {'already-entered'}
        elseif until_ms then
          reply = {'in-cooldown', tostring(until_ms)}
        else
          -- the last choice before close counts
          if r.site ~= site_id or r.acc ~= item.acc then
            if r.site ~= site_id then
              count(r.site, -1)
              count(site_id, 1)
            end
            r.site, r.acc, r.updated = site_id, item.acc, now
            record = cjson.encode(r)
            records[holding] = record
            if not changed_at[holding] then
              changed[#changed + 1] = holding
              changed_at[holding] = true
            end
            logged[#logged + 1] = record
          end
          reply = {'existing', record}
        end
      elseif until_ms then
        reply = {'in-cooldown', tostring(until_ms)}
      else
        local id = item.id
        local record = '{"id":"' .. id .. '","site":"' .. site_id .. '","acc":' .. item.acc
          .. ',"status":"registered","cit":"' .. cit .. '","ph":"' .. item.ph .. '","mask":"'
          .. item.mask .. '","created":' .. now_text .. ',"updated":' .. now_text .. ',"ch":"'
          .. item.ch .. '","age":"' .. item.age .. '"}'
        held[cit] = id
        records[id] = record
        changed[#changed + 1] = id
        changed_at[id] = true
        entrants_args[#entrants_args + 1] = cit
        entrants_args[#entrants_args + 1] = id
        count(site_id, 1)
        logged[#logged + 1] = record
        reply = {'created', now}
      end
    end
  end
  replies[i] = reply
end

-- Everything decided; now the writes, one command per key (XADD: one per change).
if #changed > 0 then
  local records_args = {}
  for _, id in ipairs(changed) do
    records_args[#records_args + 1] = id
    records_args[#records_args + 1] = records[id]
  end
  redis.call('HSET', KEYS[2], unpack(records_args))
  if #entrants_args > 0 then
    redis.call('HSET', KEYS[3], unpack(entrants_args))
  end
  for _, record in ipairs(logged) do
    seq = seq + 1
    redis.call('XADD', KEYS[5], '*', 'kind', 'entry', 'record', record, 'seq', tostring(seq))
  end
  local site_fields, site_list = {}, {}
  for site in pairs(counts) do -- every site counted, as HINCRBY would (a field of 0 stays)
    site_list[#site_list + 1] = site
    site_fields[#site_fields + 1] = 'entries:' .. site
  end
  local tally_args = {}
  if #site_list > 0 then
    local before = redis.call('HMGET', KEYS[4], unpack(site_fields))
    for s = 1, #site_list do
      tally_args[#tally_args + 1] = site_fields[s]
      tally_args[#tally_args + 1] = (tonumber(before[s]) or 0) + counts[site_list[s]]
    end
  end
  if seq ~= first_seq then
    tally_args[#tally_args + 1] = 'seq'
    tally_args[#tally_args + 1] = tostring(seq)
  end
  if #tally_args > 0 then
    redis.call('HSET', KEYS[4], unpack(tally_args))
  end
end

local gate_args = {}
for field, b in pairs(buckets) do
  if b.dirty then
    gate_args[#gate_args + 1] = field
    gate_args[#gate_args + 1] = tostring(b.tokens) .. ' ' .. now_text
  end
end
if #gate_args > 0 then
  if not current_ours then
    -- the generation before last (or of other settings): nothing in it is needed any more
    redis.call('UNLINK', current_key)
    gate_args[#gate_args + 1] = '_g'
    gate_args[#gate_args + 1] = mark
  end
  redis.call('HSET', current_key, unpack(gate_args))
  if not current_ours then
    -- needed until the end of the next generation, (generation + 2) * W, and this first write
    -- is at generation * W or later; an idle round's buckets go with it
    redis.call('PEXPIRE', current_key, 2 * width)
  end
end
return replies
