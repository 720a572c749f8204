-- Applies a batch of quota operations atomically and in order.
--
-- KEYS: five per bucket, each bucket once per batch however many of its operations it carries:
--       the usage counter; the lease set (a sorted set whose score is the lease expiry in epoch
--       ms and whose member is "<id>:<cost>"); the settled set, which remembers for a day the
--       leases that expired unsettled and the releases applied, so that every settlement can be
--       sent again safely (after a timeout, or an outage); the project's quota overrides (a hash:
--       resource -> limit in quota units); and the bucket's running total of committed units
--       (which lets a reconciliation count the commits that land while it reads the truth).
-- ARGV[1]: now, epoch ms (the caller's clock, so that every store shares one notion of time);
-- ARGV[2]: the operations, a line each (one argument, however many: fewer to encode and decode
--       on both sides), each of nine fields separated by spaces: index of its bucket's first key in KEYS, kind, member,
--       amount, limit, lease expiry ms, key expiry ms (0: the keys never expire; windowed
--       counters expire after their window), scale (store units per quota unit) and the
--       override field ('-': no override applies). A group (kind G, below) is one operation of
--       its own form: "<index> G <id> <lease expiry ms> <n> <bucket>;<bucket>;..." with n
--       buckets of "amount limit key-expiry scale field"; its buckets' keys are consecutive in
--       KEYS from the index, five each. Its settlement is one operation too: "<index> C <id> <n>
--       <amount key-expiry>;..." commits every bucket's lease as c would (C: of several groups, ids
--       joined by commas), F refunds them as f.
-- Kinds: r reserve, G reserve in several buckets, all or nothing (below), C / F commit / refund
--        every bucket of a group, c commit (its member: one lease, or several of the same amount
--        joined by commas; each applied as if sent alone), f refund
--        (with a lease expiry: the give-back of a reservation nobody holds, which takes only that
--        very lease), l release, u usage, s set usage (member: '-', or the commit total read
--        before the true usage was, whose commits since are added), k commit total, m metering
--        check, a add (charge), x seed (raise to at least).
-- Returns a flat array, three entries per operation (per bucket, for a group): flag, usage, the
-- limit applied (an override replaces the caller's limit). An error in one operation does not stop the others (pcall); its
-- flag says what happened, with a message instead of the usage:
--   -1 what sending again cannot mend: a key of ours that is not a number (or a malformed
--      operation);
--   -2 Redis refused a write (OOM, READONLY, MISCONF, NOREPLICAS...): send it again later;
--   -3 a reserve whose member is already someone else's lease (see below): not admitted.
--
-- A refused operation applied nothing. Redis refuses a script's write for its own state (out of
-- memory, a read-only replica, a failed save) only while the script has written nothing yet: once
-- it wrote, it is never stopped midway. So an operation refused that way failed at its first
-- write, before it changed anything, and a later operation can only be refused the same way.
-- Each operation also checks the counters it writes before it changes anything (a reserve takes
-- its lease back), so a corrupt counter fails it unchanged too. (The one exception: a commit takes
-- its lease before it adds to the commit total; a corrupt total, which only reconciliations read,
-- then misses that commit.)
--
-- A group holds the buckets one request charges; each bucket's lease member is "<id>:<amount>".
-- Each is reserved as r would; if any is refused (or fails), those already reserved are taken
-- back within this same operation (so no other caller ever sees them), and all are answered as
-- not admitted: the one that refused with flag 0 (or its failure), the others with flag 4 (held
-- back).
--
-- A reserve sent again (the connection failed before its answer came back) must not count twice,
-- and a reserve whose member some other process drew too (ids duplicated by a fork) must not be
-- admitted for free. Both find their member in the lease set already. The same reservation sent
-- again carries the same lease expiry: it is answered as admitted, with nothing counted again.
-- Another's reservation has its own expiry (the same one only if both were made in the same
-- millisecond with the same lease): flag -3, which the caller turns into a store failure.
local now = tonumber(ARGV[1])
local REMEMBER_MS = 86400000

-- What sending again cannot mend is raised as a table, to tell it from what Redis refused.
local function final(message)
  error({final = message})
end

local function used_of(counter)
  local raw = redis.call('GET', counter)
  if not raw then return 0 end
  local used = tonumber(raw)
  if not used then final('counter ' .. counter .. ' is not a number') end
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
  local used = redis.pcall('INCRBY', counter, amount)
  if type(used) == 'table' then  -- an error reply
    used_of(counter)  -- raises the clear error if the key is not a number, or, if it is, ...
    error(used, 0)    -- ... whatever Redis refused
  end
  expire(counter, at)
  return used
end

-- ``used``: the counter as read before this operation's first write.
local function give_back(counter, used, amount, at)
  if amount <= 0 then return used end
  used = used - amount
  if used < 0 then used = 0 end
  return set_used(counter, used, at)
end

local function lease_cost(member)
  return tonumber(string.match(member, ':(%d+)$')) or 0
end

-- Remember a settled member for a day; forget what is older.
local function remember(settled, member, at)
  local added = redis.call('ZADD', settled, 'NX', now + REMEMBER_MS, member)
  redis.call('ZREMRANGEBYSCORE', settled, '-inf', now)
  redis.call('PEXPIRE', settled, REMEMBER_MS)
  return added
