-- release.lua: give a lease back without running the turn, if the claim's token is still current.
--
-- release(
--   keys=[instance, ready, leased],
--   args=[prefix, member, token]
-- )
--
-- KEYS[1]  instance  keel:inst:{$inst}: own and exp cleared if tok is the token and a worker's lease
--                    (live or expired) is set; a hold left by retry.lua is not a lease, and stays
-- KEYS[2]  ready     keel:ready:{$app}:$workflow: the instance rejoins it (it still has its message)
-- KEYS[3]  leased    keel:leased:{$app}:$workflow: the instance leaves it
-- ARGV[1]  prefix    the key prefix, to name the instance's inbox key
-- ARGV[2]  member    $inst
-- ARGV[3]  token     the fencing token of the claim being released
--
-- returns  1 released, 0 nothing to do (another token, or no lease any more: released, swept or held)
--
-- Key layout: runtime_lib.lua, prepended to this script.

local instance, ready, leased = KEYS[1], KEYS[2], KEYS[3]
local prefix, member, token = ARGV[1], ARGV[2], ARGV[3]

local held = redis.call("HMGET", instance, "tok", "own")
if held[1] ~= token or not held[2] then
    return 0
end
drop_lease(prefix, member, leased)
make_ready(prefix, member, ready)
return 1
