-- retry.lua: record a failed attempt and hold the instance for a delay, atomically: the turn recorded,
-- the lease released, no claim before now + delay_us, the message still pending at the inbox head; or
-- nothing at all when the lease is lost.
--
-- retry(
--   keys=[instance, turns, leased, turn_index],
--   args=[member, token, delay_us, turn_json, turns_limit]
-- )
--
-- KEYS[1]  instance     keel:inst:{$inst}: checked (token, owner, lease), then own cleared (released: the
--                       claim is fenced out from now on) and exp = now + delay_us (the hold)
-- KEYS[2]  turns        keel:turns:{$inst}: turn_json pushed, trimmed to the limit
-- KEYS[3]  leased       keel:leased:{$app}:$workflow: the instance stays in it, scored by the hold's end,
--                       and joins no ready set; the first claim after the hold ends sweeps it back to the
--                       ready set under its next message's visible time, so that message runs first again
-- KEYS[4]  turn_index   keel:turnidx:{$app}: $inst scored by its oldest kept turn record
-- ARGV[1]  member       $inst
-- ARGV[2]  token        the fencing token the turn ran under
-- ARGV[3]  delay_us     how long the hold lasts, in microseconds by this server's clock; 0 or less: none
-- ARGV[4]  turn_json    the turn record (outcome "retry"), written by the engine
-- ARGV[5]  turns_limit  turn records kept, the new one included
--
-- returns  {1, hold_until_us}    recorded
--          {0, reason, detail}   nothing written; reasons as a commit's in group.lua ("deleted", "token", "released",
--                                "expired")
--
-- The message's status (pending), place in the inbox (visible time, sequence number), attempt count (n,
-- raised again by the next claim) and recorded steps are left as they are. A send meanwhile sees exp and leaves the held instance out of the ready set, and
-- release.lua leaves a hold alone (it has no owner).
--
-- Key layout: runtime_lib.lua, prepended to this script.

local instance, turns, leased, turn_index = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local member, token, delay_us, turn_json, turns_limit = unpack(ARGV, 1, 5)

local now = now_us()
local problem = lease_problem(instance, token, now)
if problem then
    return {0, problem[1], problem[2]}
end
local until_us = digits(now + math.max(0, tonumber(delay_us)))
record_turn(turns, turn_json, turns_limit, turn_index, member)
redis.call("HDEL", instance, "own")
redis.call("HSET", instance, "exp", until_us)
redis.call("ZADD", leased, until_us, member)
return {1, until_us}
