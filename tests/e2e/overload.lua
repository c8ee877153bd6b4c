-- wrk script for the overload test: POST the PNG at $OVERLOAD_PNG to /predict, and tally
-- every answer by status. A non-200 counts as "bad" unless it is a JSON error with Retry-After.
-- done() prints one JSON line: statuses, bad, wrk's socket errors, latency percentiles (us).
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local f = assert(io.open(os.getenv("OVERLOAD_PNG"), "rb"))
  wrk.method = "POST"
  wrk.body = f:read("*all")
  wrk.headers["Content-Type"] = "image/png"
  f:close()
  statuses = {}
  bad = 0
  example = ""
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status ~= 200 then
    local json = body:sub(1, 10) == '{"error":{'
    if headers["Retry-After"] == nil or not json then
      bad = bad + 1
      example = status .. " " .. body:sub(1, 200)
    end
  end
end

function done(summary, latency, requests)
  local totals, nbad, ex = {}, 0, ""
  for _, t in ipairs(threads) do
    for status, n in pairs(t:get("statuses")) do
      totals[tostring(status)] = (totals[tostring(status)] or 0) + n
    end
    nbad = nbad + t:get("bad")
    if t:get("example") ~= "" then ex = t:get("example") end
  end
  local parts = {}
  for status, n in pairs(totals) do
    table.insert(parts, string.format('"%s":%d', status, n))
  end
  local e = summary.errors
  io.write(string.format(
    '{"statuses":{%s},"bad":%d,"example":%q,"connect":%d,"read":%d,"write":%d,"timeout":%d,' ..
    '"requests":%d,"seconds":%.3f,"p50_us":%d,"p99_us":%d,"max_us":%d}\n',
    table.concat(parts, ","), nbad, ex, e.connect, e.read, e.write, e.timeout,
    summary.requests, summary.duration / 1e6, latency:percentile(50), latency:percentile(99), latency.max))
end
