-- Applies a batch of quota operations atomically and in order.
--
-- KEYS: two per operation: the usage counter, and the lease set (a sorted set whose score is
--       the lease expiry in epoch ms and whose member is "<random id>:<cost>").
-- ARGV[1]: now, epoch ms (the caller's clock, so that every store shares one notion of time);
--       then five per operation: kind, member, cost, limit, lease expiry ms.
-- Kinds: r reserve, c commit, f refund, l release, u usage, s set usage.
-- Returns one {flag, usage} pair per operation; flag -1 carries an error message instead, and
-- an error in one operation does not stop the others (each runs under pcall).
local now = tonumber(ARGV[1])

local function used_of(counter)
  local raw = redis.call('GET', counter)
  if not raw then return 0 end
  local used = tonumber(raw)
  if not used then error('usage counter ' .. counter .. ' is not a number') end
  return used
end

local function give_back(counter, amount)
  if amount <= 0 then return used_of(counter) end
  local used = redis.call('DECRBY', counter, amount)
  if used < 0 then
    redis.call('SET', counter, 0)
    used = 0
  end
  return used
end

-- Leases past their expiry belong to requests that never settled: give their cost back.
local function purge(counter, leases)
  local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now)
  if #expired == 0 then return used_of(counter) end
  local back = 0
  for _, member in ipairs(expired) do
    back = back + (tonumber(string.match(member, ':(%d+)$')) or 0)
  end
  redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
  return give_back(counter, back)
end

local function live_cost(leases)
  local total = 0
  for _, member in ipairs(redis.call('ZRANGE', leases, 0, -1)) do
    total = total + (tonumber(string.match(member, ':(%d+)$')) or 0)
  end
  return total
end

local function apply(counter, leases, kind, member, cost, limit, expires)
  if kind == 'r' then
    local used = purge(counter, leases)
    if limit >= 0 and used + cost > limit then return {0, used} end
    used = redis.call('INCRBY', counter, cost)
    redis.call('ZADD', leases, expires, member)
    return {1, used}
  elseif kind == 'c' then
    if redis.call('ZREM', leases, member) == 1 then return {1, used_of(counter)} end
    -- The lease expired and its cost was given back, but the creation happened: count it again.
    return {0, redis.call('INCRBY', counter, cost)}
  elseif kind == 'f' then
    if redis.call('ZREM', leases, member) == 1 then return {1, give_back(counter, cost)} end
    return {0, used_of(counter)}
  elseif kind == 'l' then
    purge(counter, leases)
    return {1, give_back(counter, cost)}
  elseif kind == 'u' then
    return {1, purge(counter, leases)}
  elseif kind == 's' then
    purge(counter, leases)
    local used = cost + live_cost(leases)
    redis.call('SET', counter, used)
    return {1, used}
  end
  error('unknown operation ' .. tostring(kind))
end

local out = {}
for i = 1, #KEYS / 2 do
  local a = 1 + (i - 1) * 5
  local ok, result = pcall(apply, KEYS[2 * i - 1], KEYS[2 * i], ARGV[a + 1], ARGV[a + 2],
    tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5]))
  if ok then
    out[i] = result
  else
    -- redis.call raises a table {err = ...}; a plain Lua error is a string.
    if type(result) == 'table' then result = result.err end
    out[i] = {-1, tostring(result)}
  end
end
return out
