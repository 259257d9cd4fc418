-- write.lua: compare-and-swap one store key, record it in the key's history, trim the history.
--
-- write(
--   keys=[current, history],
--   args=[expected_version, tombstone, value_json, writer, history_limit]
-- )
--
-- KEYS[1]  current           keel:kv:{$tag}, the key's current record
-- KEYS[2]  history           keel:kvh:{$tag}, the key's kept versions
-- ARGV[1]  expected_version  "" when the key must have no live version (never written, or a tombstone),
--                            else the live version the write is based on, as decimal digits
-- ARGV[2]  tombstone         "1" to delete (write a tombstone), "0" to write a value
-- ARGV[3]  value_json        the value's JSON text; ignored for a tombstone
-- ARGV[4]  writer            who writes, "host:pid"
-- ARGV[5]  history_limit     versions kept in KEYS[2], the new one included; "0" keeps no history
--
-- returns  {1, version, written_at_us}  written: the new version and the server time in microseconds
--                                       since the epoch, as decimal digits (a Lua number would round it)
--          {0, live_version, value_json, written_at_us, writer}
--                                       not written: the live version is another one, returned whole so
--                                       that update() can retry from it without reading it again
--          {0}                          not written: there is no live version (absent or a tombstone)
--
-- Key layout ("keel:" is the default prefix, "?prefix=" in the URL picks another; $tag is the store key
-- with "%", "{" and "}" percent-encoded, so it stays one hash tag and both keys of a store key share a
-- cluster slot; see keys.py):
--
-- keel:schema
--   A hash of component -> schema version ("store" -> "2"). Written at connect (schema.lua), never here.
--
-- keel:kv:{$tag}
--   A hash, the current record: v = version, d = value JSON, t = written_at (microseconds since the
--   epoch, from this server's clock), w = writer. A tombstone keeps v, t, w and has no d, so the next
--   create continues the count: a version is never reused.
--
-- keel:kvh:{$tag}
--   A list of the last history_limit versions, newest first, each a JSON object
--   {"v": version, "d": value JSON (absent in a tombstone), "t": written_at, "w": writer}, every field a
--   string. Absent when history_limit is 0.
--
-- Nothing is written before every check has passed, so a refused write changes nothing.

local current = KEYS[1]
local history = KEYS[2]

local expected = tonumber(ARGV[1])
local tombstone = ARGV[2] == "1"
local value_json = ARGV[3]
local writer = ARGV[4]
local history_limit = tonumber(ARGV[5])

-- Before Redis 5 a script that read TIME could not write unless it asked for effects replication.
if redis.replicate_commands then
    redis.replicate_commands()
end

local stored = redis.call("HMGET", current, "v", "d", "t", "w")
local last_version = tonumber(stored[1]) or 0
local live_version = nil
if stored[2] then
    live_version = last_version
end

if live_version ~= expected then
    if live_version then
        return {0, stored[1], stored[2], stored[3], stored[4]}
    end
    return {0}
end

local version = string.format("%d", last_version + 1)
local now = redis.call("TIME")
local written_at = now[1] .. string.format("%06d", tonumber(now[2]))

if tombstone then
    redis.call("HDEL", current, "d")
    redis.call("HSET", current, "v", version, "t", written_at, "w", writer)
else
    redis.call("HSET", current, "v", version, "d", value_json, "t", written_at, "w", writer)
end

if history_limit > 0 then
    local entry = {v = version, t = written_at, w = writer}
    if not tombstone then
        entry.d = value_json
    end
    redis.call("LPUSH", history, cjson.encode(entry))
    redis.call("LTRIM", history, 0, history_limit - 1)
else
    redis.call("DEL", history)
end

return {1, last_version + 1, written_at}