end

-- Leases past their expiry belong to requests that never settled: give their cost back, and
-- remember them, so that a commit arriving late counts its creation again. Returns the usage.
local function purge(counter, leases, settled, at)
  local used = used_of(counter)
  local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now)
  if #expired == 0 then return used end
  local back = 0
  for _, member in ipairs(expired) do
    back = back + lease_cost(member)
    remember(settled, member, at)
  end
  redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
  return give_back(counter, used, back, at)
end

-- An operator's override takes precedence over the limit the source gave (read in the same
-- atomic step, so a change applies to every worker's next decision). Read once per call: a
-- batch often holds several requests of one project.
local override_of = {}
local function effective(overrides, field, scale, limit)
  if field == '-' then return limit end
  local cached = overrides .. ' ' .. field
  local raw = override_of[cached]
  if raw == nil then
    raw = redis.call('HGET', overrides, field)
    override_of[cached] = raw
  end
  if not raw then return limit end
  local value = tonumber(raw)
  if not value then final('quota override ' .. field .. ' is not a number') end
  if value < 0 then return -1 end
  return value * scale
end

local DUPLICATE = -3

-- One lease's commit: 1 if it held its lease (the caller adds its amount to the commit total).
local function commit(counter, leases, settled, commits, member, amount, at)
  if redis.call('ZREM', leases, member) == 1 then return 1 end
  -- The lease expired and its cost was given back, but the creation happened: count it again
  -- (once: a commit sent again finds nothing left to do).
  if redis.call('ZSCORE', settled, member) then
    local used = used_of(counter)
    add(commits, amount, at)
    redis.call('ZREM', settled, member)
    set_used(counter, used + amount, at)
  end
  return 0
end

local function apply(counter, leases, settled, commits, kind, member, amount, limit, lease_until, at)
  if kind == 'r' then
    if redis.call('ZADD', leases, 'NX', lease_until, member) == 0 then
      -- The member holds a lease already: this reservation sent again, or someone else's.
      if tonumber(redis.call('ZSCORE', leases, member)) ~= lease_until then
        return DUPLICATE, 'duplicate reservation id ' .. member
      end
      return 1, used_of(counter)
    end
    expire(leases, at)
    -- Optimistic: count first (most requests fit), undo when over the limit.
    local ok, used = pcall(add, counter, amount, at)
    if not ok then  -- leave no lease behind
      redis.call('ZREM', leases, member)
      error(used, 0)
    end
    if limit >= 0 and used > limit then
      -- Expired leases only matter when they stand between a request and its limit: give them
      -- back then (and on every read of the usage), not on every admission.
      used = purge(counter, leases, settled, at)
      if used > limit then
        redis.call('ZREM', leases, member)
        return 0, give_back(counter, used, amount, at)
      end
    end
    return 1, used
  elseif kind == 'c' then
    -- One lease, or several of the same amount separated by commas (ids never hold one): each
    -- committed as if sent alone, one's failure stopping none of the others (all of them are sent
    -- again, which a commit bears).
    local held, failed = 0, nil
    for one in string.gmatch(member, '[^,]+') do
      local ok, took = pcall(commit, counter, leases, settled, commits, one, amount, at)
      if not ok then failed = failed or took else held = held + took end
    end
    if held > 0 then add(commits, held * amount, at) end  -- one write for them all
    if failed then error(failed, 0) end
    return held > 0 and 1 or 0, 0  -- nobody reads a commit's usage
  elseif kind == 'f' then
    local used = used_of(counter)
    -- A give-back takes only the lease of that very reservation (same expiry), never another's,
    -- and nothing if the reservation never ran: then it leaves nothing behind either.
    if lease_until > 0 and tonumber(redis.call('ZSCORE', leases, member)) ~= lease_until then return 0, used end
    if redis.call('ZREM', leases, member) == 1 then return 1, give_back(counter, used, amount, at) end
    redis.call('ZREM', settled, member)  -- already given back when its lease expired
    return 0, used
  elseif kind == 'l' then
    local used = purge(counter, leases, settled, at)
    -- A release carries an id, so that sending it again gives back only once.
    if member ~= '-' and remember(settled, member, at) == 0 then return 0, used end
    return 1, give_back(counter, used, amount, at)
  elseif kind == 'u' then
    return 1, purge(counter, leases, settled, at)
  elseif kind == 's' then
    purge(counter, leases, settled, at)
    local live = 0
    for _, m in ipairs(redis.call('ZRANGE', leases, 0, -1)) do live = live + lease_cost(m) end
    local since = 0
    if member ~= '-' then since = used_of(commits) - tonumber(member) end
    return 1, set_used(counter, amount + live + since, at)
  elseif kind == 'k' then
    return 1, used_of(commits)
  elseif kind == 'm' then
    local used = used_of(counter)
    if limit >= 0 and used >= limit then used = purge(counter, leases, settled, at) end
    if limit >= 0 and used >= limit then return 0, used end
    return 1, used
  elseif kind == 'a' then
    return 1, add(counter, amount, at)
  elseif kind == 'x' then
    local used = purge(counter, leases, settled, at)
    if used >= amount then return 0, used end
    return 1, set_used(counter, amount, at)
  end
  final('unknown operation ' .. tostring(kind))
