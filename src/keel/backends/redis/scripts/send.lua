-- send.lua: add a message to its instance's inbox, visible from now + delay_us, and wake the app's idle
-- workers, unless the instance's idempotency key, or the message id itself, was sent before.
--
-- send(
--   keys=[instance, inbox, message, idempotency, ids, sequence, message_index, ready, tokfloor, wake],
--   args=[member, message_id, payload_json, has_key, idempotency_key, delay_us, kind, wake_maxlen]
-- )
--
-- KEYS[1]   instance         keel:inst:{$inst}: created (tok = the app's tokfloor, kind) if the instance is new;
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
-- ARGV[7]   kind             what the instance holds, "workflow" or "delivery": stored if the instance is new
-- ARGV[8]   wake_maxlen      about how many entries the wake stream keeps
--
-- KEYS and ARGV[1..7] are one send unit: group.lua (a turn commit's sends) and publish.lua (an event's
-- deliveries) carry units of the same shape, and all three run send_message of runtime_lib.lua.
--
-- returns  {id, conflict}: id the message id that stands for this send: ARGV[2] when added, or when that
--          id was sent already (a resend after a lost reply adds nothing); the first message's id when the
--          idempotency key was used before for this instance (nothing added); conflict 1 when that first
--          message's payload is another than ARGV[3] (the caller raises: nothing was added), else 0
--
-- A delayed message still wakes idle workers now; when it becomes visible no one is woken: workers see it
-- at their next poll, as they see the end of a hold.
--
-- Key layout: runtime_lib.lua, prepended to this script.

local woken = {}
local sent, conflict = send_unit(reader(KEYS, ARGV, 1, 1), now_us(), woken)
wake_streams(woken, ARGV[8])
return {sent, conflict and 1 or 0}
