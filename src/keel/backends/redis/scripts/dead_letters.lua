-- dead_letters.lua: read the app's dead letters, newest failure first, in one consistent snapshot.
--
-- dead_letters(
--   keys=[dead, message_index],
--   args=[prefix, limit]
-- )
--
-- KEYS[1]  dead           keel:dead:{$app}: message id -> failed_at, read only
-- KEYS[2]  message_index  keel:msgindex:{$app}: message id -> $inst, read only
-- ARGV[1]  prefix         the key prefix, to name the keel:msg: keys of the messages found
--                         (a single primary is assumed: they live in their instances' slots)
-- ARGV[2]  limit          at most this many are returned
--
-- returns  {{member, message_id, error, attempts, failed_at_us}, ...}  newest failure first; member is
--          $inst; a message id whose index entry is missing is left out
--
-- Writes nothing.
--
-- Key layout: runtime_lib.lua, prepended to this script.

local dead, message_index = KEYS[1], KEYS[2]
local prefix, limit = ARGV[1], tonumber(ARGV[2])

local letters = {}
local newest = redis.call("ZREVRANGE", dead, 0, limit - 1, "WITHSCORES")
for i = 1, #newest, 2 do
    local message_id = newest[i]
    local member = redis.call("HGET", message_index, message_id)
    if member then
        local fields = redis.call("HMGET", message_key(prefix, member, message_id), "e", "n")
        local failed_at = digits(tonumber(newest[i + 1]))
        table.insert(letters, {member, message_id, fields[1] or "", fields[2] or "0", failed_at})
    end
end
return letters
