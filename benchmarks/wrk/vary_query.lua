-- Every request a new query string: the same CGI names as the request
-- before on the connection, one value changed (see env_delta in
-- csrc/blaze_http.c; benchmarks/callgrind.sh with WRK_ARGS="-s ...").
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/?n=" .. n)
end
