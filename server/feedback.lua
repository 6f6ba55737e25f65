-- Append a validated batch of feedback events atomically.
-- ARGV: prefix, history size, this call's token, event count, about how many events the stream
-- keeps (0: all), then per event:
--   user_id, item_id, type, value, request_id, event_id, timestamp, positive ("1"/"0"),
--   how long its event id is remembered (seconds, 0 = forever).
-- Returns {-1, {indexes of unknown items}} and writes nothing when an item is unknown,
-- {-2, {index of an event, what is wrong}} and writes nothing when stored data that event writes
-- to or compares with cannot be (a key of another type, a rating sum that is no number),
-- otherwise {0, flags}: flags has one character per event, "1" stored, "0" a duplicate.
local prefix, cap, token, n = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local maxlen = tonumber(ARGV[5])
local head, width = 5, 9

local unknown = {}
for i = 0, n - 1 do
  if redis.call('SISMEMBER', prefix .. ':items', ARGV[head + i * width + 2]) == 0 then
    unknown[#unknown + 1] = i
  end
end
if #unknown > 0 then
  return {-1, unknown}
end

-- Stored data the events write to or compare with is checked before anything is written: a key
-- of another type, or a rating sum that is no number (written by hand or by another program),
-- would stop the script half way, the event in the log and its id claimed but the rest never
-- written, and a retry with that id then a duplicate. Reads only, so there is nothing to undo.
local function finite(x)
  return x == x and x ~= math.huge and x ~= -math.huge
end

-- As HINCRBYFLOAT reads a stored value (shorter than 5120 characters, no spaces, no NaN), and
-- still finite once `by` is added.
local function addable(stored, by)
  local number = #stored < 5120 and not stored:find('%s') and tonumber(stored)
  return number and finite(number + by)
end

-- As HINCRBY reads a stored value: digits after an optional '-', no leading zero, far from
-- overflowing.
local function integral(stored)
  return stored == '0' or (#stored <= 18 and stored:match('^%-?[1-9]%d*$') ~= nil)
end

local function comparable(stored)
  return tonumber(stored) ~= nil
end

-- The keys an event writes below, each with the type it must have (a missing key is created so).
local function written(user, event_id, kind, value, positive)
  local own, keys = prefix .. ':user:' .. user, {}
  local function add(key, want)
    keys[#keys + 1] = {key, want}
  end
  add(prefix .. ':events', 'stream')
  add(prefix .. ':users', 'set')
  if event_id ~= '' then
    add(prefix .. ':eventid:' .. user .. ':' .. event_id, 'string')
  end
  if positive == '1' then
    add(own .. ':hist', 'zset')
    add(own .. ':hist:ties', 'zset')
    add(own .. ':seen', 'set')
    add(prefix .. ':pop', 'zset')
  end
  if kind == 'rating' and value ~= '' then
    add(own .. ':rated', 'zset')
    add(own .. ':rated:ties', 'zset')
    add(own .. ':rated_at', 'hash')
    add(own .. ':ratings', 'hash')
    add(prefix .. ':ratings:sum', 'hash')
    add(prefix .. ':ratings:count', 'hash')
    add(prefix .. ':ratings:total', 'hash')
  end
  return keys
end

-- Keys shared by many events (the log, popularity) are looked at once.
local typed = {}
local function mistyped(key, want)
  if typed[key] then
    return nil
  end
  local found = redis.call('TYPE', key)['ok']
  if found ~= 'none' and found ~= want then
    return key .. ' is a ' .. found .. ', not a ' .. want
  end
  typed[key] = true
end

-- The stored numbers a rating adds to (HINCRBYFLOAT, HINCRBY) and the time it is compared with.
local function unreadable_stats(user, item, value)
  local by, total = tonumber(value), prefix .. ':ratings:total'
  local fields = {
    {prefix .. ':ratings:sum', item, addable, 'a sum'},
    {prefix .. ':ratings:count', item, integral, 'a count'},
    {total, 'sum', addable, 'a sum'},
    {total, 'count', integral, 'a count'},
    {prefix .. ':user:' .. user .. ':rated_at', item, comparable, 'a time'},
  }
  for _, f in ipairs(fields) do
    local stored = redis.call('HGET', f[1], f[2])
    if stored and not f[3](stored, by) then
      return f[1] .. ' field ' .. f[2] .. ' is not ' .. f[4]
    end
  end
end

-- What is wrong with the stored data event `b` (its first argument's index) needs, or nil.
-- Types first: a hash of another type cannot be read for its numbers.
local function unreadable(b)
  local user, item, kind, value = ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4]
  for _, key in ipairs(written(user, ARGV[b + 6], kind, value, ARGV[b + 8])) do
    local wrong = mistyped(key[1], key[2])
    if wrong then
      return wrong
    end
  end
  if kind == 'rating' and value ~= '' then
    return unreadable_stats(user, item, value)
  end
end

for i = 0, n - 1 do
  local wrong = unreadable(head + i * width)
  if wrong then
    return {-2, {i, wrong}}
  end
end

-- Whether an event id is 'new' to its user, a 'duplicate', or already 'stored' by this very call:
-- a client whose reply was lost (the connection dropped) sends the same call, token and all, again.
-- The marker holds the event's place in the call too, so that an id twice in one batch stays a
-- duplicate.
local function claim(marker, mine, ttl)
  local taken
  if ttl > 0 then
    taken = redis.call('SET', marker, mine, 'NX', 'EX', ttl)
  else
    taken = redis.call('SET', marker, mine, 'NX')
  end
  if taken then
    return 'new'
  end
  return redis.call('GET', marker) == mine and 'stored' or 'duplicate'
end

-- Time-ordered sets: events at one time keep the order they arrive in (EVAL.md's tie rule, and
-- the order training reads from the event log), where Redis would order them by item id. The
-- first event at a time is scored with the time as sent, so that it reads back as sent; each
-- later one at exactly that time a microsecond after the last one numbered there (not after as
-- many as there are: an item that moved up or trimming leaves gaps). Events a moment apart are no
-- ties. `<key>:ties` keeps, per time as sent, the last score numbered there: past a thousand ties
-- at one time (a day imported with one date) they run past the millisecond, trimming removes the
-- first ones, and other times come in between, yet the next one must still come last.
-- %.17g keeps the microseconds that Lua's default format would round away.
--
-- A time leaves `:ties` once none of the scores it numbered is left in the set, so that `:ties`
-- stays about as large as the set: `forget` when an item moved up from `score`, `trim` when the
-- oldest items went.
local function forget(key, score)
  local ties = key .. ':ties'
  local tie = redis.call('ZRANGEBYSCORE', ties, score, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  if #tie > 0 and redis.call('ZCOUNT', key, tie[1], tie[2]) == 0 then
    redis.call('ZREM', ties, tie[1])
  end
end

local function place(key, ts, item)
  local ties = key .. ':ties'
  local last = redis.call('ZSCORE', ties, ts)
  local score = last and string.format('%.17g', tonumber(last) + 0.000001) or ts
  local old = redis.call('ZSCORE', key, item)
  if redis.call('ZADD', key, 'GT', 'CH', score, item) == 1 then
    redis.call('ZADD', ties, score, ts)
    if old then
      forget(key, old)
    end
  end
end

local function trim(key)
  -- Times below the oldest item left can only come from items just trimmed: looked for then.
  if redis.call('ZREMRANGEBYRANK', key, 0, -(cap + 1)) == 0 then
    return
  end
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if #first > 0 then
    redis.call('ZREMRANGEBYSCORE', key .. ':ties', '-inf', '(' .. first[2])
  end
end

local flags = {}
for i = 0, n - 1 do
  local b = head + i * width
  local user, item, kind, value = ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4]
  local request_id, event_id, ts, positive = ARGV[b + 5], ARGV[b + 6], ARGV[b + 7], ARGV[b + 8]
  local ttl = tonumber(ARGV[b + 9])
  local state = 'new'
  if event_id ~= '' then
    -- Ids remembered forever (a load) may have markers of the form before ids were per user,
    -- `evid:{event_id}`: a data set loaded then and loaded again is not stored twice. Looked at
    -- first, so that a retried call answers as its first try did.
    if ttl == 0 and redis.call('EXISTS', prefix .. ':evid:' .. event_id) == 1 then
      state = 'duplicate'
    else
      -- Per user (user ids hold no ':'), under a name of its own: `evid:` keys are the old form.
      state = claim(prefix .. ':eventid:' .. user .. ':' .. event_id, token .. ':' .. i, ttl)
    end
  end
  flags[#flags + 1] = state == 'duplicate' and '0' or '1'
  if state == 'new' then
    local entry = {'*', 'user_id', user, 'item_id', item, 'type', kind, 'value', value,
      'request_id', request_id, 'event_id', event_id, 'ts', ts}
    if maxlen > 0 then  -- '~': only whole nodes are trimmed, which is cheap
      redis.call('XADD', prefix .. ':events', 'MAXLEN', '~', maxlen, unpack(entry))
    else
      redis.call('XADD', prefix .. ':events', unpack(entry))
    end
    redis.call('SADD', prefix .. ':users', user)
    if positive == '1' then
      local hist = prefix .. ':user:' .. user .. ':hist'
      place(hist, ts, item)
      trim(hist)
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
        place(rated, ts, item)
        redis.call('HSET', rated_at, item, ts)
        redis.call('HSET', prefix .. ':user:' .. user .. ':ratings', item, value)
      end
      trim(rated)
      redis.call('HINCRBYFLOAT', prefix .. ':ratings:sum', item, value)
      redis.call('HINCRBY', prefix .. ':ratings:count', item, 1)
      redis.call('HINCRBYFLOAT', prefix .. ':ratings:total', 'sum', value)
      redis.call('HINCRBY', prefix .. ':ratings:total', 'count', 1)
    end
  end
end
return {0, table.concat(flags)}
