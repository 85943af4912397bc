-- Apply one event batch of one instance atomically.
-- ARGV: prefix, slot, seq, resets (0/1), then groups of (op, kind, tier bit, packed hashes)
-- where op is S (stored), E (evicted) or C (cleared: kind, bit and hashes ignored).
-- Returns {status, last_seq}: status 'ok', 'dup' (already applied), 'gap' (now stale),
-- or 'stale' (ignored until a snapshot or clear arrives).
local slot = ARGV[2]
local seq = tonumber(ARGV[3])
local resets = ARGV[4] == '1'
local ik = P .. 'inst:' .. slot
local last = tonumber(redis.call('HGET', ik, 'last_seq') or '0')
if seq <= last then return {'dup', last} end
local stale = redis.call('HGET', ik, 'stale') == '1'
redis.call('HSET', ik, 'last_seq', seq)
if not resets then
  if seq ~= last + 1 then
    redis.call('HSET', ik, 'stale', '1')
    redis.call('HINCRBY', ik, 'gaps', 1)
    return {'gap', last}
  end
  if stale then return {'stale', last} end
end

local i = 5
while i <= #ARGV do
  local op, kind, bit, packed = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3]
  if op == 'C' then
    clear_slot(slot)
  else
    local key = P .. 'b:' .. kind
    local own = P .. 'own:' .. slot .. ':' .. kind
    for j = 1, #packed, 8 do
      local h = string.sub(packed, j, j + 7)
      if op == 'S' then
        add_member(key, h, slot, bit)
        redis.call('SADD', own, h)
      elseif remove_member(key, h, slot, bit) then
        redis.call('SREM', own, h)
      end
    end
  end
  i = i + 4
end
if resets then redis.call('HSET', ik, 'stale', '0') end
return {'ok', seq}
