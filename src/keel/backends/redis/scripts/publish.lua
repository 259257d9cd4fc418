-- publish.lua: append an event to its app's log and send its deliveries, one message per handler, and
-- wake the app's idle workers; unless the event's id is in the log already, or its idempotency key was
-- used by an event still in the log.
--
-- publish(
--   keys=[event, events, event_times, event_times_keyed, event_keys, sequence, delivery send unit keys...],
--   args=[wake_maxlen, event_id, has_key, idempotency_key, deliveries, fields, field_1, value_1, ...,
--         delivery send unit args...]
-- )
--
-- KEYS[1]   event              keel:event:{$app}:$event: created with q, a, k and the given fields
-- KEYS[2]   events             keel:events:{$app}: $event added, scored by q
-- KEYS[3]   event_times        keel:evtime:{$app}: $event added, scored by a, when it has no key
-- KEYS[4]   event_times_keyed  keel:evkeyed:{$app}: $event added, scored by a, when it has a key
-- KEYS[5]   event_keys         keel:evidem:{$app}: idempotency key -> $event
-- KEYS[6]   sequence           keel:seq:{$app}: raised by one, giving the event its q
-- KEYS[7..]                    the keys of each delivery's send unit (10 each, as send.lua's KEYS)
-- ARGV[1]   wake_maxlen        about how many entries a wake stream keeps
-- ARGV[2]   event_id           $event, unique per app
-- ARGV[3]   has_key            "1" when an idempotency key is given, else "0"
-- ARGV[4]   idempotency_key    the key; ignored when has_key is "0"
-- ARGV[5]   deliveries         how many delivery send units follow the fields
-- ARGV[6]   fields             how many field-value pairs follow
-- ARGV[7..]                    the event hash's fields and values: y, p, h, and sa sw si, m when given
--                              (runtime_lib.lua lists them); then each delivery's send unit arguments
--                              (send.lua's ARGV[1..7])
--
-- returns  {id, conflict}: id the event id that stands for this publish: ARGV[2] when appended, or when
--          that id is in the log already; the first event's id when the idempotency key was used before in
--          the app (in both cases nothing is written, deliveries included); conflict 1 when that first event's
--          type or payload is another than this one's (the caller raises), else 0
--
-- KEYS and ARGV[2..] are one event unit; group.lua's commits carry units of the same shape for a turn's events,
-- and both run publish_event of runtime_lib.lua. An event whose deliveries were all sent before (by id)
-- wakes no one; an event without handlers is logged and wakes no one: there is nothing to claim.
--
-- Key layout: runtime_lib.lua, prepended to this script.

local woken = {}
local event_id, conflict = publish_event(reader(KEYS, ARGV, 1, 2), now_us(), woken)
wake_streams(woken, ARGV[1])
return {event_id, conflict and 1 or 0}
