-- prune.lua: delete one batch of an app's finished messages (with the handler deliveries they finish),
-- old turn records or old events.
--
-- prune(
--   keys=[finished, finished_keyed, turn_index, message_index, events, event_times, event_times_keyed,
--         event_keys],
--   args=[prefix, mode, finished_before_us, keys_before_us, batch, offset, event_stem, delivery_kind]
-- )
--
-- KEYS[1]  finished            keel:finished:{$app}: done and skipped messages without a key, by finish time
-- KEYS[2]  finished_keyed      keel:finkeyed:{$app}: done and skipped messages with a key, by send time
-- KEYS[3]  turn_index          keel:turnidx:{$app}: instances by the start of their oldest kept turn record
-- KEYS[4]  message_index       keel:msgindex:{$app}: $id -> $inst; a deleted message's entry goes
-- KEYS[5]  events              keel:events:{$app}: a deleted event's entry goes
-- KEYS[6]  event_times         keel:evtime:{$app}: events without a key, by publish time
-- KEYS[7]  event_times_keyed   keel:evkeyed:{$app}: events with a key, by publish time
-- KEYS[8]  event_keys          keel:evidem:{$app}: a deleted keyed event's entry goes
-- ARGV[1]  prefix              the key prefix, to name the keel:msg:, keel:steps:, keel:ids:, keel:idem: and
--                              keel:turns: keys of what the sets name (a single primary is assumed: those
--                              keys live in their instances' slots)
-- ARGV[2]  mode                what this call prunes:
--                              "finished"  messages of finished whose finish time (x) < finished_before
--                              "keyed"     messages of finished_keyed with x < finished_before and a send
--                                          time (a) < keys_before, their idempotency entries with them
--                              "turns"     turn records started before finished_before
--                              "events"    events of event_times published before finished_before,
--                                          then (in the same batch) those of event_times_keyed published
--                                          before both cut-offs, their idempotency entries with them
-- ARGV[3]  finished_before_us  the cut-off of finish (and turn start) times
-- ARGV[4]  keys_before_us      the cut-off of send times of messages with an idempotency key
-- ARGV[5]  batch               at most this many set entries are read (messages, or instances and turn
--                              records popped)
-- ARGV[6]  offset              "keyed" only: how many leading candidates earlier calls kept (skipped)
-- ARGV[7]  event_stem          "keel:event:{$app}:", to name the hash of each event found (app's slot)
-- ARGV[8]  delivery_kind       the kind field of a handler delivery's keel:inst: hash, "delivery"
--
-- returns  {deleted, more, kept}  deleted: messages (with their keel:steps: hash, index and ids entries),
--                                 turn records or events removed; more: 1 if the batch was full, so that
--                                 another call may find more; kept: "keyed" candidates left in place
--
-- Why two message sets: a keyed message may go only once both its finish and its send time are old
-- enough. Every keyed candidate has a <= x < finished_before, so finkeyed is read by send time below
-- min(keys_before, finished_before): what it keeps (sent long ago, finished recently) is rare, and the
-- caller steps over it with offset. Unkeyed messages need no check beyond their score. Nothing pending or
-- failed is in either set; state and state history are never touched. A turn list is pruned from its
-- oldest end (it is in commit order), stopping at the first record started at or after the cut-off.
--
-- A handler delivery's instance (its keel:inst: kind is delivery_kind) holds one message: when prune deletes it and no
-- other message is left, the instance goes whole (its keel:inst:, keel:inbox:, keel:ids:, keel:idem:,
-- keel:states: and keel:turns: keys and its keel:turnidx: entry), its token kept nowhere: delivery
-- instance ids are event ids, never reused. With no pending message and no lease (its one message is
-- finished, and a finished message's turn released the lease), it is in no ready or leased set. Its turn
-- records go uncounted, as an instance deleted with them. An event's deliveries live on without it.
--
-- Key layout: runtime_lib.lua, prepended to this script.

local finished, finished_keyed, turn_index, message_index = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local events, event_times, event_times_keyed, event_keys = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local prefix, mode = ARGV[1], ARGV[2]
local finished_before, keys_before = tonumber(ARGV[3]), tonumber(ARGV[4])
local batch, offset, event_stem, delivery_kind = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7], ARGV[8]

local function instance_part(member, name)
    return prefix .. name .. ":{" .. member .. "}"
end

-- True if $inst is a handler delivery, as its hash's kind (set by its first send) says.
local function is_delivery(member)
    return redis.call("HGET", instance_part(member, "inst"), "kind") == delivery_kind
end

-- Delete a delivery instance whose one message is gone: every key it owns, and its turn index entry.
local function forget_delivery(member)
    local owned = {"inst", "inbox", "ids", "idem", "states", "turns"}
    for i, name in ipairs(owned) do
        owned[i] = instance_part(member, name)
    end
    redis.call("DEL", unpack(owned))
    redis.call("ZREM", turn_index, member)
end

-- Delete a finished message and everything of it; false (and nothing deleted) if it is not finished.
local function forget(message_id)
    local member = redis.call("HGET", message_index, message_id)
    if not member then
        return false
    end
    local message = message_key(prefix, member, message_id)
    local held = redis.call("HMGET", message, "s", "k")
    if held[1] ~= "done" and held[1] ~= "skipped" then
        return false
    end
    if held[2] then
        local idempotency = instance_part(member, "idem")
        if redis.call("HGET", idempotency, held[2]) == message_id then
            redis.call("HDEL", idempotency, held[2])
        end
    end
    redis.call("DEL", message, steps_key(prefix, member, message_id))
    redis.call("HDEL", message_index, message_id)
    redis.call("SREM", instance_part(member, "ids"), message_id)
    if is_delivery(member) and redis.call("EXISTS", instance_part(member, "ids")) == 0 then
        forget_delivery(member)
    end
    return true
end

local function prune_finished()
    local ids = redis.call("ZRANGEBYSCORE", finished, "-inf", "(" .. digits(finished_before), "LIMIT", 0, batch)
    local deleted = 0
    for _, message_id in ipairs(ids) do
        if forget(message_id) then
            deleted = deleted + 1
        end
        redis.call("ZREM", finished, message_id)
    end
    return {deleted, #ids == batch and 1 or 0, 0}
end

local function prune_keyed()
    local below = "(" .. digits(math.min(finished_before, keys_before))
    local ids = redis.call("ZRANGEBYSCORE", finished_keyed, "-inf", below, "LIMIT", offset, batch)
    local deleted, kept = 0, 0
    for _, message_id in ipairs(ids) do
        local member = redis.call("HGET", message_index, message_id)
        local times = member and redis.call("HMGET", message_key(prefix, member, message_id), "x")
        if times and times[1] and tonumber(times[1]) >= finished_before then
            kept = kept + 1 -- sent long enough ago, but finished too recently
        else
            if forget(message_id) then
                deleted = deleted + 1
            end
            redis.call("ZREM", finished_keyed, message_id)
        end
    end
    return {deleted, #ids == batch and 1 or 0, kept}
end

local function prune_turns()
    local members = redis.call("ZRANGEBYSCORE", turn_index, "-inf", "(" .. digits(finished_before), "LIMIT", 0, batch)
    local budget = batch
    for _, member in ipairs(members) do
        local turns = turns_key(prefix, member)
        local oldest = redis.call("LINDEX", turns, -1)
        while oldest and budget > 0 and turn_started(oldest) < finished_before do
            redis.call("RPOP", turns)
            budget = budget - 1
            oldest = redis.call("LINDEX", turns, -1)
        end
        if oldest then
            redis.call("ZADD", turn_index, digits(turn_started(oldest)), member)
        else
            redis.call("ZREM", turn_index, member)
        end
    end
    local more = (#members == batch or budget == 0) and 1 or 0
    return {batch - budget, more, 0}
end

-- Delete the events of one time index published before the cut-off, at most budget of them.
local function forget_events(times, before, budget)
    local ids = redis.call("ZRANGEBYSCORE", times, "-inf", "(" .. digits(before), "LIMIT", 0, budget)
    for _, event_id in ipairs(ids) do
        local event = event_stem .. event_id
        local key = redis.call("HGET", event, "k")
        if key and redis.call("HGET", event_keys, key) == event_id then
            redis.call("HDEL", event_keys, key)
        end
        redis.call("DEL", event)
        redis.call("ZREM", events, event_id)
        redis.call("ZREM", times, event_id)
    end
    return #ids
end

local function prune_events()
    local deleted = forget_events(event_times, finished_before, batch)
    if deleted < batch then
        deleted = deleted + forget_events(event_times_keyed, math.min(finished_before, keys_before), batch - deleted)
    end
    return {deleted, deleted == batch and 1 or 0, 0}
end

if mode == "finished" then
    return prune_finished()
elseif mode == "keyed" then
    return prune_keyed()
elseif mode == "turns" then
    return prune_turns()
elseif mode == "events" then
    return prune_events()
end
return redis.error_reply("prune.lua: unknown mode " .. tostring(mode))
