-- step.lua: record a step's result for the claim's message, if the claim still holds its lease; the first
-- result recorded under a name stands.
--
-- step(
--   keys=[instance, steps],
--   args=[token, name, result_json]
-- )
--
-- KEYS[1]  instance     keel:inst:{$inst}: checked (token, owner, lease), not written
-- KEYS[2]  steps        keel:steps:{$inst}:$id, $id the claim's message: name -> result_json unless the name
--                       is there already (HSETNX)
-- ARGV[1]  token        the fencing token the turn runs under
-- ARGV[2]  name         the step's name
-- ARGV[3]  result_json  the step's result as JSON text
--
-- returns  {1, 1 or 0}           held: 1 the result was recorded, 0 the name had a result already (kept)
--          {0, reason, detail}   nothing written; reasons as in commit.lua ("deleted", "token", "released",
--                                "expired")
--
-- The message of a live lease is the one its claim took, and stays pending until the lease is let go, so
-- the token check alone ties the record to the message the claim runs.
--
-- Key layout: runtime_lib.lua, prepended to this script.

local instance, steps = KEYS[1], KEYS[2]
local token, name, result_json = ARGV[1], ARGV[2], ARGV[3]

local problem = lease_problem(instance, token, now_us())
if problem then
    return {0, problem[1], problem[2]}
end
return {1, redis.call("HSETNX", steps, name, result_json)}
