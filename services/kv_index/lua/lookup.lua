-- Longest prefixes per live instance for an ordered list of block hashes.
-- ARGV: prefix, packed hashes (8 bytes each), now (s), hybrid (0/1).
-- Returns one string "slot,attn_kv,linear_state,usable,slot,..." (one bulk reply parses fast).
-- Consecutive blocks usually have the very same holders string, so a block is only examined
-- when its holders differ from the previous one's (or, going backward, when a new instance
-- becomes eligible): the common case costs one string comparison per block.
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

local fields = {}
for i = 1, n do fields[i] = string.sub(packed, (i - 1) * 8 + 1, i * 8) end

local function fetch(key, first, last)
  return redis.call('HMGET', key, unpack(fields, first, last))
end

-- attn_kv: walk forward; the first block names the candidates, each drops at its first miss.
local attn = {}
local running = {}
local nrunning = 0
local previous = nil
local i = 1
while i <= n and (i == 1 or nrunning > 0) do
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
    elseif v ~= previous then
      for slot in pairs(running) do
        if not v or not string.find(v, needle[slot], 1, true) then
          attn[slot] = idx - 1; running[slot] = nil; nrunning = nrunning - 1
        end
      end
    end
    previous = v
    if nrunning == 0 then break end
  end
  i = last + 1
end
for slot in pairs(running) do attn[slot] = n end

-- linear_state: walk backward; per instance record the last checkpoint (lin) and the last
-- one within its attn_kv prefix (usable). Instances become eligible for usable once the
-- walk is inside their attn_kv prefix.
local lin, usable = {}, {}
local unresolved, order = {}, {}
local pending = 0
if hybrid then
  for slot, a in pairs(attn) do
    unresolved[slot] = true
    pending = pending + 1
    order[#order + 1] = slot
  end
  table.sort(order, function(x, y) return attn[x] > attn[y] end)
  local eligible, next_eligible, changed = {}, 1, true
  previous = nil
  local hi = n
  while hi >= 1 and pending > 0 do
    local first = math.max(1, hi - CHUNK + 1)
    local values = fetch(P .. 'b:lin', first, hi)
    for k = #values, 1, -1 do
      local idx = first + k - 1
      while next_eligible <= #order and attn[order[next_eligible]] >= idx do
        eligible[order[next_eligible]] = true
        next_eligible = next_eligible + 1
        changed = true
      end
      local v = values[k]
      if v and (changed or v ~= previous) then
        for slot in pairs(unresolved) do
          if string.find(v, needle[slot], 1, true) then
            if not lin[slot] then lin[slot] = idx end
            if eligible[slot] then
              usable[slot] = idx; unresolved[slot] = nil; pending = pending - 1
            end
          end
        end
        previous = v
        changed = false
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
  out[#out + 1] = slot .. ',' .. a .. ',' .. (lin[slot] or 0) .. ',' .. u
end
return table.concat(out, ',')
