-- wrk script: POST a reservation (or a lottery entry) for a new, valid citizen from a new client
-- address on every request.
-- usage: wrk -s bench/reserve.lua <url> -- <round_id> <site_id> <citizen offset> [<kind> [<xff>]]
--   round_id  one round, or several comma-separated: request n goes to round n mod their number
--   kind  "reservations" (default) or "entries": POST /api/v1/rounds/<round_id>/<kind>
--   xff   "1" (default): X-Forwarded-For names a new client address per request (10.0.0.0/8
--         from n), as a real crowd has, so every request takes a fresh per-address token bucket
--         (the service trusts X-Forwarded-For from 127.0.0.1); "0": no header, one address
-- Citizen n: region 110101, birth date 1971-01-01 + n // 1000 days, sequence n % 1000, and the
-- ISO 7064 MOD 11-2 check character; each wrk thread takes its own range of n.

local weights = {7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2}
local checks = "10X98765432"
local threads = {}
local round_id, site_id, offset, kind, xff = "bench", "s1", 0, "reservations", true
local paths = {}
local counter, base = 0, 0
local headers = {["Content-Type"] = "application/json"}

function setup(thread)
  thread:set("index", #threads)
  table.insert(threads, thread)
end

function init(args)
  round_id = args[1] or round_id
  site_id = args[2] or site_id
  offset = tonumber(args[3] or "0")
  kind = args[4] or kind
  xff = (args[5] or "1") ~= "0"
  base = offset + index * 5000000
  wrk.method = "POST"
  for r in string.gmatch(round_id, "[^,]+") do
    table.insert(paths, "/api/v1/rounds/" .. r .. "/" .. kind)
  end
  wrk.path = paths[1]
  wrk.headers["Content-Type"] = "application/json"
end

local function citizen(n)
  local born = os.date("!%Y%m%d", 31536000 + math.floor(n / 1000) * 86400)
  local body = string.format("110101%s%03d", born, n % 1000)
  local sum = 0
  for i = 1, 17 do
    sum = sum + tonumber(body:sub(i, i)) * weights[i]
  end
  local r = sum % 11 + 1
  return body .. checks:sub(r, r)
end

local function address(n)
  local a = n % 16777216
  return string.format("10.%d.%d.%d", math.floor(a / 65536), math.floor(a / 256) % 256, a % 256)
end

function request()
  counter = counter + 1
  local n = base + counter
  local body = string.format(
    '{"citizen_id":"%s","phone":"139%08d","site_id":"%s"}', citizen(n), n % 100000000, site_id)
  if xff then
    headers["X-Forwarded-For"] = address(n)
  end
  if #paths > 1 then
    return wrk.format(nil, paths[n % #paths + 1], headers, body)
  end
  return wrk.format(nil, nil, headers, body)
end
