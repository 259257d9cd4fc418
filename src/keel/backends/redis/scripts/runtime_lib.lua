-- runtime_lib.lua: helpers shared by the runtime scripts. The engine prepends this file to every runtime
-- script (send, claim, renew, commit, fail, release, step, retry, dead_letters, resolve, and the layout
-- upgrade upgrade_3) before loading it, so every runtime operation is still a single script: atomic, one
-- round trip. Nothing here runs a command by itself except the replication switch below.
--
-- Key layout of the runtime ("keel:" is the default prefix, "?prefix=" in the URL picks another; see
-- keys.py, which names every key, and builds them as the scripts do):
--
-- $inst is "app/workflow/workflow_id", each part with "%", "/", "{" and "}" percent-encoded; it is the
-- instance's hash tag, so all keys of one instance share a cluster slot. $app is the app name with "%",
-- "{" and "}" encoded, the tag of the per-app keys.
--
-- keel:schema                 hash    component -> schema version, "store" -> "3" (schema.lua, at connect)
-- keel:inst:{$inst}           hash    tok     fencing token: raised by every claim, never lowered or reused
--                                     own     lease owner ("host:pid"), absent when no worker holds a lease;
--                                             cleared by commit, fail, release and retry: a lease without
--                                             own is released, and fenced out
--                                     exp     lease expiry, microseconds since the epoch by this server's
--                                             clock; absent when not leased. With own absent it is a hold:
--                                             retry keeps the instance from claims until exp
--                                     lapsed  the exp of a lease that expired and was swept back to ready
--                                             by a claim, before anyone claimed again; cleared by the next
--                                             claim. Tells "expired" from "released" for a late caller
--                                     paused  "1" once a turn failed: never claimed until retried or skipped
--                                     v d t w committed state: version, JSON, written_at (microseconds),
--                                             writer; absent before the first committed turn
-- keel:inbox:{$inst}          list    ids of pending messages, oldest first; the head is the next turn's
--                                     (a failed head stays, pausing the instance, until resolved)
-- keel:msg:{$inst}:$id        hash    p payload JSON, s status (pending, done, failed, skipped), n attempts
--                                     so far, q the app-wide sequence number of the send, i $inst,
--                                     v the state version its turn committed, e why its turn failed,
--                                     f when it failed (microseconds, server clock)
-- keel:steps:{$inst}:$id      hash    step name -> result JSON recorded for message $id; the first result
--                                     of a name stands (HSETNX). Kept (no retention yet)
-- keel:idem:{$inst}           hash    idempotency key -> id of the first message sent under it
-- keel:states:{$inst}         list    the last STATE_HISTORY_LIMIT states, newest first, each a JSON object
--                                     {"v", "d", "t", "w"} as in keel:kvh:
-- keel:turns:{$inst}          list    the last TURNS_LIMIT turn records, newest first, JSON written by the
--                                     engine (keys documented in broker.py)
-- keel:seq:{$app}             string  the app's send counter: the messages' q values, the app's send order
-- keel:msgindex:{$app}        hash    message id -> $inst
-- keel:ready:{$app}:$workflow zset    $inst -> q of its inbox head, for instances with a pending message,
--                                     no lease or hold and not paused: what claim takes, lowest score first
-- keel:leased:{$app}:$workflow zset   $inst -> exp, for instances under a lease (live or expired) or a hold
-- keel:dead:{$app}            zset    $id -> f, for every message of the app whose status is failed
-- keel:wake:{$app}            stream  one entry {i = $inst} per send and per resolved dead letter, capped
--                                     near WAKE_STREAM_MAXLEN; idle workers XREAD BLOCK on it
--
-- Invariants, kept by every script: an instance with exp (a lease, live or expired, or a hold) is in its
-- workflow's leased set under that score; one without exp that has a pending message and is not paused is
-- in its ready set; any other instance is in neither. A message is in its app's dead set exactly while its
-- status is failed, and then it is the head of its paused instance's inbox.

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

-- Why the lease under token is not held at now, as {reason, detail}; nil when it is held.
-- Reasons: "token" (detail: the instance's token now), "released" (by commit, fail, release or retry),
-- "expired" (detail: the expiry; also when a claim has since swept the expired lease back to ready).
local function lease_problem(instance, token, now)
    local held = redis.call("HMGET", instance, "tok", "own", "exp", "lapsed")
    if held[1] ~= token then
        return {"token", held[1] or "0"}
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

-- Offer an unleased instance to claimers under its oldest pending message, unless it is paused or idle.
local function make_ready(prefix, member, ready)
    if redis.call("HGET", instance_key(prefix, member), "paused") == "1" then
        return
    end
    local head = redis.call("LINDEX", inbox_key(prefix, member), 0)
    if not head then
        return
    end
    redis.call("ZADD", ready, redis.call("HGET", message_key(prefix, member, head), "q"), member)
end

-- Push a turn record and keep the newest limit of them.
local function record_turn(turns, turn_json, limit)
    redis.call("LPUSH", turns, turn_json)
    redis.call("LTRIM", turns, 0, digits(tonumber(limit) - 1))
end
