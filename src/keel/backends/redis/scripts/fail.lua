-- fail.lua: record a failed turn atomically: the message marked failed with its error and time, listed
-- in the app's dead letters, the instance paused, the turn recorded and the lease released; or nothing
-- at all when the lease is lost.
--
-- fail(
--   keys=[instance, message, turns, leased, dead, turn_index],
--   args=[prefix, member, token, message_id, error, turn_json, turns_limit]
-- )
--
-- KEYS[1]  instance     keel:inst:{$inst}: checked (token, owner, lease), then paused = "1", own exp cleared
-- KEYS[2]  message      keel:msg:{$inst}:$id: s = "failed", e = the error, f = now; it stays first in
--                       the inbox
-- KEYS[3]  turns        keel:turns:{$inst}: turn_json pushed, trimmed to the limit
-- KEYS[4]  leased       keel:leased:{$app}:$workflow: the instance leaves it (and joins no ready set)
-- KEYS[5]  dead         keel:dead:{$app}: $id added, scored by f; the end is published on keel:ended:{$app}
-- KEYS[6]  turn_index   keel:turnidx:{$app}: $inst scored by its oldest kept turn record
-- ARGV[1]  prefix       the key prefix
-- ARGV[2]  member       $inst
-- ARGV[3]  token        the fencing token the turn ran under
-- ARGV[4]  message_id   $id
-- ARGV[5]  error        the traceback or message of the failure
-- ARGV[6]  turn_json    the turn record, written by the engine
-- ARGV[7]  turns_limit  turn records kept, the new one included
--
-- returns  {1, failed_at_us}        recorded; failed_at from this server's clock
--          {0, reason, detail}      nothing written; reasons as a commit's in group.lua ("deleted", "token", "released",
--                                   "expired")
--
-- Key layout: runtime_lib.lua, prepended to this script.

local instance, message, turns, leased, dead, turn_index = unpack(KEYS, 1, 6)
local prefix, member, token, message_id, error_text, turn_json, turns_limit = unpack(ARGV, 1, 7)

local now = now_us()
local problem = lease_problem(instance, token, now)
if problem then
    return {0, problem[1], problem[2]}
end
local failed_at = digits(now)
redis.call("HSET", message, "s", "failed", "e", error_text, "f", failed_at)
redis.call("ZADD", dead, failed_at, message_id)
announce_end(prefix, dead, "dead", message_id)
redis.call("HSET", instance, "paused", "1")
record_turn(turns, turn_json, turns_limit, turn_index, member)
drop_lease(prefix, member, leased)
return {1, failed_at}
