-- group.lua: the fenced writes of several turns of one worker in one script (group commit): turn commits and
-- step records, each checked against its own lease and written or refused on its own, in the order given.
-- One script is one round trip and, with appendfsync always, one sync to disk for all of them.
--
-- group(
--   keys=[unit 1 keys..., unit 2 keys..., ...],
--   args=[n, kind_1, keys_1, args_1, ..., kind_n, keys_n, args_n, unit 1 args..., unit 2 args..., ...]
-- )
--
-- ARGV[1]              n        how many units follow
-- ARGV[2..1+3n]                 per unit: its kind ("commit" or "step"), how many KEYS and how many ARGV it has
-- KEYS, ARGV[2+3n..]            each unit's own KEYS and ARGV, one after the other, as described below
--
-- returns  {reply_1, ..., reply_n}  each unit's reply, as described below: a refused unit wrote nothing and
--                                   takes nothing of the others with it
--
-- A commit: one turn, atomically: the new state, its history entry, the message's completion,
-- the turn record, the release of the lease, the messages the turn sends and the events it emits (each
-- with its deliveries); or nothing at all when the lease is lost.
--
-- commit unit(
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
-- the same way), after the turn's own writes; every app that got a message is woken once. The message's
-- end is published on keel:ended:{$app} (announce_end), for the clients waiting for it.

-- A step record: a step's result for the claim's message, if the claim still holds its lease; the first
-- result recorded under a name stands.
--
-- step unit(
--   keys=[instance, steps],
--   args=[token, name, result_json]
-- )
--
-- KEYS[1]  instance     keel:inst:{$inst}: checked (token, owner, lease), not written
-- KEYS[2]  steps        keel:steps:{$inst}:$id, $id the claim's message: name -> result_json unless the name
--                       is there already (HSETNX)
-- ARGV[1]  token        the fencing token the turn runs under
-- ARGV[2]  name         the step's name
-- ARGV[3]  result_json  the step's result as JSON text
--
-- returns  {1, 1 or 0}           held: 1 the result was recorded, 0 the name had a result already (kept)
--          {0, reason, detail}   nothing written; reasons as a commit's ("deleted", "token", "released",
--                                "expired")
--
-- The message of a live lease is the one its claim took, and stays pending until the lease is let go, so
-- the token check alone ties the record to the message the claim runs.
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


-- A step record: see its description above.
local function record_step(keys, args)
    local instance, steps = keys[1], keys[2]
    local token, name, result_json = args[1], args[2], args[3]
    local problem = lease_problem(instance, token, now_us())
    if problem then
        return {0, problem[1], problem[2]}
    end
    return {1, redis.call("HSETNX", steps, name, result_json)}
end

local units = {commit = commit, step = record_step}
local n = tonumber(ARGV[1])
local replies = {}
local next_key, next_arg = 1, 2 + 3 * n
for i = 1, n do
    local kind, key_count, arg_count = ARGV[3 * i - 1], tonumber(ARGV[3 * i]), tonumber(ARGV[3 * i + 1])
    local keys = {unpack(KEYS, next_key, next_key + key_count - 1)}
    local args = {unpack(ARGV, next_arg, next_arg + arg_count - 1)}
    next_key, next_arg = next_key + key_count, next_arg + arg_count
    replies[i] = units[kind](keys, args)
end
return replies
