-- send_many.lua: send a batch of messages as send.lua sends each one, in order, all of them or none: when any
-- message's idempotency key holds a message with another payload, sent before or earlier in the batch, nothing
-- is written.
--
-- send_many(
--   keys=[unit 1's 10 keys, unit 2's 10 keys, ...],
--   args=[wake_maxlen, count, unit 1's 7 args, unit 2's 7 args, ...]
-- )
--
-- Each unit is one message's send unit, as send.lua lists its keys and ARGV[1..7].
--
-- returns  {0, id, id, ...}: the id that stands for each message, in order (see send.lua); or {1, index, id}
--          when the message at index (1-based) conflicts with message id, the first one sent under its key:
--          then nothing was written
--
-- A script that fails halfway keeps what it wrote, so every conflict is looked for before the first write.
--
-- Key layout: runtime_lib.lua, prepended to this script.

local count = tonumber(ARGV[2])

-- The payload each (idempotency hash, key) of the batch stands for: the stored one, or the batch's first.
local standing = {}
for index = 1, count do
    local keys, args = {unpack(KEYS, (index - 1) * SEND_KEYS + 1, index * SEND_KEYS)},
        {unpack(ARGV, 2 + (index - 1) * SEND_ARGS + 1, 2 + index * SEND_ARGS)}
    local message, idempotency = keys[3], keys[4]
    local message_id, payload_json, has_key, idempotency_key = args[2], args[3], args[4], args[5]
    if has_key == "1" then
        local slot = idempotency .. "\n" .. idempotency_key
        local known = standing[slot]
        if known == nil then
            local first = redis.call("HGET", idempotency, idempotency_key)
            if first then
                -- The first message's hash is this one's key with the other id: same instance, same slot.
                local held = redis.call("HGET", string.sub(message, 1, #message - #message_id) .. first, "p")
                known = {first, held or payload_json}
            else
                known = {message_id, payload_json}
            end
            standing[slot] = known
        end
        if known[2] ~= payload_json then
            return {1, index, known[1]}
        end
    end
end

local woken, reply = {}, {0}
local r = reader(KEYS, ARGV, 1, 3)
local now = now_us()
for _ = 1, count do
    local sent = send_unit(r, now, woken)
    reply[#reply + 1] = sent
end
wake_streams(woken, ARGV[1])
return reply
