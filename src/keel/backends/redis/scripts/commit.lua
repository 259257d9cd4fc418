-- commit.lua: commit one turn atomically: the new state, its history entry, the message's completion,
-- the turn record, the release of the lease, the messages the turn sends and the events it emits (each
-- with its deliveries); or nothing at all when the lease is lost.
--
-- commit(
--   keys=[instance, inbox, message, states, turns, ready, leased, finished, finished_keyed, turn_index,
--         send unit keys..., event unit keys...],
--   args=[prefix, member, token, message_id, version_read, has_state, state_json, writer, turn_json,
--         state_history_limit, turns_limit, wake_maxlen, sends, events, send unit args..., event unit args...]
-- )
--
-- KEYS[1]   instance             keel:inst:{$inst}: checked (token, lease), then v d t w written (unless
--                                has_state is "0"), own exp cleared
-- KEYS[2]   inbox                keel:inbox:{$inst}: the message's entry removed
-- KEYS[3]   message              keel:msg:{$inst}:$id: s = "done", v = the version written, x = now
-- KEYS[4]   states               keel:states:{$inst}: the new state pushed, trimmed to the limit
-- KEYS[5]   turns                keel:turns:{$inst}: turn_json pushed, trimmed to the limit
-- KEYS[6]   ready                keel:ready:{$app}:$workflow: the instance rejoins it if more is pending
-- KEYS[7]   leased               keel:leased:{$app}:$workflow: the instance leaves it
-- KEYS[8]   finished             keel:finished:{$app}: $id added, scored by x, unless it has a key
-- KEYS[9]   finished_keyed       keel:finkeyed:{$app}: $id added, scored by its send time, if it has a key
-- KEYS[10]  turn_index           keel:turnidx:{$app}: $inst scored by its oldest kept turn record
-- KEYS[11.. ]                    the keys of each send unit (10 each, as send.lua's KEYS), then of each
--                                event unit (publish.lua's KEYS)
-- ARGV[1]   prefix               the key prefix, to name the next pending message's keel:msg: key
-- ARGV[2]   member               $inst
-- ARGV[3]   token                the fencing token the turn ran under
-- ARGV[4]   message_id           $id, which must be pending in the inbox
-- ARGV[5]   version_read         the state version the turn started from; the commit writes the next one
-- ARGV[6]   has_state            "1": state_json is the new state; "0": a handler delivery's acknowledgement,
--                                no state written and the version stays version_read
-- ARGV[7]   state_json           the new state; ignored when has_state is "0"
-- ARGV[8]   writer               "host:pid" of the committing worker
-- ARGV[9]   turn_json            the turn record, written by the engine
-- ARGV[10]  state_history_limit  states kept, the new one included
-- ARGV[11]  turns_limit          turn records kept, the new one included
-- ARGV[12]  wake_maxlen          about how many entries a wake stream keeps
-- ARGV[13]  sends                how many send units follow
-- ARGV[14]  events               how many event units follow them
-- ARGV[15..]                     the arguments of each send unit (send.lua's ARGV[1..7]), then of each event
--                                unit (publish.lua's ARGV[2..])
--
-- returns  {1, version, written_at_us}  committed; written_at from this server's clock
--          {0, reason, detail}          nothing written. reason "deleted", "token" (detail: the instance's
--                                       token now), "released", "expired" (detail: the expiry), "version"
--                                       (detail: the stored version) or "message" (detail: its status)
--
-- The message is removed from the inbox wherever it sits: it was the next one when it was claimed, and a
-- message sent since (visible no earlier than its send) only goes before it if the server's clock stepped
-- back. The sends and events are appended exactly as send.lua and publish.lua append them (deduplicated
-- the same way), after the turn's own writes; every app that got a message is woken once. One commit is
-- the local function commit(), given its own slice of keys and arguments, so that a later script can
-- commit several turns in one call (group commit). The message's end is published on keel:ended:{$app}
-- (announce_end), for the clients waiting for it.
--
-- Key layout: runtime_lib.lua, prepended to this script.

local function commit(keys, args)
    local instance, inbox, message, states, turns, ready, leased = unpack(keys, 1, 7)
    local finished, finished_keyed, turn_index = unpack(keys, 8, 10)
    local prefix, member, token, message_id, version_read, has_state = unpack(args, 1, 6)
    local state_json, writer, turn_json, state_history_limit, turns_limit = unpack(args, 7, 11)
    local wake_maxlen, sends, events = args[12], tonumber(args[13]), tonumber(args[14])

    local now = now_us()
    local problem = lease_problem(instance, token, now)
    if problem then
        return {0, problem[1], problem[2]}
    end
    local stored = redis.call("HGET", instance, "v") or "0"
    if stored ~= version_read then
        return {0, "version", stored}
    end
    local held = redis.call("HMGET", message, "s", "q")
    local entry = held[2] and inbox_entry(held[2], message_id)
    if held[1] ~= "pending" or not redis.call("ZSCORE", inbox, entry) then
        return {0, "message", held[1] or "gone"}
    end

    local version = version_read
    local written_at = digits(now)
    if has_state == "1" then
        version = digits(tonumber(version_read) + 1)
        redis.call("HSET", instance, "v", version, "d", state_json, "t", written_at, "w", writer)
        redis.call("LPUSH", states, cjson.encode({v = version, d = state_json, t = written_at, w = writer}))
        redis.call("LTRIM", states, 0, digits(tonumber(state_history_limit) - 1))
    end
    redis.call("ZREM", inbox, entry)
    redis.call("HSET", message, "v", version)
    finish_message(message, message_id, "done", now, finished, finished_keyed)
    announce_end(prefix, finished, "finished", message_id)
    record_turn(turns, turn_json, turns_limit, turn_index, member)
    drop_lease(prefix, member, leased)
    make_ready(prefix, member, ready)

    local outbox, woken = reader(keys, args, 11, 15), {}
    for _ = 1, sends do
        send_unit(outbox, now, woken)
    end
    for _ = 1, events do
        publish_event(outbox, now, woken)
    end
    wake_streams(woken, wake_maxlen)
    return {1, version, written_at}
end

return commit(KEYS, ARGV)
