-- claim.lua: admit and decide reservations for one round, one or many requests in one atomic step.
--
-- Each item is checked in order: the token buckets (whole round, client address, citizen), the
-- round window, then the citizen (a duplicate never touches stock), then the citizen's cooldown
-- in the round's programme, then stock, and only then is anything changed. One item's refusal
-- never affects another; items are decided in order, so the same citizen twice in one call
-- behaves exactly as two calls would.
--
-- Lean by design (docs/performance.md, "claim.lua, lean"): every hash this call needs is read
-- with one HMGET per key (holders, stock, tally, the codes of each site, the buckets), the
-- items are decided on those copies, and everything is written at the end with one command per
-- key (plus one XADD per reservation). Decisions are exactly those of the one-item-at-a-time
-- script it replaced (tests/fixtures/claim_v1.lua; tests/test_claim_differential.py compares
-- them). The record JSON is built by hand: every field that goes into it is checked against a
-- pattern of plain ASCII characters (no quote, backslash or control character) first.
--
-- Before any item, the round's integrity: every change to a round bumps its sequence number
-- (tally field `seq`, carried in each ledger entry), and the caller passes the highest `seq` the
-- ledger in PostgreSQL has committed (the floor). A Redis whose `seq` is below the floor has lost
-- changes the ledger has (restored from an old AOF, or emptied): the round is marked lost (tally
-- field `lost`, sticky until `allot rebuild`), every item answers `lost`, and nothing else changes.
--
-- KEYS[1]   round metadata hash    <p>:{r:<round>}:round        opens_ms, closes_ms, per_person,
--                                                               mode, programme, cooldown_days
-- KEYS[2]   stock hash             <p>:{r:<round>}:stock        site_id -> units left
-- KEYS[3]   holders hash           <p>:{r:<round>}:holders      citizen hash -> reservation_id
-- KEYS[4]   reservations hash      <p>:{r:<round>}:reservations reservation_id -> record (JSON)
-- KEYS[5]   tally hash             <p>:{r:<round>}:tally        reserved:<site>, created, seq, lost
-- KEYS[6]   ledger stream          <p>:{r:<round>}:ledger       one entry per state change
-- KEYS[7]   token buckets, even    <p>:{r:<round>}:gate:0       the round's token buckets, two
-- KEYS[8]   token buckets, odd     <p>:{r:<round>}:gate:1       generations (see "The gate")
-- KEYS[9]   entitlement hash       <p>:{p:<programme>}:entitled citizen hash ->
--           "<until_ms> <reservation_id>": the programme's cooldowns, read and written only when
--           the round hash has a `programme` (a round of a programme has all its keys under the
--           programme's tag {p:<programme>} instead of {r:<round>}, so this is one slot too)
-- KEYS[10..] per-item keys, referred to by index from ARGV:
--           pickup codes of a site <p>:{r:<round>}:codes:<site>      code -> reservation_id
--           holders of a site      <p>:{r:<round>}:siteholders:<site> set of citizen hashes
--           askers of a group      <p>:{r:<round>}:fair:asked:<dimension>:<group>  set of
--                                  citizen hashes (district, age_band, channel): who reserved
--                                  or was refused sold-out (the fairness report's `asked`)
-- ARGV[1]   number of items n (1..2000)
-- ARGV[2..7] bucket rates (tokens per second) and bursts (tokens):
--           global rate, global burst, client rate, client burst, citizen rate, citizen burst
-- ARGV[8]   floor: the ledger's high-water `seq` for the round, or -1 when the caller does not
--           know it (then only a `lost` mark already set refuses)
-- ARGV[9..] n items, one string each (one argument per item keeps the client's packing cheap):
--           first, at fixed widths, the citizen hash (64 characters), the phone hash (64) and
--           the client address hash (32; 32 '-': none, a desk's claim skips the per-address
--           bucket), all of 0-9 a-z A-Z; then 14 fields, each after one space: codes key index,
--           site-holders key index, askers key indexes for the district, age band and channel
--           (0: not counted), all into KEYS[10..]; site_id, masked citizen id, new
--           reservation_id (<secret>.<round_id>), channel (desk | web | mini-program | api), age
--           band (0-17 | 18-39 | 40-64 | 65+), region (the ID's issuing prefix, digits), three
--           candidate pickup codes
-- returns   one reply per item, in order:
--           {'created', code, created_ms, qty} (the new record is the caller's item with these:
--           allocator/claims.py builds it) | {'existing', record} | {'already-reserved'} |
--           {'in-cooldown', until_ms} (a live reservation in another round of the programme
--           bars the citizen until then) |
--           {'sold-out', units left} | {'not-open', opens_ms, closes_ms} | {'no-round'} |
--           {'wrong-mode'} (a lottery round: citizens enter it, lua/enter.lua) |
--           {'gated', retry_after_ms, bucket} (bucket: global | client | citizen) |
--           {'no-code'} (every candidate pickup code was taken; retry with new ones) |
--           {'lost', mark} for every item when the round is lost (mark: JSON {at, redis, ledger})
-- errors    redis.error_reply 'ERR claim: ...' when ARGV is not a whole n in 1..2000, six bucket
--           settings (numbers > 0), a whole floor and n items, or an item is not laid out as
--           above (widths, characters, the channel and age band one of theirs) or has a key
--           index outside KEYS[10..] (0 allowed where said); all checked before anything is
--           written
-- Times are milliseconds since the epoch, from Redis TIME, never from the client.

local HEAD = 9 -- first item in ARGV
local ITEM_KEYS = 10 -- first per-item key in KEYS
local MAX_ITEMS = 2000 -- HMGET arguments go through unpack (Lua's C stack holds about 8000)
local DAY_MS = 86400000
-- One item (see ARGV[9..]). Every field that goes into the record is made of characters JSON
-- never escapes (no quote, backslash, control or non-ASCII byte): the record is built by
-- concatenation, so these checks are what keep it valid JSON with exactly its own fields. The
-- three hashes are checked at C speed (tonumber in base 36 reads 0-9 a-z A-Z only, after
-- optional white space and sign and before white space, which their first and last bytes
-- rule out); the rest, about 110 characters, by one pattern.
local HASHES = 160 -- citizen hash 64, phone hash 64, client hash 32
-- (constants written out whole: this part runs on every call, and Lua 5.1 folds no
-- concatenation and builds every table constructor afresh)
local NO_CLIENT = '--------------------------------'
local REST = '^ (%d+) (%d+) (%d+) (%d+) (%d+) ([%w_%-]+) ([%d%*X]+) ([%w_%-]+%.[%w_%-]+) (%S+) (%S+) (%d+) (%w+) (%w+) (%w+)$'
local function channel_ok(ch)
  return ch == 'web' or ch == 'api' or ch == 'mini-program' or ch == 'desk'
end
local function age_band_ok(age)
  return age == '18-39' or age == '40-64' or age == '65+' or age == '0-17'
end
-- a byte of 0-9 A-Z a-z (compared, not looked up: a table would be built on every call)
local function alnum(b)
  return b and ((b >= 97 and b <= 122) or (b >= 48 and b <= 57) or (b >= 65 and b <= 90))
end

-- Every argument is checked before anything is written (a script does not roll back: an
-- error on item k must not leave items < k committed).
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
  return redis.error_reply('ERR claim: ' .. why)
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
local nkeys = #KEYS
local function index(text, optional)
  if text == '0' then
    return optional and 0 or nil
  end
  local at = tonumber(text)
  if (at < ITEM_KEYS and not (optional and at == 0)) or at > nkeys then
    return nil
  end
  return at
end
local items = {}
for i = 1, n do
  local text = ARGV[HEAD + i - 1]
  local cit, ph, client = string.sub(text, 1, 64), string.sub(text, 65, 128),
    string.sub(text, 129, HASHES)
  local k1, k2, k3, k4, k5, site, mask, id, ch, age, reg, c1, c2, c3 =
    string.match(text, REST, HASHES + 1)
  -- each hash's first and last byte (tonumber would skip white space and a sign there)
  local b1 = string.byte(text, 1)
  local b64, b65 = string.byte(text, 64, 65)
  local b128, b129 = string.byte(text, 128, 129)
  local b160 = string.byte(text, HASHES)
  local none = client == NO_CLIENT
  if not (k1 and tonumber(cit, 36) and tonumber(ph, 36) and (none or tonumber(client, 36))
      and alnum(b1) and alnum(b64) and alnum(b65) and alnum(b128)
      and (none or (alnum(b129) and alnum(b160))) and channel_ok(ch) and age_band_ok(age)) then
    return refuse('item ' .. i .. ' is not laid out as ARGV[9..] says')
  end
  local codes, holders, a1, a2, a3 =
    index(k1), index(k2), index(k3, true), index(k4, true), index(k5, true)
  if not (codes and holders and a1 and a2 and a3) then
    return refuse('item ' .. i .. ': a key index must point into KEYS[10..]')
  end
  items[i] = {
    codes = codes, holders = holders, a1 = a1, a2 = a2, a3 = a3, site = site, cit = cit,
    ph = ph, mask = mask, id = id, ch = ch, age = age, reg = reg,
    client = not none and client, c1 = c1, c2 = c2, c3 = c3,
  }
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_text = tostring(now)

-- the sites of this call, each once: their stock and tally fields are read with one HMGET each
local sites, site_list = {}, {}
for i = 1, n do
  local site = items[i].site
  if not sites[site] then
    sites[site] = true
    site_list[#site_list + 1] = site
  end
end
local tally_fields = {'seq', 'lost', 'created'}
for s = 1, #site_list do
  tally_fields[3 + s] = 'reserved:' .. site_list[s]
end

-- integrity first (the same few lines open every script that changes a round)
local state = redis.call('HMGET', KEYS[5], unpack(tally_fields))
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
local created = tonumber(state[3]) or 0
local reserved = {} -- site -> the tally's reserved:<site>
for s = 1, #site_list do
  reserved[site_list[s]] = tonumber(state[3 + s]) or 0
end

local round = redis.call('HMGET', KEYS[1], 'opens_ms', 'closes_ms', 'per_person', 'mode',
  'programme', 'cooldown_days')
local opens, closes, per_person = tonumber(round[1]), tonumber(round[2]), tonumber(round[3])
-- a lottery round takes entries, not reservations: refused with the round check, before the
-- round window (the order gate, round, window, citizen, stock is unchanged)
local lottery = round[4] == 'lottery'
local open = opens and not lottery and now >= opens and now < closes

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

-- What the items need, read once: holders of the citizens, the cooldowns, stock, the codes.
local held, bars, left, taken = {}, {}, {}, {}
local codes_of = {} -- codes key index -> list of candidates asked about, index -> position
if open then
  local citizens = {}
  for i = 1, n do
    citizens[i] = items[i].cit
  end
  local found = redis.call('HMGET', KEYS[3], unpack(citizens))
  for i = 1, n do
    if found[i] then
      held[citizens[i]] = found[i]
    end
  end
  local stock = redis.call('HMGET', KEYS[2], unpack(site_list))
  for s = 1, #site_list do
    left[site_list[s]] = tonumber(stock[s] or '0')
  end
  for i = 1, n do
    local item = items[i]
    local c = codes_of[item.codes]
    if not c then
      c = {list = {}, at = {}}
      codes_of[item.codes] = c
    end
    local list, at = c.list, c.at
    if not at[item.c1] then list[#list + 1] = item.c1; at[item.c1] = true end
    if not at[item.c2] then list[#list + 1] = item.c2; at[item.c2] = true end
    if not at[item.c3] then list[#list + 1] = item.c3; at[item.c3] = true end
  end
  for at, c in pairs(codes_of) do
    local found_codes = redis.call('HMGET', KEYS[at], unpack(c.list))
    local t_codes = {}
    for j = 1, #c.list do
      if found_codes[j] then
        t_codes[c.list[j]] = true
      end
    end
    taken[at] = t_codes
  end
end

-- Cooldown (allocator/entitlement.py): a live reservation in one round of a programme bars its
-- citizen from every other round of it until created + that round's cooldown_days. The bars of
-- this call's citizens are read with one HMGET, kept here while the items are decided (a claim
-- made by an earlier item bars a later one at once), and written as claims are made.
local programme = round[5] and round[5] ~= ''
local cooldown_ms = (tonumber(round[6]) or 0) * DAY_MS
if programme and open then
  local citizens = {}
  for i = 1, n do
    citizens[i] = items[i].cit
  end
  local found = redis.call('HMGET', KEYS[9], unpack(citizens))
  for i = 1, n do
    if found[i] then
      local until_ms, held_id = string.match(found[i], '^(%d+) (%S+)$')
      bars[citizens[i]] = {until_ms = tonumber(until_ms), id = held_id}
    end
  end
end
-- the round part of a reservation_id ("<secret>.<round_id>"): a bar set in this very round is
-- the citizen's own reservation here, which the citizen check has already answered
local function round_of(reservation_id)
  return string.match(reservation_id, '%.(.*)$')
end

-- decided here, written after the loop
local made = {} -- items that reserved, in order: {item, code, record}
local made_by_id = {} -- reservation_id -> record, for a later item of the same citizen
local asked = {} -- askers key index -> citizen hashes
local function ask_in(at, cit)
  if at > 0 then
    local set = asked[at]
    if not set then
      set = {}
      asked[at] = set
    end
    set[#set + 1] = cit
  end
end
local function ask(item)
  ask_in(item.a1, item.cit)
  ask_in(item.a2, item.cit)
  ask_in(item.a3, item.cit)
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
local qty_text = tostring(per_person)

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
    elseif lottery then
      reply = {'wrong-mode'}
    elseif not open then
      reply = {'not-open', tostring(opens), tostring(closes)}
    else
      local cit, site = item.cit, item.site
      local holding = held[cit]
      if holding then
        local record = made_by_id[holding] or redis.call('HGET', KEYS[4], holding)
        local r = cjson.decode(record)
        if r.site == site and r.ph == item.ph then
          reply = {'existing', record}
        else
          reply = {'already-reserved'}
        end
      else
        -- the cooldown: checked before stock, so a barred citizen never reads or takes a unit
        local bar = bars[cit]
        local barred = bar and bar.until_ms and bar.until_ms > now
          and round_of(bar.id) ~= round_of(item.id)
        if barred then
          reply = {'in-cooldown', tostring(bar.until_ms)}
        elseif left[site] < per_person then
          ask(item)
          reply = {'sold-out', tostring(left[site])}
        else
          local t_codes = taken[item.codes]
          local code = (not t_codes[item.c1] and item.c1) or (not t_codes[item.c2] and item.c2)
            or (not t_codes[item.c3] and item.c3) or nil
          if not code then
            reply = {'no-code'}
          else
            local id = item.id
            local record = '{"id":"' .. id .. '","site":"' .. site .. '","qty":' .. qty_text
              .. ',"status":"confirmed","code":"' .. code .. '","cit":"' .. cit .. '","ph":"'
              .. item.ph .. '","mask":"' .. item.mask .. '","created":' .. now_text
              .. ',"updated":' .. now_text .. ',"ch":"' .. item.ch .. '","age":"' .. item.age
              .. '","reg":"' .. item.reg .. '"}'
            ask(item)
            t_codes[code] = true
            left[site] = left[site] - per_person
            reserved[site] = reserved[site] + per_person
            held[cit] = id
            made_by_id[id] = record
            if programme and cooldown_ms > 0 then
              bars[cit] = {until_ms = now + cooldown_ms, id = id}
            end
            made[#made + 1] = {item = item, code = code, record = record}
            reply = {'created', code, now, per_person}
          end
        end
      end
    end
  end
  replies[i] = reply
end

-- Everything decided; now the writes, one command per key (XADD: one per reservation).
if #made > 0 then
  local stock_args, tally_args = {}, {}
  local codes_args, site_holders_args = {}, {}
  local holders_args, records_args, bars_args = {}, {}, {}
  local bar_text = tostring(now + cooldown_ms) .. ' '
  local touched = {}
  for _, m in ipairs(made) do
    local item = m.item
    if not touched[item.site] then
      touched[item.site] = true
      stock_args[#stock_args + 1] = item.site
      stock_args[#stock_args + 1] = left[item.site]
      tally_args[#tally_args + 1] = 'reserved:' .. item.site
      tally_args[#tally_args + 1] = reserved[item.site]
    end
    local c = codes_args[item.codes]
    if not c then
      c = {}
      codes_args[item.codes] = c
    end
    c[#c + 1] = m.code
    c[#c + 1] = item.id
    local h = site_holders_args[item.holders]
    if not h then
      h = {}
      site_holders_args[item.holders] = h
    end
    h[#h + 1] = item.cit
    holders_args[#holders_args + 1] = item.cit
    holders_args[#holders_args + 1] = item.id
    records_args[#records_args + 1] = item.id
    records_args[#records_args + 1] = m.record
    if programme and cooldown_ms > 0 then
      bars_args[#bars_args + 1] = item.cit
      bars_args[#bars_args + 1] = bar_text .. item.id
    end
  end
  redis.call('HSET', KEYS[2], unpack(stock_args))
  for at, c in pairs(codes_args) do
    redis.call('HSET', KEYS[at], unpack(c))
  end
  for at, h in pairs(site_holders_args) do
    redis.call('SADD', KEYS[at], unpack(h))
  end
  redis.call('HSET', KEYS[3], unpack(holders_args))
  redis.call('HSET', KEYS[4], unpack(records_args))
  if #bars_args > 0 then
    redis.call('HSET', KEYS[9], unpack(bars_args))
  end
  for _, m in ipairs(made) do
    seq = seq + 1
    redis.call('XADD', KEYS[6], '*', 'kind', 'reservation', 'record', m.record, 'seq', seq)
  end
  created = created + #made
  tally_args[#tally_args + 1] = 'created'
  tally_args[#tally_args + 1] = created
  tally_args[#tally_args + 1] = 'seq'
  tally_args[#tally_args + 1] = seq
  redis.call('HSET', KEYS[5], unpack(tally_args))
end
for at, set in pairs(asked) do
  redis.call('SADD', KEYS[at], unpack(set))
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
