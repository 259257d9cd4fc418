-- upgrade_3.lua: bring instances written under layout 2 to layout 3: the failed message pausing each
-- paused instance gets its failure time (f) and joins its app's dead set. Idempotent: running it again,
-- or on an instance written under layout 3 or 4, changes nothing.
--
-- upgrade_3(
--   keys=[instance_1, inbox_1, turns_1, dead_1, ..., instance_n, inbox_n, turns_n, dead_n],
--   args=[prefix, member_1, ..., member_n]
-- )
--
-- KEYS[4i-3]  instance_i  keel:inst:{$inst_i}: read only (paused)
-- KEYS[4i-2]  inbox_i     keel:inbox:{$inst_i}: read only; its head is the failed message
-- KEYS[4i-1]  turns_i     keel:turns:{$inst_i}: read only; the newest "failed" turn of the message dates it
-- KEYS[4i]    dead_i      keel:dead:{$app_i}: the message id added, scored by f
-- ARGV[1]     prefix      the key prefix, to name the head message's keel:msg: key (its id is only known
--                         here; the key is in the instance's slot)
-- ARGV[i+1]   member_i    $inst_i
--
-- returns  the number of dead letters indexed by this call
--
-- f is kept when the message has one; otherwise it is the end of the message's newest turn record whose
-- outcome is "failed" (started_at_us + duration_s), or this server's now if no such record is kept.
-- Layout 2 had no retry, skip or hold, so a paused instance's inbox head is exactly its dead letter.
--
-- Key layout: runtime_lib.lua, prepended to this script.

-- How many of the newest turn records are searched for the failed one (a paused instance runs no turns
-- after it, so it is the newest).
local TURNS_SEARCHED = 10

local prefix = ARGV[1]

local function failed_turn_end(turns, message_id)
    for _, entry in ipairs(redis.call("LRANGE", turns, 0, TURNS_SEARCHED - 1)) do
        local turn = cjson.decode(entry)
        if turn.message_id == message_id and turn.outcome == "failed" then
            return digits(tonumber(turn.started_at_us) + math.floor(tonumber(turn.duration_s) * 1000000 + 0.5))
        end
    end
    return digits(now_us())
end

local function upgrade(instance, inbox, turns, dead, member)
    if redis.call("TYPE", inbox).ok ~= "list" then
        return 0 -- no inbox, or one upgrade_4.lua has turned into a sorted set already (after this step)
    end
    if redis.call("HGET", instance, "paused") ~= "1" then
        return 0
    end
    local head = redis.call("LINDEX", inbox, 0)
    if not head then
        return 0
    end
    local message = message_key(prefix, member, head)
    if redis.call("HGET", message, "s") ~= "failed" then
        return 0
    end
    local failed_at = redis.call("HGET", message, "f")
    if not failed_at then
        failed_at = failed_turn_end(turns, head)
        redis.call("HSET", message, "f", failed_at)
    end
    return redis.call("ZADD", dead, failed_at, head)
end

local indexed = 0
for i = 1, #KEYS, 4 do
    indexed = indexed + upgrade(KEYS[i], KEYS[i + 1], KEYS[i + 2], KEYS[i + 3], ARGV[(i - 1) / 4 + 2])
end
return indexed
