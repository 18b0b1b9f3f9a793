-- store: stores a batch of telemetry frames of one ingest shard (the frames
-- of one loop turn of a hub whose gateways fall in that shard,
-- hub/registry.c) and publishes their readings live. Every key carries the
-- shard's hash tag {i<k>} (one slot on a Redis Cluster).
--
-- KEYS[1]      iot:feed:{i<k>}             hub_key_feed: the shard's feed
-- then, per frame f in order, 1 + n_f keys:
--   seqs       iot:seqs:{i<k>}:<gateway>   hub_key_seqs: the gateway's window of stored seqs
--   n_f x tm   iot:tm:{i<k>}:<device>      hub_key_tm_shard: each reading's stream, in reading order
-- ARGV[1] seq window (members kept in seqs), ARGV[2] device stream MAXLEN,
-- ARGV[3] feed MAXLEN (0: no feed entry), ARGV[4] number of frames,
-- ARGV[5] the publish command: PUBLISH (one Redis) or SPUBLISH (cluster),
-- ARGV[6] what goes before the feed id in a live message: '' with one
-- shard, '<k>/' with several; then per frame: seq, gateway, lines, n,
-- n x (ts, data), m, m x (channel, from, to), a, a x (i, anomalies): the
-- i-th reading (1-based) of the frame is stored with field 'anom' = that
-- JSON array (docs/anomalies.md). lines holds one line per
-- reading (the feed entry's `readings`); the readings of a device type are
-- lines[from..to] (1-based, inclusive), published on the type's channel
-- (iot:live:raw:<type>, hub_ch_raw, or on a cluster
-- iot:live:{i<k>}:raw:<type>, hub_ch_raw_shard: the shard's slot) behind the
-- frame's feed id.
-- ARGV[7] provenance: 0 (off), or 5: then each reading carries 5 more
-- values after (ts, data): at, n, ph, h, sig (docs/provenance.md), and
-- the last two KEYS are the shard's chain heads iot:ph:{i<k>} (hash: stream
-- key -> "<n> <hex>") and its changed-heads set iot:pd:{i<k>}.
--
-- Reply: one element per frame, in order: {1, feed id} stored ('0-0' without
-- a feed entry), or {0}: the seq was in the gateway's window already (a
-- resend of a durable frame: nothing stored or published), or, with
-- provenance, {2, key, head, ...}: a reading's ph/n does not continue its
-- stream's stored head (another hub wrote it meanwhile); nothing was
-- written, the pairs are the frame's streams and their stored heads ('' for
-- none): the hub recomputes and sends the frame again. A resend within
-- the batch is a duplicate too: frames are stored one after the other.
-- Errors: "ERR store: KEYS and ARGV do not match" (checked before any write);
-- a key of the wrong type fails the script at that command, the frames
-- before it stay stored.
--
-- Per frame: ZADD NX (the dedupe), one XADD per reading and one for the
-- feed, one PUBLISH per device type, TTL (EXPIRE every TTL_EVERY seqs). The
-- window is trimmed only when seq is a multiple of TRIM_EVERY (it holds
-- window..window+TRIM_EVERY seqs): trimming per frame cost more than the
-- rest of the dedupe. With the default window (96) the set holds at most
-- 128 members, Redis's listpack encoding: about 0.7 KB a gateway, where a
-- window of 4,096 was a skiplist of 470 KB. A seq older than the whole window
-- is stored again (at least once). Publishing here, atomically with the
-- XADDs, makes live order equal feed order (docs/dashboard.md).
local TRIM_EVERY, TTL_EVERY, SEQS_TTL_S = 32, 256, 2592000

local window, dmax, fmax = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local frames = tonumber(ARGV[4])
local pub, head = ARGV[5], ARGV[6]
local q = tonumber(ARGV[7])
local w = 2 + (q or 0)       -- values per reading
local pk = (q or 0) > 0 and 2 or 0

-- The shape first: a malformed call writes nothing.
local p, k, seen = 8, 2, 0
for _ = 1, frames or 0 do
  local n = tonumber(ARGV[p + 3])
  local m = n and tonumber(ARGV[p + 4 + w * n])
  local a = m and tonumber(ARGV[p + 5 + w * n + 3 * m])
  if not a then break end
  k = k + 1 + n
  p = p + 6 + w * n + 3 * m + 2 * a
  seen = seen + 1
end
if not (window and fmax) or (q ~= 0 and q ~= 5) or (pub ~= 'PUBLISH' and pub ~= 'SPUBLISH') or seen ~= frames or p ~= #ARGV + 1 or k ~= #KEYS + 1 - pk then
  return redis.error_reply('ERR store: KEYS and ARGV do not match')
end

