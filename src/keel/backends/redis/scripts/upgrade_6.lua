-- upgrade_6.lua: bring instances written under layout 5 to layout 6: each instance's hash gets its kind,
-- "workflow" or "delivery", as the engine decided from the instance's name (the one time the name is read).
-- Idempotent: an instance that has a kind keeps it, and one deleted meanwhile (no tok) is not brought back.
--
-- upgrade_6(
--   keys=[instance_1, ..., instance_n],
--   args=[kind_1, ..., kind_n]
-- )
--
-- KEYS[i]  instance_i  keel:inst:{$inst_i}: kind set, unless it has one or the instance is gone
-- ARGV[i]  kind_i      the kind of instance i
--
-- returns  the number of instances given a kind by this call
--
-- Key layout: runtime_lib.lua, prepended to this script.

local given = 0
for i, instance in ipairs(KEYS) do
    if redis.call("HEXISTS", instance, "tok") == 1 then
        given = given + redis.call("HSETNX", instance, "kind", ARGV[i])
    end
end
return given
