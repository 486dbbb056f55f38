-- wrk script: GET with an Authorization header taken from env AUTH, and no response callback, so
-- that wrk does not build a Lua table of every answer's headers: that work grows with the number
-- of headers an answer has, on the load generator's CPU, which is as busy as the server's here.
-- Statuses are still checked: wrk counts non-2xx/3xx replies itself, and bench/interleave.py stops
-- on any.
wrk.method = "GET"
wrk.headers["Authorization"] = os.getenv("AUTH")
