-- Shared helpers (prepended to every script). Block values are strings of member tokens
-- ",<slot>:<tier bits>," (tier bits: device 1, host 2, disk 4); fields are 8-byte hashes.
local P = ARGV[1]

local function token_bits(v, slot)
  if not v then return nil, nil, nil end
  local needle = ',' .. slot .. ':'
  local s = string.find(v, needle, 1, true)
  if not s then return nil, nil, nil end
  local e = string.find(v, ',', s + #needle, true)
  return tonumber(string.sub(v, s + #needle, e - 1)), s, e
end

local function add_member(key, h, slot, bit)
  local v = redis.call('HGET', key, h)
  if not v then
    redis.call('HSET', key, h, ',' .. slot .. ':' .. bit .. ',')
    return
  end
  local bits, s, e = token_bits(v, slot)
  if not bits then
    redis.call('HSET', key, h, v .. slot .. ':' .. bit .. ',')
  elseif bits % (bit * 2) < bit then
    redis.call('HSET', key, h, string.sub(v, 1, s) .. slot .. ':' .. (bits + bit) .. string.sub(v, e))
  end
end

-- Remove tier ``bit`` of ``slot`` (bit 0 = every tier); returns true if no tier is left.
local function remove_member(key, h, slot, bit)
  local v = redis.call('HGET', key, h)
  local bits, s, e = token_bits(v, slot)
  if not bits then return true end
  local left = 0
  if bit ~= 0 and bits % (bit * 2) >= bit then left = bits - bit elseif bit ~= 0 then left = bits end
  local nv
  if left == 0 then
    nv = string.sub(v, 1, s) .. string.sub(v, e + 1)
  else
    nv = string.sub(v, 1, s) .. slot .. ':' .. left .. string.sub(v, e)
  end
  if nv == ',' then redis.call('HDEL', key, h) else redis.call('HSET', key, h, nv) end
  return left == 0
end

-- Drop every block a slot holds, in both state kinds.
local function clear_slot(slot)
  for _, kind in ipairs({'attn', 'lin'}) do
    local own = P .. 'own:' .. slot .. ':' .. kind
    local key = P .. 'b:' .. kind
    for _, h in ipairs(redis.call('SMEMBERS', own)) do remove_member(key, h, slot, 0) end
    redis.call('DEL', own)
  end
end
