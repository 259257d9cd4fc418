-- renew.lua: extend the leases still held under the given tokens; an expired lease is not revived.
--
-- renew(
--   keys=[instance_1, leased_1, ..., instance_n, leased_n],
--   args=[lease_us, member_1, token_1, ..., member_n, token_n]
-- )
--
-- KEYS[2i-1]  instance_i  keel:inst:{$inst_i}: exp is set to now + lease_us if the lease is held
-- KEYS[2i]    leased_i    keel:leased:{$app}:$workflow_i: the member's score follows exp
-- ARGV[1]     lease_us    the new lease length in microseconds, from this server's clock
-- ARGV[2i]    member_i    $inst_i
-- ARGV[2i+1]  token_i     the fencing token the lease was claimed under
--
-- returns  {1 or 0, ...}  one per claim: 1 renewed, 0 lost (instance deleted, token moved on, lease released or
--                         expired)
--
-- Key layout: runtime_lib.lua, prepended to this script.

local now = now_us()
local expires = digits(now + tonumber(ARGV[1]))
local held = {}
for i = 1, #KEYS, 2 do
    local member, token = ARGV[i + 1], ARGV[i + 2]
    if lease_problem(KEYS[i], token, now) then
        table.insert(held, 0)
    else
        redis.call("HSET", KEYS[i], "exp", expires)
        redis.call("ZADD", KEYS[i + 1], expires, member)
        table.insert(held, 1)
    end
end
return held
