-- runtime_lib.lua: helpers shared by the runtime scripts. The engine prepends this file to send.lua,
-- claim.lua, renew.lua, commit.lua, fail.lua and release.lua before loading each one, so every runtime
-- operation is still a single script: atomic, one round trip. Nothing here runs a command by itself
-- except the replication switch below.
--
-- Key layout of the runtime ("keel:" is the default prefix, "?prefix=" in the URL picks another; see
-- keys.py, which names every key, and builds them as the scripts do):
--
-- $inst is "app/workflow/workflow_id", each part with "%", "/", "{" and "}" percent-encoded; it is the
-- instance's hash tag, so all keys of one instance share a cluster slot. $app is the app name with "%",
-- "{" and "}" encoded, the tag of the per-app keys.
--
-- keel:schema                 hash    component -> schema version, "store" -> "2" (schema.lua, at connect)
-- keel:inst:{$inst}           hash    tok     fencing token: raised by every claim, never lowered or reused
--                                     own     lease owner ("host:pid"), absent when not leased
--                                     exp     lease expiry, microseconds since the epoch by this server's
--                                             clock; absent when not leased
--                                     paused  "1" once a turn failed: never claimed until retried or skipped
--                                     v d t w committed state: version, JSON, written_at (microseconds),
--                                             writer; absent before the first committed turn
-- keel:inbox:{$inst}          list    ids of pending messages, oldest first; the head is the next turn's
-- keel:msg:{$inst}:$id        hash    p payload JSON, s status (pending, done, failed), n attempts so far,
--                                     q the app-wide sequence number of the send, i $inst,
--                                     v the state version its turn committed, e why its turn failed
-- keel:idem:{$inst}           hash    idempotency key -> id of the first message sent under it
-- keel:states:{$inst}         list    the last STATE_HISTORY_LIMIT states, newest first, each a JSON object
--                                     {"v", "d", "t", "w"} as in keel:kvh:
-- keel:turns:{$inst}          list    the last TURNS_LIMIT turn records, newest first, JSON written by the
--                                     engine (keys documented in broker.py)
-- keel:seq:{$app}             string  the app's send counter: the messages' q values, the app's send order
-- keel:msgindex:{$app}        hash    message id -> $inst
-- keel:ready:{$app}:$workflow zset    $inst -> q of its inbox head, for instances with a pending message,
--                                     no lease and not paused: what claim takes, lowest score first
-- keel:leased:{$app}:$workflow zset   $inst -> exp, for instances under a lease (live or expired)
-- keel:wake:{$app}            stream  one entry {i = $inst} per send, capped near WAKE_STREAM_MAXLEN;
--                                     idle workers XREAD BLOCK on it
--
-- Invariant, kept by every script: an instance under a lease (live or expired) is in its workflow's leased
-- set and has exp; one without a lease that has a pending message and is not paused is in its ready set;
-- any other instance is in neither.

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

-- Why the lease under token is not held at now, as {reason, detail}; nil when it is held.
local function lease_problem(instance, token, now)
    local held = redis.call("HMGET", instance, "tok", "exp")
    if held[1] ~= token then
        return {"token", held[1] or "0"}
    end
    if not held[2] then
        return {"released", ""}
    end
    if tonumber(held[2]) <= now then
        return {"expired", held[2]}
    end
    return nil
end

-- Clear an instance's lease; its token stays, so the next claim raises it further.
local function drop_lease(prefix, member, leased)
    redis.call("HDEL", instance_key(prefix, member), "own", "exp")
    redis.call("ZREM", leased, member)
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
