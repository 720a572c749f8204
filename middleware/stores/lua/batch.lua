-- Applies a batch of quota operations atomically and in order.
--
-- KEYS: two per operation: the usage counter, and the lease set (a sorted set whose score is
--       the lease expiry in epoch ms and whose member is "<random id>:<cost>").
-- ARGV[1]: now, epoch ms (the caller's clock, so that every store shares one notion of time);
--       then one per operation, six fields separated by spaces (packed: fewer arguments to
--       encode and decode on both sides): kind, member, amount, limit, lease expiry ms,
--       key expiry ms (0: the keys never expire; windowed counters expire after their window).
-- Kinds: r reserve, c commit, f refund, l release, u usage, s set usage,
--        m metering check, a add (charge), x seed (raise to at least).
-- Returns a flat array, two entries per operation: flag, usage. Flag -1 carries an error message
-- instead of the usage, and an error in one operation does not stop the others (pcall).
local now = tonumber(ARGV[1])

local function used_of(counter)
  local raw = redis.call('GET', counter)
  if not raw then return 0 end
  local used = tonumber(raw)
  if not used then error('usage counter ' .. counter .. ' is not a number') end
  return used
end

-- Every write re-applies the window expiry: DECRBY or SET on a missing key would create one
-- that never expires.
local function expire(key, at)
  if at > 0 then redis.call('PEXPIREAT', key, at) end
end

local function set_used(counter, used, at)
  redis.call('SET', counter, used)
  expire(counter, at)
  return used
end

local function add(counter, amount, at)
  local used = redis.call('INCRBY', counter, amount)
  expire(counter, at)
  return used
end

local function give_back(counter, amount, at)
  local used = used_of(counter)
  if amount <= 0 then return used end
  used = used - amount
  if used < 0 then used = 0 end
  return set_used(counter, used, at)
end

local function lease_cost(member)
  return tonumber(string.match(member, ':(%d+)$')) or 0
end

-- Leases past their expiry belong to requests that never settled: give their cost back.
local function purge(counter, leases, at)
  local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now)
  if #expired == 0 then return used_of(counter) end
  local back = 0
  for _, member in ipairs(expired) do back = back + lease_cost(member) end
  redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
  return give_back(counter, back, at)
end

local function apply(counter, leases, kind, member, amount, limit, lease_until, at)
  if kind == 'r' then
    local used = purge(counter, leases, at)
    if limit >= 0 and used + amount > limit then return {0, used} end
    used = add(counter, amount, at)
    redis.call('ZADD', leases, lease_until, member)
    expire(leases, at)
    return {1, used}
  elseif kind == 'c' then
    if redis.call('ZREM', leases, member) == 1 then return {1, used_of(counter)} end
    -- The lease expired and its cost was given back, but the creation happened: count it again.
    return {0, add(counter, amount, at)}
  elseif kind == 'f' then
    if redis.call('ZREM', leases, member) == 1 then return {1, give_back(counter, amount, at)} end
    return {0, used_of(counter)}
  elseif kind == 'l' then
    purge(counter, leases, at)
    return {1, give_back(counter, amount, at)}
  elseif kind == 'u' then
    return {1, purge(counter, leases, at)}
  elseif kind == 's' then
    purge(counter, leases, at)
    local live = 0
    for _, m in ipairs(redis.call('ZRANGE', leases, 0, -1)) do live = live + lease_cost(m) end
    return {1, set_used(counter, amount + live, at)}
  elseif kind == 'm' then
    local used = purge(counter, leases, at)
    if limit >= 0 and used >= limit then return {0, used} end
    return {1, used}
  elseif kind == 'a' then
    return {1, add(counter, amount, at)}
  elseif kind == 'x' then
    local used = purge(counter, leases, at)
    if used >= amount then return {0, used} end
    return {1, set_used(counter, amount, at)}
  end
  error('unknown operation ' .. tostring(kind))
end

local out = {}
for i = 1, #KEYS / 2 do
  local kind, member, amount, limit, lease_until, at =
    string.match(ARGV[i + 1], '^(%a) (%S*) (%-?%d+) (%-?%d+) (%d+) (%d+)$')
  local ok, result
  if not kind then
    ok, result = false, 'malformed operation ' .. tostring(ARGV[i + 1])
  else
    ok, result = pcall(apply, KEYS[2 * i - 1], KEYS[2 * i], kind, member, tonumber(amount), tonumber(limit),
      tonumber(lease_until), tonumber(at))
  end
  if ok then
    out[2 * i - 1], out[2 * i] = result[1], result[2]
  else
    -- redis.call raises a table {err = ...}; a plain Lua error is a string.
    if type(result) == 'table' then result = result.err end
    out[2 * i - 1], out[2 * i] = -1, tostring(result)
  end
end
return out
