-- events.lua: read the app's newest events, newest first, in one consistent snapshot.
--
-- events(
--   keys=[events],
--   args=[event_stem, limit]
-- )
--
-- KEYS[1]  events      keel:events:{$app}: event id -> sequence number, read only
-- ARGV[1]  event_stem  "keel:event:{$app}:", to name each event's hash (in the app's slot)
-- ARGV[2]  limit       at most this many are returned
--
-- returns  {{event_id, {field_1, value_1, ...}}, ...}  newest (highest q) first, each with its hash's
--          fields (runtime_lib.lua lists them); an id whose hash is missing is left out
--
-- Writes nothing.
--
-- Key layout: runtime_lib.lua, prepended to this script.

local events, event_stem, limit = KEYS[1], ARGV[1], tonumber(ARGV[2])

local rows = {}
for _, event_id in ipairs(redis.call("ZREVRANGE", events, 0, limit - 1)) do
    local fields = redis.call("HGETALL", event_stem .. event_id)
    if fields[1] then
        table.insert(rows, {event_id, fields})
    end
end
return rows