end

local out, answered = {}, 0
local function answer(flag, used, limit)
  out[answered + 1], out[answered + 2], out[answered + 3] = flag, used, limit
  answered = answered + 3
end

-- What an error raised inside an operation means: its flag and message.
local function failure(err)
  if type(err) == 'table' then
    -- Ours ({final = ...}), or a refusal redis.call raised as a table ({err = ...}).
    if err.final then return -1, err.final end
    return -2, tostring(err.err)
  end
  return -2, tostring(err)
end

local function run(line)
  local k, kind, member, amount, limit, lease_until, at, scale, field =
    string.match(line, '^(%d+) (%a) (%S*) (%-?%d+) (%-?%d+) (%d+) (%d+) (%d+) (%S+)$')
  if not kind then final('malformed operation ' .. tostring(line)) end
  k = tonumber(k)
  limit = tonumber(limit)
  if kind == 'r' or kind == 'm' then limit = effective(KEYS[k + 3], field, tonumber(scale), limit) end
  local flag, used = apply(KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 4], kind, member,
    tonumber(amount), limit, tonumber(lease_until), tonumber(at))
  answer(flag, used, limit)
end

local HELD_BACK = 4

local function reserve_in(k, member, amount, limit, lease_until, at, scale, field)
  limit = effective(KEYS[k + 3], field, scale, limit)
  local flag, used = apply(KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 4], 'r', member, amount, limit,
    lease_until, at)
  return flag, used, limit
end

-- Take back what a group reserved in one bucket ({flag, used, limit, key index, member, amount,
-- key expiry}): its lease and its count. Returns the usage after.
local function take_back(a)
  local counter = KEYS[a[4]]
  if redis.call('ZREM', KEYS[a[4] + 1], a[5]) == 1 then
    return give_back(counter, used_of(counter), a[6], a[7])
  end
  return a[2]
end

-- A group (see the header): all or nothing, three answers per bucket.
local function reserve_group(k, id, lease_until, count, parts)
  local answers, n, refused = {}, 0, false
  for amount, limit, at, scale, field in string.gmatch(parts, '(%-?%d+) (%-?%d+) (%d+) (%d+) ([^;%s]+)') do
    local base = k + 5 * n
    n = n + 1
    amount = tonumber(amount)
    local member = id .. ':' .. amount
    local ok, flag, used, applied = pcall(reserve_in, base, member, amount, tonumber(limit), lease_until,
      tonumber(at), tonumber(scale), field)
    if not ok then flag, used = failure(flag); applied = 0 end
    if flag ~= 1 then refused = true end
    answers[n] = {flag, used, applied, base, member, amount, tonumber(at)}
  end
  if n ~= count then
    for _ = 1, count do answer(-1, 'malformed group ' .. id, 0) end
    -- What it reserved (a well-formed start) is given back: a malformed group holds nothing.
    for j = 1, n do
      if answers[j][1] == 1 then take_back(answers[j]) end
    end
    return
  end
  for j = 1, n do
    local a = answers[j]
    if refused and a[1] == 1 then
      a[1], a[2] = HELD_BACK, take_back(a)
    end
    answer(a[1], a[2], a[3])
  end
end

-- A group's settlement: each bucket's as c (or f) would, each answered (a failure in one does
-- not stop the others; the whole is sent again, which each bucket's settlement bears). A commit
-- may carry several groups of the same buckets, their ids joined by commas: each bucket commits
-- every group's lease there at once.
local function settle_group(k, kind, id, count, parts)
  local n = 0
  for amount, at in string.gmatch(parts, '(%d+) (%d+)') do
    local base = k + 5 * n
    n = n + 1
    local members = string.gsub(id, '[^,]+', '%0:' .. amount)
    local ok, flag, used = pcall(apply, KEYS[base], KEYS[base + 1], KEYS[base + 2], KEYS[base + 4], kind,
      members, tonumber(amount), 0, 0, tonumber(at))
    if not ok then flag, used = failure(flag) end
    answer(flag, used, 0)
  end
  for _ = n + 1, count do answer(-1, 'malformed group settlement ' .. id, 0) end
end

for line in string.gmatch(ARGV[2] or '', '[^\n]+') do
  local k, kind, rest = string.match(line, '^(%d+) ([GCF]) (.*)$')
  if kind == 'G' then
    local id, lease_until, count, parts = string.match(rest, '^(%S+) (%d+) (%d+) (.*)$')
    reserve_group(tonumber(k), id, tonumber(lease_until), tonumber(count), parts)
  elseif kind then
    local id, count, parts = string.match(rest, '^(%S+) (%d+) (.*)$')
    settle_group(tonumber(k), kind == 'C' and 'c' or 'f', id, tonumber(count), parts)
  else
    local ok, err = pcall(run, line)
    if not ok then
      local flag, message = failure(err)
      answer(flag, message, 0)
    end
  end
end
return out
