-- schema.lua: record the layout version this code writes, unless the data is at a newer one.
--
-- schema(
--   keys=[schema],
--   args=[component, version]
-- )
--
-- KEYS[1]  schema     keel:schema, a hash of component -> schema version
-- ARGV[1]  component  the field to check and raise, "store"
-- ARGV[2]  version    the version this code reads and writes, as decimal digits
--
-- returns  {before, now}  the version found ("" when none) and the one recorded after the call; the
--                         field is raised to ARGV[2] when absent or lower, and left alone when it is
--                         higher or not a number (the caller refuses such data)
--
-- Versions of the layout (see keys.py): 1 the versioned store (keel:kv:, keel:kvh:); 2 adds the runtime's
-- keys, which are created on first use, so going from 1 to 2 rewrites nothing and only records the number;
-- 3 adds step results (keel:steps:), holds, the failure time of a message (f) and the apps' dead sets
-- (keel:dead:). Going from 2 to 3, the engine first runs upgrade_3.lua over every instance (batch by
-- batch: it is idempotent, so an upgrade cut short is finished by the next connect), and only then
-- calls this script; so a recorded 3 means the data is whole. 4 adds timers, pruning and deletion: inboxes
-- become sorted sets by visible time, messages get times (a, r, x) and their key (k), and the ids:,
-- finished:, finkeyed:, turnidx: and tokfloor: keys appear; going from 3 to 4, the engine runs upgrade_4.lua
-- over every message of every app (batch by batch, idempotent) before calling this script. 5 adds the
-- apps' event logs (keel:event:, keel:events:, keel:evtime:, keel:evkeyed:, keel:evidem:) and handler
-- delivery instances, all created on first use, so going from 4 to 5 rewrites nothing and only records
-- the number. 6 adds each instance's kind (workflow or delivery) to its keel:inst: hash; going from 5 to 6
-- (or from any older layout, after its own upgrades), the engine runs upgrade_6.lua over every instance
-- (batch by batch, idempotent) before calling this script. 7 changes no key (the ready sets were per
-- workflow already; the SQL engines index theirs so at 7), so going from 6 to 7 only records the number.
--
-- One script, so that processes starting together never lower a version another one has just raised.

local schema, component, version = KEYS[1], ARGV[1], ARGV[2]

local found = redis.call("HGET", schema, component)
if not found or (tonumber(found) and tonumber(found) < tonumber(version)) then
    redis.call("HSET", schema, component, version)
    return {found or "", version}
end
return {found, found}
