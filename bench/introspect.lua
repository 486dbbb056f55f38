-- wrk script: RFC 7662 introspection against keyplane.
-- env: VERIFIER (a token with tokens:verify), TOKEN (the token to introspect).
-- Counts answers that are not {"active":true,...}, so a run can be trusted.
wrk.method = "POST"
wrk.path = "/oauth2/introspect"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("VERIFIER")
wrk.body = "token=" .. os.getenv("TOKEN")

local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) bad = 0 end
function response(status, headers, body)
  if status ~= 200 or not string.find(body, '"active":true', 1, true) then bad = bad + 1 end
end
function done(summary, latency, requests)
  local total = 0
  for _, t in ipairs(threads) do total = total + t:get("bad") end
  io.write(string.format("inactive_or_error_responses: %d\n", total))
end
