-- upgrade_4.lua: bring messages and instances of one app written under layout 3 to layout 4: times on
-- every message, inboxes as sorted sets by visible time, ready sets scored by visible time, the ids sets,
-- the finished-message and turn-record indexes, and a token on every instance. Idempotent: running it
-- again, or on data written under layout 4, changes nothing.
--
-- upgrade_4(
--   keys=[finished, finished_keyed, turn_index,
--         instance_1, inbox_1, ids_1, idempotency_1, turns_1, message_1, ready_1, ...],
--   args=[prefix, upgrade_us, app_seq, member_1, message_id_1, ...]
-- )
--
-- KEYS[1]     finished        keel:finished:{$app}: done and skipped messages without a key join it, by x
-- KEYS[2]     finished_keyed  keel:finkeyed:{$app}: done and skipped messages with a key join it, by a
-- KEYS[3]     turn_index      keel:turnidx:{$app}: each instance scored by its oldest kept turn record
-- KEYS[7i-3]  instance_i      keel:inst:{$inst_i}: tok = "0" unless set (it was created by the first claim)
-- KEYS[7i-2]  inbox_i         keel:inbox:{$inst_i}: a list of ids, oldest first, turned into the sorted set
-- KEYS[7i-1]  ids_i           keel:ids:{$inst_i}: message_id_i added, once its message is upgraded
-- KEYS[7i]    idempotency_i   keel:idem:{$inst_i}: read only: each key's message gets k
-- KEYS[7i+1]  turns_i         keel:turns:{$inst_i}: read only, for its oldest record
-- KEYS[7i+2]  message_i       keel:msg:{$inst_i}:$id_i: a and r set; x too if it is done or skipped
-- KEYS[7i+3]  ready_i         keel:ready:{$app}:$workflow_i: the instance rescored by its next message's r
--                             if it is in it
-- ARGV[1]     prefix          the key prefix, to name the keel:msg: keys of the other messages of an inbox
--                             (their ids are only known here; the keys are in the instance's slot)
-- ARGV[2]     upgrade_us      when the upgrade started, by this server's clock
-- ARGV[3]     app_seq         the app's send counter (keel:seq:) when the upgrade of the app started
-- ARGV[2i+2]  member_i        $inst_i
-- ARGV[2i+3]  message_id_i    $id_i, a message of the app as keel:msgindex: lists it
--
-- returns  the number of messages upgraded by this call
--
-- Layout 3 kept no send time. A message sent under it is taken as sent (and visible) at upgrade_us minus
-- one microsecond per message the app sent after it: before anything sent after the upgrade, and in send
-- order, so that the claim order stays the send order and no two instances tie. A finished message is
-- taken as finished at upgrade_us: pruning counts its age from the upgrade, never from too early. The
-- instance part is done before the messages of each pair, so that a message's key (k) is known when it is
-- indexed; a message is upgraded once it is in its ids set. Pairs whose message is gone (pruned or deleted
-- meanwhile) are skipped, and so is the instance part of an instance with no message left in the call.
--
-- Key layout: runtime_lib.lua, prepended to this script.

local finished, finished_keyed, turn_index = KEYS[1], KEYS[2], KEYS[3]
local prefix, upgrade_us, app_seq = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])

-- A message's visible time, set first (a = r) if it has none.
local function legacy_times(message)
    local held = redis.call("HMGET", message, "a", "r", "q")
    if held[1] then
        return held[2] or held[1]
    end
    local at = digits(upgrade_us - math.max(0, app_seq - tonumber(held[3] or app_seq)))
    redis.call("HSET", message, "a", at, "r", at)
    return at
end

local function upgrade_instance(instance, inbox, idempotency, turns, ready, member)
    if redis.call("TYPE", inbox).ok == "list" then
        local ids = redis.call("LRANGE", inbox, 0, -1)
        redis.call("DEL", inbox)
        for _, message_id in ipairs(ids) do
            local message = message_key(prefix, member, message_id)
            if redis.call("EXISTS", message) == 1 then
                local visible = legacy_times(message)
                redis.call("ZADD", inbox, visible, inbox_entry(redis.call("HGET", message, "q"), message_id))
            end
        end
        if redis.call("ZSCORE", ready, member) then
            redis.call("ZREM", ready, member)
            offer(instance, inbox, member, ready)
        end
    end
    local keyed = redis.call("HGETALL", idempotency)
    for i = 1, #keyed, 2 do
        local message = message_key(prefix, member, keyed[i + 1])
        if redis.call("EXISTS", message) == 1 then
            redis.call("HSET", message, "k", keyed[i])
        end
    end
    redis.call("HSETNX", instance, "tok", "0")
    local oldest = redis.call("LINDEX", turns, -1)
    if oldest then
        redis.call("ZADD", turn_index, digits(turn_started(oldest)), member)
    end
end

local function upgrade_message(ids, message, message_id)
    if redis.call("SISMEMBER", ids, message_id) == 1 then
        return 0
    end
    legacy_times(message)
    redis.call("SADD", ids, message_id)
    local held = redis.call("HMGET", message, "s", "x")
    if held[1] == "done" or held[1] == "skipped" then
        local finished_at = held[2] or digits(upgrade_us)
        redis.call("HSET", message, "x", finished_at)
        local sent = redis.call("HMGET", message, "k", "a")
        if sent[1] then
            redis.call("ZADD", finished_keyed, sent[2], message_id)
        else
            redis.call("ZADD", finished, finished_at, message_id)
        end
    end
    return 1
end

local upgraded, seen = 0, {}
for i = 4, #KEYS, 7 do
    local instance, inbox, ids, idempotency, turns, message, ready = unpack(KEYS, i, i + 6)
    local pair = (i - 4) / 7
    local member, message_id = ARGV[4 + 2 * pair], ARGV[5 + 2 * pair]
    if redis.call("EXISTS", message) == 1 then
        if not seen[member] then
            seen[member] = true
            upgrade_instance(instance, inbox, idempotency, turns, ready, member)
        end
        upgraded = upgraded + upgrade_message(ids, message, message_id)
    end
end
return upgraded