-- Provenance: does every reading continue its stream's chain? Returns the
-- new heads (stream key -> "<n> <h>") or nil and the stored heads.
local heads, dirty = KEYS[#KEYS - 1], KEYS[#KEYS]
local function chain_check(r, b, t)
  local keys, seen = {}, {}
  for j = t, t + (b - r) / w - 1 do
    if not seen[KEYS[j]] then seen[KEYS[j]] = true; keys[#keys + 1] = KEYS[j] end
  end
  local got = redis.call('HMGET', heads, unpack(keys))
  local stored, cur, bad = {}, {}, false
  for j = 1, #keys do stored[keys[j]] = got[j] or '' end
  for i = r, b - 1, w do
    local sk = KEYS[t]
    local want = cur[sk] or stored[sk]
    local n = tonumber(ARGV[i + 3])
    if (n == 1 and want ~= '') or (n > 1 and want ~= (n - 1) .. ' ' .. ARGV[i + 4]) then bad = true end
    cur[sk] = ARGV[i + 3] .. ' ' .. ARGV[i + 5]
    t = t + 1
  end
  if bad then
    local o = {2}
    for j = 1, #keys do o[#o + 1] = keys[j]; o[#o + 1] = stored[keys[j]] end
    return nil, o
  end
  return cur, keys
end

local out = {}
p, k = 8, 2
for f = 1, frames do
  local key, seq, gw, lines = KEYS[k], ARGV[p], ARGV[p + 1], ARGV[p + 2]
  local n = tonumber(ARGV[p + 3])
  local r = p + 4
  local b = r + w * n
  local t = k + 1
  local g1 = b + 1 + 3 * tonumber(ARGV[b])
  k = t + n
  p = g1 + 1 + 2 * tonumber(ARGV[g1])
  local cur, mismatch, ckeys
  local added = redis.call('ZADD', key, 'NX', seq, seq) == 1
  if added and pk > 0 and n > 0 then
    cur, mismatch = chain_check(r, b, t)
    if cur then ckeys = mismatch; mismatch = nil end
  end
  if not added then
    -- A write even so: a WAIT after this call (ack-durability replicated)
    -- then also covers the first copy's store, which may have been another
    -- connection's (WAIT counts only its own connection's writes).
    redis.call('EXPIRE', key, SEQS_TTL_S)
    out[f] = {0}
  elseif mismatch then
    redis.call('ZREM', key, seq)
    out[f] = mismatch
  else
    local sn = tonumber(seq)
    if sn % TRIM_EVERY == 0 then
      redis.call('ZREMRANGEBYRANK', key, 0, -window - 1)
    end
    local anom, j = nil, g1 + 1
    if j < p then
      anom = {}
      while j < p do anom[tonumber(ARGV[j])] = ARGV[j + 1]; j = j + 2 end
    end
    for i = r, b - 1, w do
      local flags = anom and anom[(i - r) / w + 1]
      if pk > 0 then
        -- the chain fields (docs/provenance.md); 'anom' is derived, not chained
        if flags then
          redis.call('XADD', KEYS[t], 'MAXLEN', '~', dmax, '*',
                     'ts', ARGV[i], 'data', ARGV[i + 1], 'gw', gw, 'seq', seq,
                     'at', ARGV[i + 2], 'n', ARGV[i + 3], 'ph', ARGV[i + 4], 'sig', ARGV[i + 6],
                     'anom', flags)
        else
          redis.call('XADD', KEYS[t], 'MAXLEN', '~', dmax, '*',
                     'ts', ARGV[i], 'data', ARGV[i + 1], 'gw', gw, 'seq', seq,
                     'at', ARGV[i + 2], 'n', ARGV[i + 3], 'ph', ARGV[i + 4], 'sig', ARGV[i + 6])
        end
      elseif flags then
        redis.call('XADD', KEYS[t], 'MAXLEN', '~', dmax, '*',
                   'ts', ARGV[i], 'data', ARGV[i + 1], 'gw', gw, 'seq', seq, 'anom', flags)
      else
        redis.call('XADD', KEYS[t], 'MAXLEN', '~', dmax, '*',
                   'ts', ARGV[i], 'data', ARGV[i + 1], 'gw', gw, 'seq', seq)
      end
      t = t + 1
    end
    if cur then
      local hv = {}
      for j = 1, #ckeys do hv[2 * j - 1] = ckeys[j]; hv[2 * j] = cur[ckeys[j]] end
      redis.call('HSET', heads, unpack(hv))
      redis.call('SADD', dirty, unpack(ckeys))
    end
    local id = '0-0'
    if fmax > 0 then
      id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*',
                      'gw', gw, 'seq', seq, 'readings', lines)
    end
    for g = b + 1, g1 - 1, 3 do
      local from, to = tonumber(ARGV[g + 1]), tonumber(ARGV[g + 2])
      redis.call(pub, ARGV[g], head .. id .. '\n' ..
                 ((from == 1 and to == #lines) and lines or string.sub(lines, from, to)))
    end
    if sn % TTL_EVERY == 0 or redis.call('TTL', key) < 0 then
      redis.call('EXPIRE', key, SEQS_TTL_S)
    end
    out[f] = {1, id}
  end
end
return out
