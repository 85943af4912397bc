-- Forget instances silent since before ARGV[2] (unix s): drop their blocks, mark them stale
-- (if they come back, they are asked for a snapshot). ARGV: prefix, cutoff. Returns the slots.
local slots = redis.call('ZRANGEBYSCORE', P .. 'alive', '-inf', '(' .. ARGV[2])
for _, slot in ipairs(slots) do
  clear_slot(slot)
  redis.call('HSET', P .. 'inst:' .. slot, 'stale', '1')
  redis.call('ZREM', P .. 'alive', slot)
end
return slots
