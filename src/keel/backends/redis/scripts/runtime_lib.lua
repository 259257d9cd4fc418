-- runtime_lib.lua: helpers shared by the runtime scripts. The engine prepends this file to every runtime
-- script (send, claim, renew, group (commits and steps), fail, release, retry, dead_letters, resolve, prune, delete,
-- publish, events, and the layout upgrades upgrade_3, upgrade_4 and upgrade_6) before loading it, so every
-- runtime operation is still a single script: atomic, one round trip. Nothing here runs a command by
-- itself except the replication switch below.
--
-- Key layout of the runtime ("keel:" is the default prefix, "?prefix=" in the URL picks another; see
-- keys.py, which names every key, and builds them as the scripts do):
--
-- $inst is "app/workflow/workflow_id", each part with "%", "/", "{" and "}" percent-encoded; it is the
-- instance's hash tag, so all keys of one instance share a cluster slot. $app is the app name with "%",
-- "{" and "}" encoded, the tag of the per-app keys. Times are microseconds since the epoch by this
-- server's clock (TIME).
--
-- keel:schema                 hash    component -> schema version, "store" -> "7" (schema.lua, at connect)
-- keel:inst:{$inst}           hash    tok     fencing token: raised by every claim, never lowered or reused;
--                                             created by the instance's first send, at its app's tokfloor
--                                     own     lease owner ("host:pid"), absent when no worker holds a lease;
--                                             cleared by commit, fail, release and retry: a lease without
--                                             own is released, and fenced out
--                                     exp     lease expiry; absent when not leased. With own absent it is a
--                                             hold: retry keeps the instance from claims until exp
--                                     lapsed  the exp of a lease that expired and was swept back to ready
--                                             by a claim, before anyone claimed again; cleared by the next
--                                             claim. Tells "expired" from "released" for a late caller
--                                     paused  "1" once a turn failed: never claimed until retried or skipped
--                                     v d t w committed state: version, JSON, written_at, writer; absent
--                                             before the first committed turn
--                                     kind    what the instance holds, set with tok by its first send from
--                                             the message's kind: "workflow" or "delivery" (a handler's
--                                             delivery of one event); prune goes by it, never by the name
--                                     The hash exists exactly while the instance does (send creates it,
--                                     delete removes it): no tok means the instance was deleted.
-- keel:inbox:{$inst}          zset    "QQQQQQQQQQQQQQQQ:$id" -> r, for every pending message (and the failed
--                                     one pausing the instance): Q its sequence number, zero-padded to 16
--                                     digits, r the time it becomes visible. The lowest (r, then Q) is the
--                                     next turn's; the instance is claimable once that r has passed
-- keel:msg:{$inst}:$id        hash    p payload JSON, s status (pending, done, failed, skipped), n attempts
--                                     so far, q the app-wide sequence number of the send, i $inst, a sent
--                                     at, r visible at, k its idempotency key (if sent with one), v the
--                                     state version its turn committed, e why its turn failed, f when it
--                                     failed, x when it finished (done or skipped)
-- keel:steps:{$inst}:$id      hash    step name -> result JSON recorded for message $id; the first result
--                                     of a name stands (HSETNX). Pruned with its message
-- keel:ids:{$inst}            set     the id of every kept message of the instance, whatever its status
-- keel:idem:{$inst}           hash    idempotency key -> id of the first message sent under it
-- keel:states:{$inst}         list    the last STATE_HISTORY_LIMIT states, newest first, each a JSON object
--                                     {"v", "d", "t", "w"} as in keel:kvh:
-- keel:turns:{$inst}          list    the last TURNS_LIMIT turn records, newest first, JSON written by the
--                                     engine (keys documented in rows.py)
-- keel:seq:{$app}             string  the app's counter: the q values of its messages (the send order)
--                                     and of its events (the log's order)
-- keel:msgindex:{$app}        hash    message id -> $inst
-- keel:ready:{$app}:$workflow zset    $inst -> r of its next message (its inbox's lowest), for instances
--                                     with a pending message, no lease or hold and not paused: claim takes
--                                     the scores that have passed, lowest first (equal ones by q)
-- keel:leased:{$app}:$workflow zset   $inst -> exp, for instances under a lease (live or expired) or a hold
-- keel:dead:{$app}            zset    $id -> f, for every message of the app whose status is failed
-- keel:finished:{$app}        zset    $id -> x, for every done or skipped message sent without a key
-- keel:finkeyed:{$app}        zset    $id -> a, for every done or skipped message sent with a key
-- keel:turnidx:{$app}         zset    $inst -> started_at of its oldest kept turn record, for every
--                                     instance with turn records
-- keel:tokfloor:{$app}        string  the highest fencing token any deleted instance of the app had
-- keel:wake:{$app}            stream  one entry {i = $inst} per send and per resolved dead letter, capped
--                                     near WAKE_STREAM_MAXLEN; idle workers XREAD BLOCK on it
-- keel:event:{$app}:$event    hash    one event of the app's log: q its sequence number (a value of
--                                     keel:seq:, shared with the sends), y type, p payload JSON, h the
--                                     handlers as a JSON array, a published at; when given, sa sw si the
--                                     source instance (app, workflow, workflow id), m the source message
--                                     id, k the idempotency key
-- keel:events:{$app}          zset    $event -> q, for every event in the log (events.lua, newest first)
-- keel:evtime:{$app}          zset    $event -> a, for every event published without an idempotency key
-- keel:evkeyed:{$app}         zset    $event -> a, for every event published with one
-- keel:evidem:{$app}          hash    idempotency key -> $event first published under it
--
-- A handler delivery is an instance of kind "delivery" (keel names it workflow "on/HANDLER", which no
-- script reads) whose workflow id is the event's id, holding that one delivery message; prune deletes it
-- whole once the message is pruned.
--
-- Invariants, kept by every script: an instance with exp (a lease, live or expired, or a hold) is in its
-- workflow's leased set under that score; one without exp that has a pending message and is not paused is
-- in its ready set under its next message's r; any other instance is in neither. A message is in its app's
-- dead set exactly while its status is failed, and then it is the lowest of its paused instance's inbox.
-- A done or skipped message is in finished or finkeyed; every kept message is in its instance's ids set.
-- An event is in events and in one of evtime (no key) or evkeyed (a key, which evidem maps to it) exactly
-- while its hash exists.

-- Before Redis 5 a script that read TIME could not write unless it asked for effects replication.
if redis.replicate_commands then
    redis.replicate_commands()
end

-- The server's clock in microseconds since the epoch; a Lua number (a double) holds it exactly.
local function now_us()
    local now = redis.call("TIME")
    return tonumber(now[1]) * 1000000 + tonumber(now[2])
end

-- A whole number as decimal digits: redis.call would print a large Lua number in exponent form.
local function digits(n)
    return string.format("%d", n)
end

local function instance_key(prefix, member)
    return prefix .. "inst:{" .. member .. "}"
end

local function inbox_key(prefix, member)
    return prefix .. "inbox:{" .. member .. "}"
end

local function message_key(prefix, member, message_id)
    return prefix .. "msg:{" .. member .. "}:" .. message_id
end

local function steps_key(prefix, member, message_id)
    return prefix .. "steps:{" .. member .. "}:" .. message_id
end

local function turns_key(prefix, member)
    return prefix .. "turns:{" .. member .. "}"
end

-- A message's member in its instance's inbox: equal visible times sort by sequence number.
local function inbox_entry(seq, message_id)
    return string.format("%016d", tonumber(seq)) .. ":" .. message_id
end

local function entry_message_id(entry)
    return string.sub(entry, 18)
end

local function entry_seq(entry)
    return tonumber(string.sub(entry, 1, 16))
end

-- The instance's next message as {entry, visible_us}, or nil when its inbox is empty.
local function inbox_head(inbox)
    local head = redis.call("ZRANGE", inbox, 0, 0, "WITHSCORES")
    if not head[1] then
        return nil
    end
    return {head[1], tonumber(head[2])}
end

-- Why the lease under token is not held at now, as {reason, detail}; nil when it is held.
-- Reasons: "deleted" (the instance is gone), "token" (detail: the instance's token now), "released" (by
-- commit, fail, release or retry), "expired" (detail: the expiry; also when a claim has since swept the
-- expired lease back to ready).
local function lease_problem(instance, token, now)
    local held = redis.call("HMGET", instance, "tok", "own", "exp", "lapsed")
    if not held[1] then
        return {"deleted", ""}
    end
    if held[1] ~= token then
        return {"token", held[1]}
    end
    if not held[2] then
        if held[4] then
            return {"expired", held[4]}
        end
        return {"released", ""}
    end
    if not held[3] or tonumber(held[3]) <= now then
        return {"expired", held[3] or ""}
    end
    return nil
end

-- Clear an instance's lease or hold; its token stays, so the next claim raises it further.
local function drop_lease(prefix, member, leased)
    redis.call("HDEL", instance_key(prefix, member), "own", "exp")
    redis.call("ZREM", leased, member)
end

-- Clear an expired lease or an ended hold found by a claim's sweep; a worker's lease leaves its expiry in
-- lapsed, so that the late worker is told its lease expired, not that it was released.
local function lapse_lease(prefix, member, leased)
    local instance = instance_key(prefix, member)
    local held = redis.call("HMGET", instance, "own", "exp")
    if held[1] and held[2] then
        redis.call("HSET", instance, "lapsed", held[2])
    end
    drop_lease(prefix, member, leased)
end

-- Offer an unleased instance to claimers under its next message's visible time, unless paused or idle.
local function offer(instance, inbox, member, ready)
    if redis.call("HGET", instance, "paused") == "1" then
        return
    end
    local head = inbox_head(inbox)
    if not head then
        return
    end
    redis.call("ZADD", ready, digits(head[2]), member)
end

local function make_ready(prefix, member, ready)
    offer(instance_key(prefix, member), inbox_key(prefix, member), member, ready)
end

-- When a turn record started, from its JSON.
local function turn_started(turn_json)
    return tonumber(cjson.decode(turn_json).started_at_us)
end

-- Push a turn record, keep the newest limit of them, and index the instance by its oldest kept one.
local function record_turn(turns, turn_json, limit, turn_index, member)
    if redis.call("LPUSH", turns, turn_json) > tonumber(limit) then
        redis.call("LTRIM", turns, 0, digits(tonumber(limit) - 1))
    end
    redis.call("ZADD", turn_index, digits(turn_started(redis.call("LINDEX", turns, -1))), member)
end

-- Mark a message finished (done or skipped) at now and index it for pruning: by finish time, or, when it
-- carries an idempotency key, by send time (prune.lua says why).
local function finish_message(message, message_id, status, now, finished, finished_keyed)
    redis.call("HSET", message, "s", status, "x", digits(now))
    local sent = redis.call("HMGET", message, "k", "a")
    if sent[1] then
        redis.call("ZADD", finished_keyed, sent[2] or digits(now), message_id)
    else
        redis.call("ZADD", finished, digits(now), message_id)
    end
end

-- Announce that message_id ended (done, failed or skipped) to the clients waiting for it: PUBLISH on its app's
-- channel keel:ended:{$app}, named from app_key, the keel:STEM:{$app} key of the same app the script was given
-- (a channel is no key: the script may name it). Waiters read the status again after every reconnect, so a
-- message published while one was disconnected is not missed.
local function announce_end(prefix, app_key, stem, message_id)
    redis.call("PUBLISH", prefix .. "ended:" .. string.sub(app_key, #prefix + #stem + 2), message_id)
end

-- A reader over a script's KEYS and ARGV, for calls that carry a varying number of units (sends, events):
-- read_keys and read_args return the next n of them as a table and move past them.
local function reader(keys, args, next_key, next_arg)
    return {keys = keys, args = args, k = next_key, a = next_arg}
end

local function read_keys(r, n)
    local slice = {unpack(r.keys, r.k, r.k + n - 1)}
    r.k = r.k + n
    return slice
end

local function read_args(r, n)
    local slice = {unpack(r.args, r.a, r.a + n - 1)}
    r.a = r.a + n
    return slice
end

-- The KEYS and ARGV of one send unit, as send.lua lists them (its wake_maxlen aside).
local SEND_KEYS, SEND_ARGS = 10, 7

-- Add a message to its instance's inbox, visible from now + delay_us, unless the instance's idempotency
-- key, or the message id itself, was sent before: send.lua's whole logic, which a commit's sends and an
-- event's deliveries run too. keys and args are one send unit. Returns the id that stands for the send,
-- whether it was added, and whether its key holds a message with another payload (send.lua refuses that;
-- a commit's sends are first-wins); the caller wakes the app (wake_streams).
local function send_message(keys, args, now)
    local instance, inbox, message, idempotency, ids = unpack(keys, 1, 5)
    local sequence, message_index, ready, tokfloor = unpack(keys, 6, 9)
    local member, message_id, payload_json, has_key, idempotency_key, delay_us, kind = unpack(args, 1, SEND_ARGS)
    has_key = has_key == "1"
    if has_key then
        local first = redis.call("HGET", idempotency, idempotency_key)
        if first then
            -- The first message's hash is this one's key with the other id: same instance, same slot.
            local held = redis.call("HGET", string.sub(message, 1, #message - #message_id) .. first, "p")
            return first, false, held ~= false and held ~= payload_json
        end
    end
    if redis.call("HEXISTS", message_index, message_id) == 1 then
        return message_id, false, false
    end

    local sent_at, visible_at = digits(now), digits(now + math.max(0, tonumber(delay_us)))
    local seq = redis.call("INCR", sequence)
    redis.call("HSET", message, "p", payload_json, "s", "pending", "n", "0", "q", digits(seq), "i", member,
        "a", sent_at, "r", visible_at)
    redis.call("HSET", message_index, message_id, member)
    redis.call("SADD", ids, message_id)
    if has_key then
        redis.call("HSET", message, "k", idempotency_key)
        redis.call("HSET", idempotency, idempotency_key, message_id)
    end
    if redis.call("HEXISTS", instance, "tok") == 0 then
        redis.call("HSET", instance, "tok", redis.call("GET", tokfloor) or "0", "kind", kind)
    end

    redis.call("ZADD", inbox, visible_at, inbox_entry(seq, message_id))
    if redis.call("HEXISTS", instance, "exp") == 0 then
        offer(instance, inbox, member, ready)
    end
    return message_id, true, false
end

-- Run the next send unit of r; a send that added its message names its wake stream in woken. Returns the
-- id that stands for the send and whether its key holds a message with another payload (send_message).
local function send_unit(r, now, woken)
    local keys, args = read_keys(r, SEND_KEYS), read_args(r, SEND_ARGS)
    local sent, added, conflict = send_message(keys, args, now)
    if added then
        woken[keys[SEND_KEYS]] = args[1]
    end
    return sent, conflict
end

-- Append one entry to each wake stream of woken (stream -> $inst of a send to it), trimmed near maxlen.
local function wake_streams(woken, maxlen)
    for wake, member in pairs(woken) do
        redis.call("XADD", wake, "MAXLEN", "~", maxlen, "*", "i", member)
    end
end

-- Append the next event unit of r to its app's log and send its deliveries (publish.lua documents the
-- unit), unless its id is in the log or its idempotency key was used by an event still there; then
-- nothing is written and its deliveries are stepped over. Returns the id that stands for the event, and
-- whether its key holds an event of another type or payload (publish.lua refuses that; a commit's events
-- are first-wins).
local function publish_event(r, now, woken)
    local event, events, times, keyed_times, event_keys, sequence = unpack(read_keys(r, 6))
    local event_id, has_key, idempotency_key, deliveries, fields = unpack(read_args(r, 5))
    local values = read_args(r, 2 * tonumber(fields))
    local first, conflict = redis.call("EXISTS", event) == 1 and event_id, false
    if not first and has_key == "1" then
        first = redis.call("HGET", event_keys, idempotency_key)
        if first then
            -- The first event's hash is this one's key with the other id; values start with y and p.
            local held = redis.call("HMGET", string.sub(event, 1, #event - #event_id) .. first, "y", "p")
            conflict = held[1] ~= false and (held[1] ~= values[2] or held[2] ~= values[4])
        end
    end
    if first then
        r.k = r.k + SEND_KEYS * tonumber(deliveries)
        r.a = r.a + SEND_ARGS * tonumber(deliveries)
        return first, conflict
    end

    local seq, published_at = digits(redis.call("INCR", sequence)), digits(now)
    redis.call("HSET", event, "q", seq, "a", published_at, unpack(values))
    redis.call("ZADD", events, seq, event_id)
    if has_key == "1" then
        redis.call("HSET", event, "k", idempotency_key)
        redis.call("HSET", event_keys, idempotency_key, event_id)
        redis.call("ZADD", keyed_times, published_at, event_id)
    else
        redis.call("ZADD", times, published_at, event_id)
    end
    for _ = 1, tonumber(deliveries) do
        send_unit(r, now, woken)
    end
    return event_id, false
end
