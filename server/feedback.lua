-- Append a validated batch of feedback events atomically.
-- ARGV: prefix, history size, event count, then per event:
--   user_id, item_id, type, value, request_id, event_id, timestamp, positive ("1"/"0"),
--   how long its event id is remembered (seconds, 0 = forever).
-- Returns {-1, {indexes of unknown items}} and writes nothing when an item is unknown,
-- otherwise {0, flags}: flags has one character per event, "1" stored, "0" a duplicate.
local prefix, cap, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local width = 9

local unknown = {}
for i = 0, n - 1 do
  if redis.call('SISMEMBER', prefix .. ':items', ARGV[3 + i * width + 2]) == 0 then
    unknown[#unknown + 1] = i
  end
end
if #unknown > 0 then
  return {-1, unknown}
end

-- The score of an event at `ts` in a time-ordered set: events at one time keep the order they
-- arrive in (EVAL.md's tie rule, and the order training reads from the event log), each a
-- microsecond after the last one there (not after as many as there are: an item that moved up
-- or trimming leaves gaps); Redis would order them by item id. The last tie numbered is kept
-- beside the set (`<key>:tie`): past a thousand ties at one time (a day imported with one date)
-- they leave the millisecond looked in, and trimming removes the first ones, yet the next one
-- must still come last. %.17g keeps the microseconds that Lua's default format would round away.
local function arrival(key, ts)
  local cursor = key .. ':tie'
  local previous = redis.call('HMGET', cursor, 'ts', 'at')
  local at
  if previous[1] == ts then
    at = tonumber(previous[2]) + 0.000001
  else
    local t = tonumber(ts)
    local last = redis.call('ZREVRANGEBYSCORE', key, '(' .. string.format('%.17g', t + 0.001),
      string.format('%.17g', t), 'WITHSCORES', 'LIMIT', 0, 1)
    at = #last == 0 and t or tonumber(last[2]) + 0.000001
  end
  local score = string.format('%.17g', at)
  redis.call('HSET', cursor, 'ts', ts, 'at', score)
  return score
end

local flags = {}
for i = 0, n - 1 do
  local b = 3 + i * width
  local user, item, kind, value = ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4]
  local request_id, event_id, ts, positive = ARGV[b + 5], ARGV[b + 6], ARGV[b + 7], ARGV[b + 8]
  local ttl = tonumber(ARGV[b + 9])
  local fresh = true
  if event_id ~= '' then
    local marker = prefix .. ':evid:' .. event_id
    if ttl > 0 then
      fresh = redis.call('SET', marker, '1', 'NX', 'EX', ttl) ~= false
    else
      fresh = redis.call('SET', marker, '1', 'NX') ~= false
    end
  end
  if fresh then
    flags[#flags + 1] = '1'
    redis.call('XADD', prefix .. ':events', '*', 'user_id', user, 'item_id', item, 'type', kind,
      'value', value, 'request_id', request_id, 'event_id', event_id, 'ts', ts)
    redis.call('SADD', prefix .. ':users', user)
    if positive == '1' then
      local hist = prefix .. ':user:' .. user .. ':hist'
      redis.call('ZADD', hist, 'GT', arrival(hist, ts), item)
      redis.call('ZREMRANGEBYRANK', hist, 0, -(cap + 1))
      redis.call('SADD', prefix .. ':user:' .. user .. ':seen', item)
      redis.call('ZINCRBY', prefix .. ':pop', 1, item)
    end
    if kind == 'rating' and value ~= '' then
      -- The user's latest rating of each item (the newest `cap` in time order, for prompts) and
      -- running sums for the means the rating task shows and its fallback predicts from. When
      -- each rating was made is kept for every item (rated_at): an older rating arriving late
      -- must not replace a newer one that `rated` has already trimmed.
      local rated = prefix .. ':user:' .. user .. ':rated'
      local rated_at = prefix .. ':user:' .. user .. ':rated_at'
      local last = redis.call('HGET', rated_at, item) or redis.call('ZSCORE', rated, item)
      if (not last) or tonumber(ts) >= tonumber(last) then
        redis.call('ZADD', rated, arrival(rated, ts), item)
        redis.call('HSET', rated_at, item, ts)
        redis.call('HSET', prefix .. ':user:' .. user .. ':ratings', item, value)
      end
      redis.call('ZREMRANGEBYRANK', rated, 0, -(cap + 1))
      redis.call('HINCRBYFLOAT', prefix .. ':ratings:sum', item, value)
      redis.call('HINCRBY', prefix .. ':ratings:count', item, 1)
      redis.call('HINCRBYFLOAT', prefix .. ':ratings:total', 'sum', value)
      redis.call('HINCRBY', prefix .. ':ratings:total', 'count', 1)
    end
  else
    flags[#flags + 1] = '0'
  end
end
return {0, table.concat(flags)}
