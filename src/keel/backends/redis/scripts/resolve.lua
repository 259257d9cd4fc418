-- resolve.lua: un-pause an instance paused by a dead letter, atomically: its failed message (the first of
-- its inbox) is either made pending again (retried) or marked skipped and dropped from the inbox; the
-- instance becomes claimable again and the app's idle workers are woken.
--
-- resolve(
--   keys=[instance, inbox, dead, ready, finished, finished_keyed, wake],
--   args=[prefix, member, skip, wake_maxlen]
-- )
--
-- KEYS[1]  instance        keel:inst:{$inst}: must be paused; paused cleared
-- KEYS[2]  inbox           keel:inbox:{$inst}: its first entry is the dead message's; removed when skipped
-- KEYS[3]  dead            keel:dead:{$app}: the message leaves it
-- KEYS[4]  ready           keel:ready:{$app}:$workflow: the instance joins it under its next message, if any
--                          is pending
-- KEYS[5]  finished        keel:finished:{$app}: a skipped message without a key joins it, scored by x; a
--                          skip is published on keel:ended:{$app}, for the clients waiting for its end
-- KEYS[6]  finished_keyed  keel:finkeyed:{$app}: a skipped message with a key joins it, scored by its send
-- KEYS[7]  wake            keel:wake:{$app}: one entry appended, the stream trimmed near wake_maxlen
-- ARGV[1]  prefix          the key prefix, to name the keel:msg: key of the dead message (built here: its id
--                          is only known inside the script; the key is in the instance's slot)
-- ARGV[2]  member          $inst
-- ARGV[3]  skip            "1": the message's s = "skipped", x = now and it leaves the inbox (e and f stay,
--                          as a record); "0": s = "pending", n = "0" (the next claim counts attempt 1), e
--                          and f removed, and it keeps its place (visible time, sequence number): first
-- ARGV[4]  wake_maxlen     about how many entries the wake stream keeps
--
-- returns  the dead message's id, or nil when the instance is not paused by a failed message (unknown,
--          not paused, or its first message is not failed); then nothing is written
--
-- Recorded step results of a retried message stay: its next attempt replays them.
--
-- Key layout: runtime_lib.lua, prepended to this script.

local instance, inbox, dead, ready, finished, finished_keyed, wake = unpack(KEYS, 1, 7)
local prefix, member, skip, wake_maxlen = ARGV[1], ARGV[2], ARGV[3] == "1", ARGV[4]

if redis.call("HGET", instance, "paused") ~= "1" then
    return nil
end
local head = inbox_head(inbox)
if not head then
    return nil
end
local dead_id = entry_message_id(head[1])
local message = message_key(prefix, member, dead_id)
if redis.call("HGET", message, "s") ~= "failed" then
    return nil
end

if skip then
    redis.call("ZREM", inbox, head[1])
    finish_message(message, dead_id, "skipped", now_us(), finished, finished_keyed)
    announce_end(prefix, finished, "finished", dead_id)
else
    redis.call("HSET", message, "s", "pending", "n", "0")
    redis.call("HDEL", message, "e", "f")
end
redis.call("ZREM", dead, dead_id)
redis.call("HDEL", instance, "paused")
-- A failed turn released its lease, and a paused instance is never claimed: there is no lease to respect.
make_ready(prefix, member, ready)
redis.call("XADD", wake, "MAXLEN", "~", wake_maxlen, "*", "i", member)
return dead_id
