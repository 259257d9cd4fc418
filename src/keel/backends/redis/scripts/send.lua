-- send.lua: append a message to its instance's inbox and wake the app's idle workers, unless the
-- instance's idempotency key, or the message id itself, was sent before.
--
-- send(
--   keys=[instance, inbox, message, idempotency, sequence, message_index, ready, wake],
--   args=[member, message_id, payload_json, has_key, idempotency_key, wake_maxlen]
-- )
--
-- KEYS[1]  instance         keel:inst:{$inst}: read only, for the lease (or hold: exp) and paused flags
-- KEYS[2]  inbox            keel:inbox:{$inst}: the id is appended
-- KEYS[3]  message          keel:msg:{$inst}:$id: created
-- KEYS[4]  idempotency      keel:idem:{$inst}: idempotency key -> first message id
-- KEYS[5]  sequence         keel:seq:{$app}: raised by one, giving the message its place in the send order
-- KEYS[6]  message_index    keel:msgindex:{$app}: $id -> $inst
-- KEYS[7]  ready            keel:ready:{$app}:$workflow: the instance joins it if this is its only pending
--                           message and it is neither leased, held nor paused
-- KEYS[8]  wake             keel:wake:{$app}: one entry appended, the stream trimmed near wake_maxlen
-- ARGV[1]  member           $inst
-- ARGV[2]  message_id       $id, unique per app
-- ARGV[3]  payload_json     the message's JSON text
-- ARGV[4]  has_key          "1" when an idempotency key is given, else "0"
-- ARGV[5]  idempotency_key  the key; ignored when has_key is "0"
-- ARGV[6]  wake_maxlen      about how many entries the wake stream keeps
--
-- returns  the message id that stands for this send: ARGV[2] when appended, or when that id was sent
--          already (a resend after a lost reply appends nothing); the first message's id when the
--          idempotency key was used before for this instance (nothing appended)
--
-- Key layout: runtime_lib.lua, prepended to this script.

local instance, inbox, message, idempotency = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local sequence, message_index, ready, wake = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local member, message_id, payload_json = ARGV[1], ARGV[2], ARGV[3]
local has_key, idempotency_key, wake_maxlen = ARGV[4] == "1", ARGV[5], ARGV[6]

if has_key then
    local first = redis.call("HGET", idempotency, idempotency_key)
    if first then
        return first
    end
end
if redis.call("HEXISTS", message_index, message_id) == 1 then
    return message_id
end

local seq = digits(redis.call("INCR", sequence))
redis.call("HSET", message, "p", payload_json, "s", "pending", "n", "0", "q", seq, "i", member)
redis.call("HSET", message_index, message_id, member)
if has_key then
    redis.call("HSET", idempotency, idempotency_key, message_id)
end

local pending = redis.call("RPUSH", inbox, message_id)
local leased = redis.call("HEXISTS", instance, "exp") == 1
if pending == 1 and not leased and redis.call("HGET", instance, "paused") ~= "1" then
    redis.call("ZADD", ready, seq, member)
end

redis.call("XADD", wake, "MAXLEN", "~", wake_maxlen, "*", "i", member)
return message_id
