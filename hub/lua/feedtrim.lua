-- feedtrim: the periodic trim of one ingest shard's feed, which follows the
-- slowest consumer group (a registered sink: docs/sink.md) while groups
-- read it (hub/feedtrim.c). Without groups it only reports: store.lua's
-- MAXLEN ~ feed-stream-maxlen trims the feed as always.
--
-- KEYS[1]  iot:feed:{i<k>}   hub_key_feed
-- ARGV[1]  the dashboards' cut: an entry id such that at least
--          feed-stream-maxlen entries are newer; '' when not known yet
--          (then nothing is trimmed here)
--
-- A group's position is its oldest pending entry, or its last-delivered-id
-- when nothing is pending; the feed is trimmed (XTRIM MINID ~, whole nodes
-- only, so never past the id given) to the oldest of those positions and
-- the dashboards' cut. A group's unread frames: lag (entries added after
-- its last-delivered-id) plus its pending entries; -1 when Redis cannot
-- tell the lag.
--
-- Reply: {groups, length, entries-added, last-generated-id,
--         name of the group with the most unread frames (or ''), its
--         unread frames, entries trimmed now}
-- Errors: none of its own; a key of the wrong type fails the script at
-- XINFO (nothing trimmed).
local key, dcut = KEYS[1], ARGV[1]

if redis.call('EXISTS', key) == 0 then
  return {0, 0, 0, '0-0', '', 0, 0}
end

local function field(flat, name)
  for i = 1, #flat, 2 do
    if flat[i] == name then return flat[i + 1] end
  end
  return nil
end

local function older(a, b) -- a < b as stream ids
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, bms = tonumber(ams), tonumber(bms)
  if ams ~= bms then return ams < bms end
  return tonumber(aseq) < tonumber(bseq)
end

local info = redis.call('XINFO', 'STREAM', key)
local length = field(info, 'length')
local added = field(info, 'entries-added')
local last = field(info, 'last-generated-id')
local groups = redis.call('XINFO', 'GROUPS', key)
local cut, worst, worst_unread = nil, '', 0

for _, g in ipairs(groups) do
  local name, pending = field(g, 'name'), field(g, 'pending')
  local pos, lag = field(g, 'last-delivered-id'), field(g, 'lag')
  if pending > 0 then
    local summary = redis.call('XPENDING', key, name)
    if summary[2] and older(summary[2], pos) then pos = summary[2] end
  end
  if not cut or older(pos, cut) then cut = pos end
  local unread = -1
  if lag then unread = lag + pending end
  if worst == '' or unread < 0 or (worst_unread >= 0 and unread > worst_unread) then
    worst, worst_unread = name, unread
  end
end

local trimmed = 0
if #groups > 0 and dcut ~= '' and string.match(dcut, '^%d+%-%d+$') then
  if older(dcut, cut) then cut = dcut end
  trimmed = redis.call('XTRIM', key, 'MINID', '~', cut)
end
return {#groups, length, added, last, worst, worst_unread, trimmed}
