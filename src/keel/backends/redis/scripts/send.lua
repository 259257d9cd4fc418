-- send.lua: add a message to its instance's inbox, visible from now + delay_us, and wake the app's idle
-- workers, unless the instance's idempotency key, or the message id itself, was sent before.
--
-- send(
--   keys=[instance, inbox, message, idempotency, ids, sequence, message_index, ready, tokfloor, wake],
--   args=[member, message_id, payload_json, has_key, idempotency_key, delay_us, wake_maxlen]
-- )
--
-- KEYS[1]   instance         keel:inst:{$inst}: created (tok = the app's tokfloor) if the instance is new;
--                            read for the lease (or hold: exp) and paused flags
-- KEYS[2]   inbox            keel:inbox:{$inst}: the message's entry added, scored by its visible time
-- KEYS[3]   message          keel:msg:{$inst}:$id: created
-- KEYS[4]   idempotency      keel:idem:{$inst}: idempotency key -> first message id
-- KEYS[5]   ids              keel:ids:{$inst}: $id added
-- KEYS[6]   sequence         keel:seq:{$app}: raised by one, giving the message its place in the send order
-- KEYS[7]   message_index    keel:msgindex:{$app}: $id -> $inst
-- KEYS[8]   ready            keel:ready:{$app}:$workflow: unless the instance is leased, held or paused, it
--                            is (re)scored by its next message, which may be this one
-- KEYS[9]   tokfloor         keel:tokfloor:{$app}: read only, when the instance is new
-- KEYS[10]  wake             keel:wake:{$app}: one entry appended, the stream trimmed near wake_maxlen
-- ARGV[1]   member           $inst
-- ARGV[2]   message_id       $id, unique per app
-- ARGV[3]   payload_json     the message's JSON text
-- ARGV[4]   has_key          "1" when an idempotency key is given, else "0"
-- ARGV[5]   idempotency_key  the key; ignored when has_key is "0"
-- ARGV[6]   delay_us         how long after now (this server's clock) the message becomes visible; 0: now
-- ARGV[7]   wake_maxlen      about how many entries the wake stream keeps
--
-- returns  the message id that stands for this send: ARGV[2] when added, or when that id was sent
--          already (a resend after a lost reply adds nothing); the first message's id when the
--          idempotency key was used before for this instance (nothing added)
--
-- A delayed message still wakes idle workers now; when it becomes visible no one is woken: workers see it
-- at their next poll, as they see the end of a hold.
--
-- Key layout: runtime_lib.lua, prepended to this script.

local instance, inbox, message, idempotency, ids = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local sequence, message_index, ready, tokfloor, wake = KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local member, message_id, payload_json = ARGV[1], ARGV[2], ARGV[3]
local has_key, idempotency_key, delay_us, wake_maxlen = ARGV[4] == "1", ARGV[5], tonumber(ARGV[6]), ARGV[7]

if has_key then
    local first = redis.call("HGET", idempotency, idempotency_key)
    if first then
        return first
    end
end
if redis.call("HEXISTS", message_index, message_id) == 1 then
    return message_id
end

local now = now_us()
local sent_at, visible_at = digits(now), digits(now + math.max(0, delay_us))
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
    redis.call("HSET", instance, "tok", redis.call("GET", tokfloor) or "0")
end

redis.call("ZADD", inbox, visible_at, inbox_entry(seq, message_id))
if redis.call("HEXISTS", instance, "exp") == 0 then
    offer(instance, inbox, member, ready)
end

redis.call("XADD", wake, "MAXLEN", "~", wake_maxlen, "*", "i", member)
return message_id
