-- Longest prefixes per live instance for an ordered list of block hashes.
-- ARGV: prefix, packed hashes (8 bytes each), now (s), hybrid (0/1).
-- Returns a flat list: slot, attn_kv blocks, linear_state blocks, usable blocks, ...
local packed = ARGV[2]
local now = ARGV[3]
local hybrid = ARGV[4] == '1'
local n = #packed / 8
local CHUNK = 512

local live, needle = {}, {}
for _, slot in ipairs(redis.call('ZRANGEBYSCORE', P .. 'alive', now, '+inf')) do
  if redis.call('HGET', P .. 'inst:' .. slot, 'stale') ~= '1' then
    live[slot] = true
    needle[slot] = ',' .. slot .. ':'
  end
end

local function fetch(key, first, last)
  local fields = {}
  for i = first, last do fields[#fields + 1] = string.sub(packed, (i - 1) * 8 + 1, i * 8) end
  return redis.call('HMGET', key, unpack(fields))
end

-- attn_kv: walk forward; the first block names the candidates, each drops at its first miss.
local attn = {}
local running = {}
local nrunning = 0
local i = 1
while i <= n do
  local last = math.min(n, i + CHUNK - 1)
  local values = fetch(P .. 'b:attn', i, last)
  for k = 1, #values do
    local idx = i + k - 1
    local v = values[k]
    if idx == 1 then
      if v then
        for slot in string.gmatch(v, '(%d+):') do
          if live[slot] then running[slot] = true; nrunning = nrunning + 1 end
        end
      end
    elseif v then
      for slot in pairs(running) do
        if not string.find(v, needle[slot], 1, true) then
          attn[slot] = idx - 1; running[slot] = nil; nrunning = nrunning - 1
        end
      end
    else
      for slot in pairs(running) do attn[slot] = idx - 1 end
      running = {}; nrunning = 0
    end
    if nrunning == 0 then break end
  end
  if nrunning == 0 then break end
  i = last + 1
end
for slot in pairs(running) do attn[slot] = n end

-- linear_state: walk backward; record the last checkpoint and the last one within attn_kv.
local lin, usable = {}, {}
local pending = 0
if hybrid then
  for _ in pairs(attn) do pending = pending + 1 end
  local hi = n
  while hi >= 1 and pending > 0 do
    local first = math.max(1, hi - CHUNK + 1)
    local values = fetch(P .. 'b:lin', first, hi)
    for k = #values, 1, -1 do
      local idx = first + k - 1
      local v = values[k]
      if v then
        for slot, a in pairs(attn) do
          if not usable[slot] and string.find(v, needle[slot], 1, true) then
            if not lin[slot] then lin[slot] = idx end
            if idx <= a then usable[slot] = idx; pending = pending - 1 end
          end
        end
      end
      if pending == 0 then break end
    end
    hi = first - 1
  end
end

local out = {}
for slot, a in pairs(attn) do
  local u = a
  if hybrid then u = usable[slot] or 0 end
  out[#out + 1] = tonumber(slot)
  out[#out + 1] = a
  out[#out + 1] = lin[slot] or 0
  out[#out + 1] = u
end
return out
