-- delete.lua: delete a workflow instance and everything it owns, atomically.
--
-- delete(
--   keys=[instance, inbox, ids, idempotency, states, turns, ready, leased, dead, finished, finished_keyed,
--         turn_index, message_index, tokfloor],
--   args=[prefix, member]
-- )
--
-- KEYS[1]   instance        keel:inst:{$inst}: deleted, its token first raised into tokfloor
-- KEYS[2]   inbox           keel:inbox:{$inst}: deleted
-- KEYS[3]   ids             keel:ids:{$inst}: read for the instance's messages, then deleted
-- KEYS[4]   idempotency     keel:idem:{$inst}: deleted
-- KEYS[5]   states          keel:states:{$inst}: deleted
-- KEYS[6]   turns           keel:turns:{$inst}: deleted
-- KEYS[7]   ready           keel:ready:{$app}:$workflow: $inst removed
-- KEYS[8]   leased          keel:leased:{$app}:$workflow: $inst removed
-- KEYS[9]   dead            keel:dead:{$app}: the instance's messages removed
-- KEYS[10]  finished        keel:finished:{$app}: the instance's messages removed
-- KEYS[11]  finished_keyed  keel:finkeyed:{$app}: the instance's messages removed
-- KEYS[12]  turn_index      keel:turnidx:{$app}: $inst removed
-- KEYS[13]  message_index   keel:msgindex:{$app}: the instance's messages removed
-- KEYS[14]  tokfloor        keel:tokfloor:{$app}: raised to the instance's token if that is higher
-- ARGV[1]   prefix          the key prefix, to name each message's keel:msg: and keel:steps: keys (in the
--                           instance's slot)
-- ARGV[2]   member          $inst
--
-- returns  1 if the instance existed (and is deleted now), 0 if there was nothing to delete
--
-- Fencing: a worker still holding a claim finds no token any more, and every lease-checking script
-- refuses it with reason "deleted". A later send recreates the instance with its token at the app's
-- tokfloor, at least the deleted instance's last token: the next claim's token is higher than any token
-- the old incarnation handed out, so no token is ever reused for an instance id, and no tombstone is kept.
--
-- Work is proportional to the instance's kept messages (pruning keeps that bounded).
--
-- Key layout: runtime_lib.lua, prepended to this script.

local instance, inbox, ids, idempotency, states, turns = unpack(KEYS, 1, 6)
local ready, leased, dead, finished, finished_keyed = unpack(KEYS, 7, 11)
local turn_index, message_index, tokfloor = unpack(KEYS, 12, 14)
local prefix, member = ARGV[1], ARGV[2]

if redis.call("EXISTS", instance, ids) == 0 then
    return 0
end
local token = tonumber(redis.call("HGET", instance, "tok") or "0")
if token > tonumber(redis.call("GET", tokfloor) or "0") then
    redis.call("SET", tokfloor, digits(token))
end
for _, message_id in ipairs(redis.call("SMEMBERS", ids)) do
    redis.call("DEL", message_key(prefix, member, message_id), steps_key(prefix, member, message_id))
    redis.call("HDEL", message_index, message_id)
    redis.call("ZREM", dead, message_id)
    redis.call("ZREM", finished, message_id)
    redis.call("ZREM", finished_keyed, message_id)
end
redis.call("DEL", instance, inbox, ids, idempotency, states, turns)
redis.call("ZREM", ready, member)
redis.call("ZREM", leased, member)
redis.call("ZREM", turn_index, member)
return 1
