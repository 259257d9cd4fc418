-- claim.lua: lease up to limit instances of some workflows of one app, oldest pending message first.
--
-- claim(
--   keys=[ready_1, leased_1, ..., ready_n, leased_n, wake],
--   args=[prefix, worker, lease_us, limit, sweep_limit]
-- )
--
-- KEYS[2i-1]  ready_i      keel:ready:{$app}:$workflow_i: claimable instances by oldest pending message
-- KEYS[2i]    leased_i     keel:leased:{$app}:$workflow_i: leased and held instances by lease expiry
-- KEYS[2n+1]  wake         keel:wake:{$app}: read only, for its last entry id
-- ARGV[1]     prefix       the key prefix, to name the keel:inst:, keel:inbox:, keel:msg: and keel:steps:
--                          keys of the instances found in the sets (a single primary is assumed: those
--                          keys live in other slots than the sets')
-- ARGV[2]     worker       who claims, "host:pid"
-- ARGV[3]     lease_us     lease length in microseconds, from this server's clock
-- ARGV[4]     limit        at most this many instances are leased
-- ARGV[5]     sweep_limit  at most this many expired leases or holds per workflow are put back in play first
--
-- returns  {wake_last_id, claim, ...}  wake_last_id is the id of the wake stream's last entry ("0-0" if
--          none), read atomically with the claims, so that a waiter starting from it misses no later send;
--          each claim is {member, token, lease_expires_us, message_id, payload_json, attempt,
--          state_version, {step_name, result_json, ...}, state_json or nil}, oldest pending message first;
--          the steps are those recorded for the message by earlier attempts (keel:steps:{$inst}:$id)
--
-- The sweep first moves every leased-set entry whose score has passed back to its ready set: expired
-- leases, and holds set by retry.lua whose delay is over; a held instance is in no ready set before that,
-- so no claim takes it early. Each claim then raises the instance's token by one, sets its lease (owner,
-- expiry = now + lease_us, lapsed cleared), moves it from ready to leased and counts an attempt on its
-- inbox head.
--
-- Key layout: runtime_lib.lua, prepended to this script.

local prefix, worker = ARGV[1], ARGV[2]
local lease_us, limit, sweep_limit = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local wake = KEYS[#KEYS]
local now = now_us()

-- Expired leases and ended holds go back to the ready sets first, so their instances compete by message age
-- like the rest.
local function sweep(ready, leased)
    local expired = redis.call("ZRANGEBYSCORE", leased, "-inf", digits(now), "LIMIT", 0, sweep_limit)
    for _, member in ipairs(expired) do
        lapse_lease(prefix, member, leased)
        make_ready(prefix, member, ready)
    end
end

-- The first limit of each ready set, merged by score: exactly the limit oldest across the workflows.
local function candidates()
    local found = {}
    for i = 1, #KEYS - 1, 2 do
        sweep(KEYS[i], KEYS[i + 1])
        local head = redis.call("ZRANGE", KEYS[i], 0, limit - 1, "WITHSCORES")
        for j = 1, #head, 2 do
            table.insert(found, {member = head[j], seq = tonumber(head[j + 1]), ready = KEYS[i], leased = KEYS[i + 1]})
        end
    end
    -- Scores are the app's send sequence numbers, unique, so the order is total.
    table.sort(found, function(a, b) return a.seq < b.seq end)
    return found
end

local function lease(candidate)
    local member = candidate.member
    local instance = instance_key(prefix, member)
    redis.call("ZREM", candidate.ready, member)
    local message_id = redis.call("LINDEX", inbox_key(prefix, member), 0)
    if not message_id then
        return nil -- an emptied inbox left in a ready set: dropped from it, nothing to run
    end
    local token = redis.call("HINCRBY", instance, "tok", 1)
    local expires = digits(now + lease_us)
    redis.call("HSET", instance, "own", worker, "exp", expires)
    redis.call("HDEL", instance, "lapsed")
    redis.call("ZADD", candidate.leased, expires, member)
    local message = message_key(prefix, member, message_id)
    local attempt = redis.call("HINCRBY", message, "n", 1)
    local payload_json = redis.call("HGET", message, "p")
    local steps = redis.call("HGETALL", steps_key(prefix, member, message_id))
    local state = redis.call("HMGET", instance, "v", "d")
    -- state_json last: a nil ends a Lua array, so it may only be absent at the end.
    return {
        member, digits(token), expires, message_id, payload_json, digits(attempt), state[1] or "0", steps, state[2]
    }
end

local last = redis.call("XREVRANGE", wake, "+", "-", "COUNT", 1)
local result = {last[1] and last[1][1] or "0-0"}
local found = candidates()
for i = 1, math.min(limit, #found) do
    local claimed = lease(found[i])
    if claimed then
        table.insert(result, claimed)
    end
end
return result
