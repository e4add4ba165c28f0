-- wrk script: POST a reservation for a new, valid citizen on every request.
-- usage: wrk -s bench/reserve.lua <url> -- <round_id> <site_id> <citizen offset>
-- Citizen n: region 110101, birth date 1971-01-01 + n // 1000 days, sequence n % 1000, and the
-- ISO 7064 MOD 11-2 check character; each wrk thread takes its own range of n.

local weights = {7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2}
local checks = "10X98765432"
local threads = {}
local round_id, site_id, offset = "bench", "s1", 0
local counter, base = 0, 0

function setup(thread)
  thread:set("index", #threads)
  table.insert(threads, thread)
end

function init(args)
  round_id = args[1] or round_id
  site_id = args[2] or site_id
  offset = tonumber(args[3] or "0")
  base = offset + index * 5000000
  wrk.method = "POST"
  wrk.path = "/api/v1/rounds/" .. round_id .. "/reservations"
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

function request()
  counter = counter + 1
  local n = base + counter
  wrk.body = string.format(
    '{"citizen_id":"%s","phone":"139%08d","site_id":"%s"}', citizen(n), n % 100000000, site_id)
  return wrk.format()
end
