-- claim.lua: lease up to limit instances of some workflows of one app whose next message is visible,
-- earliest visible first.
--
-- claim(
--   keys=[ready_1, leased_1, ..., ready_n, leased_n, wake],
--   args=[prefix, worker, lease_us, limit, sweep_limit, tie_limit]
-- )
--
-- KEYS[2i-1]  ready_i      keel:ready:{$app}:$workflow_i: unleased instances by their next message's
--                          visible time
-- KEYS[2i]    leased_i     keel:leased:{$app}:$workflow_i: leased and held instances by lease expiry
-- KEYS[2n+1]  wake         keel:wake:{$app}: read only, for its last entry id
-- ARGV[1]     prefix       the key prefix, to name the keel:inst:, keel:inbox:, keel:msg: and keel:steps:
--                          keys of the instances found in the sets (a single primary is assumed: those
--                          keys live in other slots than the sets')
-- ARGV[2]     worker       who claims, "host:pid"
-- ARGV[3]     lease_us     lease length in microseconds, from this server's clock
-- ARGV[4]     limit        at most this many instances are leased
-- ARGV[5]     sweep_limit  at most this many expired leases or holds per workflow are put back in play first
-- ARGV[6]     tie_limit    at most this many instances sharing the visible time of a ready set's limit-th
--                          are also read, to order them by sequence number
--
-- returns  {wake_last_id, claim, ...}  wake_last_id is the id of the wake stream's last entry ("0-0" if
--          none), read atomically with the claims, so that a waiter starting from it misses no later send;
--          each claim is {member, token, lease_expires_us, message_id, payload_json, attempt,
--          state_version, {step_name, result_json, ...}, state_json or nil}, in the order of their
--          messages' (visible time, sequence number); the steps are those recorded for the message by
--          earlier attempts (keel:steps:{$inst}:$id)
--
-- The sweep first moves every leased-set entry whose score has passed back to its ready set: expired
-- leases, and holds set by retry.lua whose delay is over; a held instance is in no ready set before that,
-- so no claim takes it early. Only ready entries scored at or before now are candidates: an instance whose
-- next message is a timer not yet due waits in its ready set. Each claim then raises the instance's token
-- by one, sets its lease (owner, expiry = now + lease_us, lapsed cleared), moves it from ready to leased
-- and counts an attempt on its next message.
--
-- Key layout: runtime_lib.lua, prepended to this script.

local prefix, worker = ARGV[1], ARGV[2]
local lease_us, limit, sweep_limit = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local tie_limit = tonumber(ARGV[6])
local wake = KEYS[#KEYS]
local now = now_us()

-- Expired leases and ended holds go back to the ready sets first, so their instances compete by their
-- messages' visible time like the rest.
local function sweep(ready, leased)
    local expired = redis.call("ZRANGEBYSCORE", leased, "-inf", digits(now), "LIMIT", 0, sweep_limit)
    for _, member in ipairs(expired) do
        lapse_lease(prefix, member, leased)
        make_ready(prefix, member, ready)
    end
end

-- The due entries of one ready set that can be among the limit first: its first limit, plus those tied
-- with the last of them (the set orders ties by member name, claims by sequence number).
local function due(ready)
    local head = redis.call("ZRANGEBYSCORE", ready, "-inf", digits(now), "LIMIT", 0, limit)
    if #head == limit then
        local last = digits(tonumber(redis.call("ZSCORE", ready, head[#head])))
        local seen = {}
        for _, member in ipairs(head) do
            seen[member] = true
        end
        for _, member in ipairs(redis.call("ZRANGEBYSCORE", ready, last, last, "LIMIT", 0, tie_limit)) do
            if not seen[member] then
                table.insert(head, member)
            end
        end
    end
    return head
end

-- The due instances of every asked workflow, each with its next message, in (visible time, seq) order.
local function candidates()
    local found = {}
    for i = 1, #KEYS - 1, 2 do
        sweep(KEYS[i], KEYS[i + 1])
        for _, member in ipairs(due(KEYS[i])) do
            local head = inbox_head(inbox_key(prefix, member))
            if not head then
                redis.call("ZREM", KEYS[i], member) -- an emptied inbox left in a ready set: nothing to run
            elseif head[2] > now then
                redis.call("ZADD", KEYS[i], digits(head[2]), member) -- scored too early: put right, not due
            else
                table.insert(found, {
                    member = member, entry = head[1], visible = head[2], seq = entry_seq(head[1]),
                    ready = KEYS[i], leased = KEYS[i + 1],
                })
            end
        end
    end
    table.sort(found, function(a, b)
        if a.visible ~= b.visible then
            return a.visible < b.visible
        end
        return a.seq < b.seq
    end)
    return found
end

local function lease(candidate)
    local member = candidate.member
    local instance = instance_key(prefix, member)
    redis.call("ZREM", candidate.ready, member)
    local message_id = entry_message_id(candidate.entry)
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
    table.insert(result, lease(found[i]))
end
return result
