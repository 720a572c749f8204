-- Sets a project's quota overrides in one atomic step, so no decision sees a half-written set.
-- KEYS[1]: the overrides hash. ARGV[1]: '1' to replace the whole set, '0' to update it; then
-- pairs of field, value ('' removes the field). Returns how many overrides remain.
if ARGV[1] == '1' then redis.call('DEL', KEYS[1]) end
for i = 2, #ARGV, 2 do
  if ARGV[i + 1] == '' then
    redis.call('HDEL', KEYS[1], ARGV[i])
  else
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return redis.call('HLEN', KEYS[1])
