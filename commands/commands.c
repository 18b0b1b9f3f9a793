#include "commands/commands.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <jansson.h>
#include <libwebsockets.h>
#include <openssl/rand.h>

#include "hub/events.h"
#include "hub/hub.h"
#include "hub/keys.h"
#include "hub/log.h"
#include "hub/module.h"
#include "hub/redis.h"
#include "hub/util.h"
#include "hub/link.h"
#include "protocols/gw_codec.h"

#define SWEEP_US       (1000 * 1000)
#define SWEEP_BATCH    "256"
#define CMD_HISTORY_MAX_S "100"   /* docs/commands.md */

/* ---- the scripts -----------------------------------------------------------
 * Every script gets the current time as ARGV[1] and shares this prelude:
 * load a command, append a history entry, publish a status event on the
 * dashboard `commands` stream (docs/dashboard.md line framing), and `set`,
 * the one way a state changes (final states leave the timers and the
 * device's queue, and expire after 30 days). Key names come from hub/keys.h.
 * A history keeps CMD_HISTORY_MAX entries: past that, the oldest after the
 * first (`queued`) goes, so the newest transitions and the final state are
 * always there. Acks that change nothing are not history: they only bump
 * `ignored_acks` and overwrite `last_ignored_ack` (nothing grows). */
#define PRELUDE HUB_LUA_KEYS \
	"local now = tonumber(ARGV[1])\n" \
	"local FINAL = {succeeded=true, failed=true, rejected=true, timed_out=true, expired=true, canceled=true}\n" \
	"local function load(id)\n" \
	"  local a = redis.call('HGETALL', kcmd(id))\n" \
	"  if #a == 0 then return nil end\n" \
	"  local c = {}\n" \
	"  for i = 1, #a, 2 do c[a[i]] = a[i + 1] end\n" \
	"  return c\n" \
	"end\n" \
	"local function hist(c, entry)\n" \
	"  local k = kcmdhist(c.id)\n" \
	"  if redis.call('RPUSH', k, entry) > " CMD_HISTORY_MAX_S " then\n" \
	"    redis.call('LSET', k, 1, '')\n" \
	"    redis.call('LREM', k, 1, '')\n" \
	"  end\n" \
	"end\n" \
	"local function event(c, status, extra)\n" \
	"  local d = redis.call('HMGET', kdev(c.device), 'type', 'labels')\n" \
	"  local body = '\"id\":' .. cjson.encode(c.id) .. ',\"device\":' .. cjson.encode(c.device) ..\n" \
	"    ',\"name\":' .. cjson.encode(c.name) .. ',\"status\":\"' .. status .. '\",\"at\":' .. now ..\n" \
	"    ',\"attempt\":' .. (c.attempt or '0') .. (extra or '')\n" \
	"  redis.call('PUBLISH', CH_COMMANDS, '\\n' .. c.device .. '\\t' .. (d[1] or c.type) ..\n" \
	"    '\\t' .. (d[2] or '{}') .. '\\t' .. body .. '\\n')\n" \
	"end\n" \
	"local function set(c, status, fields, extra)\n" \
	"  c.status = status\n" \
	"  if not extra and fields then\n" \
	"    for i = 1, #fields - 1, 2 do\n" \
	"      if fields[i] == 'error' then extra = ',\"error\":' .. cjson.encode(fields[i + 1]) end\n" \
	"    end\n" \
	"  end\n" \
	"  local key = kcmd(c.id)\n" \
	"  redis.call('HSET', key, 'status', status, 'updated_at', now)\n" \
	"  if fields and #fields > 0 then redis.call('HSET', key, unpack(fields)) end\n" \
	"  local a = ''\n" \
	"  if status == 'sent' then a = ',\"attempt\":' .. c.attempt end\n" \
	"  hist(c, '{\"status\":\"' .. status .. '\",\"at\":' .. now .. a .. (extra or '') .. '}')\n" \
	"  event(c, status, extra)\n" \
	"  if FINAL[status] then\n" \
	"    redis.call('ZREM', K_TIMERS, c.id)\n" \
	"    redis.call('ZREM', kcmds(c.device), c.id)\n" \
	"    redis.call('EXPIRE', key, 2592000)\n" \
	"    redis.call('EXPIRE', kcmdhist(c.id), 2592000)\n" \
	"  end\n" \
	"end\n"

/* ARGV: now, id, device, type, name, params, ack_timeout_s, timeout_s, ttl_s,
 * max_attempts, idempotency key (''), owner, rollout ('').
 * -> {1, id, expires_at, instance, online} | {0, first id} | {-1} */
static const char create_lua[] = PRELUDE
	"local id, dev = ARGV[2], ARGV[3]\n"
	"local d = redis.call('HMGET', kdev(dev), 'type', 'instance', 'online')\n"
	"if not d[1] then return {-1} end\n"
	"if ARGV[11] ~= '' then\n"
	"  local k = kidem(ARGV[12], ARGV[11])\n"
	"  local first = redis.call('GET', k)\n"
	"  if first then return {0, first} end\n"
	"  redis.call('SET', k, id, 'EX', 86400)\n"
	"end\n"
	"local exp = now + tonumber(ARGV[9]) * 1000\n"
	"redis.call('HSET', kcmd(id), 'id', id, 'device', dev, 'type', ARGV[4], 'name', ARGV[5],\n"
	"  'params', ARGV[6], 'status', 'queued', 'attempt', 0, 'max_attempts', ARGV[10],\n"
	"  'ack_timeout_s', ARGV[7], 'timeout_s', ARGV[8], 'ttl_s', ARGV[9], 'created_at', now,\n"
	"  'updated_at', now, 'expires_at', exp, 'owner', ARGV[12], 'rollout', ARGV[13])\n"
	"local seq = redis.call('INCR', K_CMDSEQ)\n"
	"redis.call('ZADD', kcmds(dev), seq, id)\n"
	"redis.call('ZADD', kcmdlog(dev), seq, id)\n"
	"redis.call('ZREMRANGEBYRANK', kcmdlog(dev), 0, -1001)\n"
	"redis.call('ZADD', K_TIMERS, exp, id)\n"
	"local c = {id = id, device = dev, type = ARGV[4], name = ARGV[5], attempt = '0'}\n"
	"hist(c, '{\"status\":\"queued\",\"at\":' .. now .. '}')\n"
	"event(c, 'queued')\n"
	"return {1, id, exp, d[2] or '', d[3] or '0'}\n";

/* ARGV: now, id, conn. Sends (or resends) to the connection that owns the
 * device right now. -> {1, device, name, params, attempt, expires_at, next
 * deadline} | {0, why} */
static const char send_lua[] = PRELUDE
	"local c = load(ARGV[2])\n"
	"if not c then return {0, 'unknown'} end\n"
	"if c.status ~= 'queued' and c.status ~= 'sent' then return {0, c.status} end\n"
	"if c.held == '1' then return {0, 'held'} end\n"
	"if c.status == 'queued' and now >= tonumber(c.expires_at) then\n"
	"  set(c, 'expired', {'error', 'ttl passed before the command could be sent'})\n"
	"  return {0, 'expired'}\n"
	"end\n"
	"local d = redis.call('HMGET', kdev(c.device), 'conn', 'online')\n"
	"if d[1] ~= ARGV[3] or d[2] ~= '1' then return {0, 'not_owner'} end\n"
	"if c.status == 'sent' then\n"
	"  if c.sent_conn == ARGV[3] and now < tonumber(c.ack_due) then return {0, 'not_due'} end\n"
	"  if now >= tonumber(c.deadline) then\n"
	"    set(c, 'timed_out', {'error', 'no final state within timeout_s'})\n"
	"    return {0, 'timed_out'}\n"
	"  end\n"
	"end\n"
	"if c.status == 'sent' and tonumber(c.attempt) >= tonumber(c.max_attempts) and\n"
	"   now < tonumber(c.ack_due) then\n"
	"  return {0, 'not_due'} -- the last attempt still has its ack_timeout_s\n"
	"end\n"
	"local attempt = tonumber(c.attempt) + 1\n"
	"if attempt > tonumber(c.max_attempts) then\n"
	"  set(c, 'timed_out', {'error', 'no received after max_attempts sends'})\n"
	"  return {0, 'timed_out'}\n"
	"end\n"
	"c.attempt = tostring(attempt)\n"
	"local deadline = tonumber(c.deadline or (now + tonumber(c.timeout_s) * 1000))\n"
	"local due = now + tonumber(c.ack_timeout_s) * 1000\n"
	"redis.call('HSET', kcmd(c.id), 'attempt', attempt, 'sent_at', c.sent_at or now,\n"
	"  'last_sent_at', now, 'sent_conn', ARGV[3], 'ack_due', due, 'deadline', deadline)\n"
	"local nxt = math.min(due, deadline)\n"
	"redis.call('ZADD', K_TIMERS, nxt, c.id)\n"
	"set(c, 'sent')\n"
	"return {1, c.device, c.name, c.params, attempt, c.expires_at, nxt}\n";

/* ARGV: now, id, conn, status, progress (''), message (''), result JSON (''),
 * error (''). -> {1, status} applied | {0, current} no change | {-1} not a
 * command of a device this connection owns. */
static const char ack_lua[] = PRELUDE
	"local c = load(ARGV[2])\n"
	"if not c then return {-1} end\n"
	"if redis.call('HGET', kdev(c.device), 'conn') ~= ARGV[3] then return {-1} end\n"
	"local st = ARGV[4]\n"
	"local rank = {sent = 1, received = 2, in_progress = 3}\n"
	"local cur = rank[c.status]\n"
	"local ok = cur ~= nil and (st ~= 'received' or cur == 1)\n"
	"local extra, f = '', {}\n"
	"if ARGV[5] ~= '' then extra = extra .. ',\"progress\":' .. ARGV[5]; f[#f + 1] = 'progress'; f[#f + 1] = ARGV[5] end\n"
	"if ARGV[6] ~= '' then extra = extra .. ',\"message\":' .. cjson.encode(ARGV[6]); f[#f + 1] = 'message'; f[#f + 1] = ARGV[6] end\n"
	"if ARGV[7] ~= '' then extra = extra .. ',\"result\":' .. ARGV[7]; f[#f + 1] = 'result'; f[#f + 1] = ARGV[7] end\n"
	"if ARGV[8] ~= '' then extra = extra .. ',\"error\":' .. cjson.encode(ARGV[8]); f[#f + 1] = 'error'; f[#f + 1] = ARGV[8] end\n"
	"if not ok then\n"
	"  redis.call('HINCRBY', kcmd(c.id), 'ignored_acks', 1)\n"
	"  redis.call('HSET', kcmd(c.id), 'last_ignored_ack', '{\"status\":\"' .. st .. '\",\"at\":' .. now .. '}')\n"
	"  return {0, c.status}\n"
	"end\n"
	"if not FINAL[st] then redis.call('ZADD', K_TIMERS, c.deadline, c.id) end\n"
	"set(c, st, f, extra)\n"
	"return {1, st}\n";

/* ARGV: now, id. -> {1, previous status, device} | {0, status} | {-1} */
static const char cancel_lua[] = PRELUDE
	"local c = load(ARGV[2])\n"
	"if not c then return {-1} end\n"
	"if FINAL[c.status] then return {0, c.status} end\n"
	"local was = c.status\n"
	"set(c, 'canceled')\n"
	"if was ~= 'queued' then redis.call('SADD', kcancels(c.device), c.id) end\n"
	"return {1, was, c.device}\n";

/* ARGV: now, id. A deadline came (or the sweep found it overdue).
 * -> {0, next deadline} | {1, new state} | {2, device, instance, online,
 * next deadline}: the ack timeout passed and attempts remain: resend. */
static const char tick_lua[] = PRELUDE
	"local c = load(ARGV[2])\n"
	"if not c or FINAL[c.status] then redis.call('ZREM', K_TIMERS, ARGV[2]); return {0, 0} end\n"
	"if c.status == 'queued' then\n"
	"  if now >= tonumber(c.expires_at) then\n"
	"    set(c, 'expired', {'error', 'ttl passed before the command could be sent'})\n"
	"    return {1, 'expired'}\n"
	"  end\n"
	"  redis.call('ZADD', K_TIMERS, c.expires_at, c.id)\n"
	"  return {0, tonumber(c.expires_at)}\n"
	"end\n"
	"local deadline = tonumber(c.deadline)\n"
	"if now >= deadline then\n"
	"  set(c, 'timed_out', {'error', 'no final state within timeout_s'})\n"
	"  return {1, 'timed_out'}\n"
	"end\n"
	"if c.status == 'sent' and now >= tonumber(c.ack_due) then\n"
	"  if tonumber(c.attempt) >= tonumber(c.max_attempts) then\n"
	"    set(c, 'timed_out', {'error', 'no received after max_attempts sends'})\n"
	"    return {1, 'timed_out'}\n"
	"  end\n"
	"  redis.call('ZADD', K_TIMERS, deadline, c.id)\n"
	"  local d = redis.call('HMGET', kdev(c.device), 'instance', 'online')\n"
	"  return {2, c.device, d[1] or '', d[2] or '0', deadline}\n"
	"end\n"
	"local nxt = deadline\n"
	"if c.status == 'sent' then nxt = math.min(deadline, tonumber(c.ack_due)) end\n"
	"redis.call('ZADD', K_TIMERS, nxt, c.id)\n"
	"return {0, nxt}\n";

/* ARGV: id -> {hash, log} */
static const char get_lua[] = HUB_LUA_KCMD
	"return {redis.call('HGETALL', kcmd(ARGV[1])),\n"
	"        redis.call('LRANGE', kcmdhist(ARGV[1]), 0, 999)}\n";

/* ARGV: device, status (''), limit -> array of HGETALL arrays, newest first */
static const char list_lua[] = HUB_LUA_KCMDLOG HUB_LUA_KCMD
	"local ids = redis.call('ZREVRANGE', kcmdlog(ARGV[1]), 0, -1)\n"
	"local out, limit = {}, tonumber(ARGV[3])\n"
	"for _, id in ipairs(ids) do\n"
	"  local k = kcmd(id)\n"
	"  if ARGV[2] == '' or redis.call('HGET', k, 'status') == ARGV[2] then\n"
	"    local h = redis.call('HGETALL', k)\n"
	"    if #h > 0 then out[#out + 1] = h end\n"
	"  end\n"
	"  if #out >= limit then break end\n"
	"end\n"
	"return out\n";

/* ---- fleet rollouts ---------------------------------------------------------
 * One command per matching device is created up front, `held` (not in the
 * device's queue, no timers) until the rollout releases it: released at
 * max_per_minute, counting from the rollout's creation (the first at once).
 * When failures (failed, rejected, timed_out, expired) among the finished
 * released commands exceed abort_failure_ratio (once at least min_finished
 * have finished), the held rest become canceled. */

/* ARGV: now, rollout id, type, labels JSON (''), device patterns JSON (''),
 * name, params, ack_timeout_s, timeout_s, ttl_s, max_attempts,
 * max_per_minute, abort_failure_ratio, owner, min_finished -> count */
static const char rollout_create_lua[] = PRELUDE
	"local rid, typ = ARGV[2], ARGV[3]\n"
	"local want = nil\n"
	"if ARGV[4] ~= '' then want = cjson.decode(ARGV[4]) end\n"
	"local pats = nil\n"
	"if ARGV[5] ~= '' then pats = cjson.decode(ARGV[5]) end\n"
	"local function allowed(dev)\n"
	"  if not pats then return true end\n"
	"  for _, p in ipairs(pats) do\n"
	"    if p == '*' or p == dev then return true end\n"
	"    if string.sub(p, -1) == '*' and string.sub(dev, 1, #p - 1) == string.sub(p, 1, -2) then return true end\n"
	"  end\n"
	"  return false\n"
	"end\n"
	"local devs = redis.call('SMEMBERS', ktype(typ))\n"
	"table.sort(devs)\n"
	"local n = 0\n"
	"for _, dev in ipairs(devs) do\n"
	"  local ok = allowed(dev)\n"
	"  if ok and want then\n"
	"    local l = redis.call('HGET', kdev(dev), 'labels')\n"
	"    local have = l and cjson.decode(l) or {}\n"
	"    for k, v in pairs(want) do if have[k] ~= v then ok = false; break end end\n"
	"  end\n"
	"  if ok then\n"
	"    n = n + 1\n"
	"    local id = 'c_' .. string.sub(rid, 3) .. '_' .. n\n"
	"    redis.call('HSET', kcmd(id), 'id', id, 'device', dev, 'type', typ, 'name', ARGV[6],\n"
	"      'params', ARGV[7], 'status', 'queued', 'attempt', 0, 'max_attempts', ARGV[11],\n"
	"      'ack_timeout_s', ARGV[8], 'timeout_s', ARGV[9], 'ttl_s', ARGV[10], 'created_at', now,\n"
	"      'updated_at', now, 'owner', ARGV[14], 'rollout', rid, 'held', 1)\n"
	"    redis.call('RPUSH', krolloutcmds(rid), id)\n"
	"    redis.call('ZADD', kcmdlog(dev), redis.call('INCR', K_CMDSEQ), id)\n"
	"    local c = {id = id, device = dev, type = typ, name = ARGV[6], attempt = '0'}\n"
	"    hist(c, '{\"status\":\"queued\",\"at\":' .. now .. '}')\n"
	"    event(c, 'queued')\n"
	"  end\n"
	"end\n"
	"redis.call('HSET', krollout(rid), 'id', rid, 'device_type', typ, 'labels', ARGV[4],\n"
	"  'name', ARGV[6], 'params', ARGV[7], 'max_per_minute', ARGV[12], 'abort_failure_ratio', ARGV[13],\n"
	"  'min_finished', ARGV[15], 'total', n, 'released', 0, 'status', n > 0 and 'running' or 'completed',\n"
	"  'created_at', now, 'updated_at', now, 'owner', ARGV[14])\n"
	"if n > 0 then redis.call('ZADD', K_ROLLOUTS, now, rid) end\n"
	"return n\n";

/* ARGV: now, rollout id -> {1, (id, device, instance, online, expires_at)...}
 * released now | {0} nothing to do | {2} aborted */
static const char rollout_step_lua[] = PRELUDE
	"local rid = ARGV[2]\n"
	"local rk = krollout(rid)\n"
	"local r = {}\n"
	"local a = redis.call('HGETALL', rk)\n"
	"for i = 1, #a, 2 do r[a[i]] = a[i + 1] end\n"
	"if r.status ~= 'running' then redis.call('ZREM', K_ROLLOUTS, rid); return {0} end\n"
	"local ids = redis.call('LRANGE', krolloutcmds(rid), 0, -1)\n"
	"local released = tonumber(r.released)\n"
	"local fails, finished, open = 0, 0, 0\n"
	"for i = 1, released do\n"
	"  local st = redis.call('HGET', kcmd(ids[i]), 'status')\n"
	"  if st and FINAL[st] then\n"
	"    if st ~= 'canceled' then\n"
	"      finished = finished + 1\n"
	"      if st ~= 'succeeded' then fails = fails + 1 end\n"
	"    end\n"
	"  else open = open + 1 end\n"
	"end\n"
	"if finished >= tonumber(r.min_finished) and finished > 0 and\n"
	"   fails / finished > tonumber(r.abort_failure_ratio) then\n"
	"  for i = released + 1, #ids do\n"
	"    local c = load(ids[i])\n"
	"    if c and c.status == 'queued' then set(c, 'canceled', {'error', 'rollout aborted: failure ratio crossed'}) end\n"
	"  end\n"
	"  redis.call('HSET', rk, 'status', 'aborted', 'updated_at', now)\n"
	"  redis.call('ZREM', K_ROLLOUTS, rid)\n"
	"  redis.call('EXPIRE', rk, 2592000)\n"
	"  redis.call('EXPIRE', krolloutcmds(rid), 2592000)\n"
	"  return {2}\n"
	"end\n"
	"-- The rate: release_clock advances by 60000/max_per_minute per release and\n"
	"-- never lags now by more than a second, so a pause (no hub running, Redis\n"
	"-- down) is not followed by a burst.\n"
	"local gap = 60000 / tonumber(r.max_per_minute)\n"
	"local clock = tonumber(r.release_clock or (tonumber(r.created_at) - gap))\n"
	"if clock < now - 1000 - gap then clock = now - 1000 - gap end\n"
	"local due = math.floor((now - clock) / gap)\n"
	"local upto = math.min(#ids, released + math.max(due, 0))\n"
	"redis.call('HSET', rk, 'release_clock', clock + (upto - released) * gap)\n"
	"local out = {1}\n"
	"for i = released + 1, upto do\n"
	"  local c = load(ids[i])\n"
	"  if c and c.status == 'queued' then\n"
	"    local exp = now + tonumber(c.ttl_s) * 1000\n"
	"    redis.call('HSET', kcmd(c.id), 'held', 0, 'expires_at', exp, 'released_at', now)\n"
	"    redis.call('ZADD', kcmds(c.device), redis.call('INCR', K_CMDSEQ), c.id)\n"
	"    redis.call('ZADD', K_TIMERS, exp, c.id)\n"
	"    local d = redis.call('HMGET', kdev(c.device), 'instance', 'online')\n"
	"    out[#out + 1] = c.id\n"
	"    out[#out + 1] = c.device\n"
	"    out[#out + 1] = d[1] or ''\n"
	"    out[#out + 1] = d[2] or '0'\n"
	"    out[#out + 1] = exp\n"
	"    open = open + 1\n"
	"  end\n"
	"end\n"
	"if upto > released then redis.call('HSET', rk, 'released', upto, 'updated_at', now) end\n"
	"if upto == #ids and open == 0 then\n"
	"  local done = true\n"
	"  for i = released + 1, upto do\n"
	"    local st = redis.call('HGET', kcmd(ids[i]), 'status')\n"
	"    if not (st and FINAL[st]) then done = false; break end\n"
	"  end\n"
	"  if done then\n"
	"    redis.call('HSET', rk, 'status', 'completed', 'updated_at', now)\n"
	"    redis.call('ZREM', K_ROLLOUTS, rid)\n"
	"    redis.call('EXPIRE', rk, 2592000)\n"
	"    redis.call('EXPIRE', krolloutcmds(rid), 2592000)\n"
	"  end\n"
	"end\n"
	"return out\n";

/* ARGV: rollout id -> {hash, {status, count, ...}} */
static const char rollout_get_lua[] = HUB_LUA_KROLLOUT HUB_LUA_KCMD
	"local rk = krollout(ARGV[1])\n"
	"local h = redis.call('HGETALL', rk)\n"
	"if #h == 0 then return {{}, {}} end\n"
	"local counts = {}\n"
	"for _, id in ipairs(redis.call('LRANGE', krolloutcmds(ARGV[1]), 0, -1)) do\n"
	"  local st = redis.call('HGET', kcmd(id), 'status') or 'unknown'\n"
	"  counts[st] = (counts[st] or 0) + 1\n"
	"end\n"
	"local out = {}\n"
	"for k, v in pairs(counts) do out[#out + 1] = k; out[#out + 1] = v end\n"
	"return {h, out}\n";

enum { S_CREATE, S_SEND, S_ACK, S_CANCEL, S_TICK, S_GET, S_LIST,
       S_RCREATE, S_RSTEP, S_RGET, S_OWED, S__COUNT };
static int scripts[S__COUNT];

/* ---- engine state ---------------------------------------------------------- */

struct timer_ent {
	int64_t at;
	char id[CMD_ID_MAX + 1];
};

static struct {
	struct hub *hub;
	lws_sorted_usec_list_t sul_timer, sul_sweep;
	int64_t armed_at;            /* INT64_MAX: not armed */
	struct timer_ent *heap;
	size_t n, cap;
	char ctl_channel[HUB_KEY_MAX];
} E;

static const char *const states[] = {
	"queued", "sent", "received", "in_progress", "succeeded", "failed", "rejected",
	"timed_out", "expired", "canceled",
};

bool cmd_state_valid(const char *s)
{
	for (size_t i = 0; i < sizeof(states) / sizeof(states[0]); i++)
		if (!strcmp(s, states[i]))
			return true;
	return false;
}

bool cmd_state_final(const char *s)
{
	return !strcmp(s, "succeeded") || !strcmp(s, "failed") || !strcmp(s, "rejected") ||
	       !strcmp(s, "timed_out") || !strcmp(s, "expired") || !strcmp(s, "canceled");
}

bool cmd_id_valid(const char *id)
{
	size_t n = strlen(id), i;

	if (n < 34 || n > CMD_ID_MAX || (id[0] != 'c' && id[0] != 'r') || id[1] != '_')
		return false;
	for (i = 2; i < 34; i++)
		if (!((id[i] >= '0' && id[i] <= '9') || (id[i] >= 'a' && id[i] <= 'f')))
			return false;
	if (i == n)
		return true;
	if (id[0] != 'c' || id[i] != '_' || i + 1 == n)
		return false; /* a rollout's command: c_<hex>_<n> */
	for (i++; i < n; i++)
		if (id[i] < '0' || id[i] > '9')
			return false;
	return true;
}

void cmd_new_id(char out[35], char prefix)
{
	unsigned char b[16];

	if (RAND_bytes(b, sizeof(b)) != 1)
		abort();
	out[0] = prefix;
	out[1] = '_';
	for (int i = 0; i < 16; i++)
		snprintf(out + 2 + i * 2, 3, "%02x", b[i]);
}

/* Calls script s with `now` and argc more arguments. */
static int eval(int s, hub_redis_cb cb, void *arg, int argc, const char **argv, const size_t *lens)
{
	const char *av[24];
	size_t al[24];
	char now[24];

	if (argc > 20)
		abort(); /* a programming error: every call site passes a constant */
	av[0] = "EVALSHA";
	av[1] = hub_redis_script_sha(E.hub->redis, scripts[s]);
	av[2] = "0";
	snprintf(now, sizeof(now), "%" PRId64, hub_now_ms());
	av[3] = now;
	for (int i = 0; i < 4; i++)
		al[i] = strlen(av[i]);
	for (int i = 0; i < argc; i++) {
		av[4 + i] = argv[i];
		al[4 + i] = lens ? lens[i] : strlen(argv[i]);
	}
	return hub_redis_command_argv(E.hub->redis, cb, arg, 4 + argc, av, al);
}

/* Same without `now` (read scripts). */
static int eval_ro(int s, hub_redis_cb cb, void *arg, int argc, const char **argv)
{
	const char *av[8];

	av[0] = "EVALSHA";
	av[1] = hub_redis_script_sha(E.hub->redis, scripts[s]);
	av[2] = "0";
	for (int i = 0; i < argc; i++)
		av[3 + i] = argv[i];
	return hub_redis_command_argv(E.hub->redis, cb, arg, 3 + argc, av, NULL);
}

static const char *el_str(const redisReply *r, size_t i)
{
	if (!r || r->type != REDIS_REPLY_ARRAY || i >= r->elements)
		return NULL;
	r = r->element[i];
	return r->type == REDIS_REPLY_STRING || r->type == REDIS_REPLY_STATUS ? r->str : NULL;
}

static long long el_int(const redisReply *r, size_t i)
{
	if (!r || r->type != REDIS_REPLY_ARRAY || i >= r->elements)
		return 0;
	r = r->element[i];
	if (r->type == REDIS_REPLY_INTEGER)
		return r->integer;
	if (r->type == REDIS_REPLY_STRING)
		return strtoll(r->str, NULL, 10);
	return 0;
}

/* ---- timers: a min-heap of deadlines on one lws timer ---------------------- */

static void timer_cb(lws_sorted_usec_list_t *sul);

static void heap_swap(size_t a, size_t b)
{
	struct timer_ent t = E.heap[a];

	E.heap[a] = E.heap[b];
	E.heap[b] = t;
}

static void arm(void)
{
	int64_t now = hub_now_ms();

	if (!E.n)
		return;
	if (E.heap[0].at >= E.armed_at)
		return; /* already armed earlier */
	E.armed_at = E.heap[0].at;
	lws_sul_schedule(E.hub->ctx, 0, &E.sul_timer, timer_cb,
			 E.armed_at > now ? (lws_usec_t)(E.armed_at - now) * 1000 : 1);
}

void cmd_track(struct hub *hub, const char *id, int64_t at)
{
	size_t i;

	(void)hub;
	if (!E.hub || at <= 0 || strlen(id) >= sizeof(E.heap[0].id))
		return;
	if (E.n == E.cap) {
		E.cap = E.cap ? E.cap * 2 : 64;
		E.heap = hub_xrealloc(E.heap, E.cap * sizeof(*E.heap));
	}
	i = E.n++;
	E.heap[i].at = at;
	snprintf(E.heap[i].id, sizeof(E.heap[i].id), "%s", id);
	while (i && E.heap[(i - 1) / 2].at > E.heap[i].at) {
		heap_swap(i, (i - 1) / 2);
		i = (i - 1) / 2;
	}
	arm();
}

static void heap_pop(void)
{
	size_t i = 0;

	E.heap[0] = E.heap[--E.n];
	for (;;) {
		size_t l = 2 * i + 1, r = l + 1, m = i;
		if (l < E.n && E.heap[l].at < E.heap[m].at)
			m = l;
		if (r < E.n && E.heap[r].at < E.heap[m].at)
			m = r;
		if (m == i)
			break;
		heap_swap(i, m);
		i = m;
	}
}

static void local_deliver(const char *id, const char *device);
static void route_to(const char *instance, const char *verb, const char *id, const char *device);

static void on_tick(redisReply *r, void *arg)
{
	char *id = arg;
	long long kind = el_int(r, 0);

	if (kind == 0 && el_int(r, 1) > 0) {
		cmd_track(E.hub, id, el_int(r, 1));
	} else if (kind == 2) {
		const char *dev = el_str(r, 1), *inst = el_str(r, 2), *online = el_str(r, 3);
		cmd_track(E.hub, id, el_int(r, 4));
		if (dev && inst && !strcmp(inst, E.hub->instance_id)) {
			local_deliver(id, dev);
		} else if (dev && inst && online && !strcmp(online, "1")) {
			route_to(inst, "deliver", id, dev);
		}
	}
	free(id);
}

static void tick(const char *id)
{
	char *copy = hub_xstrdup(id);
	const char *argv[1] = { id };

	if (eval(S_TICK, on_tick, copy, 1, argv, NULL))
		free(copy);
}

static void timer_cb(lws_sorted_usec_list_t *sul)
{
	int64_t now = hub_now_ms();

	(void)sul;
	E.armed_at = INT64_MAX;
	while (E.n && E.heap[0].at <= now) {
		char id[CMD_ID_MAX + 1];
		memcpy(id, E.heap[0].id, sizeof(id));
		heap_pop();
		tick(id);
	}
	arm();
}

static void on_sweep(redisReply *r, void *arg)
{
	(void)arg;
	for (size_t i = 0; r && r->type == REDIS_REPLY_ARRAY && i < r->elements; i++)
		if (r->element[i]->type == REDIS_REPLY_STRING)
			tick(r->element[i]->str);
}

static void on_step(redisReply *r, void *arg)
{
	(void)arg;
	if (el_int(r, 0) != 1)
		return;
	for (size_t i = 1; i + 4 < r->elements; i += 5) {
		const char *id = el_str(r, i), *dev = el_str(r, i + 1), *inst = el_str(r, i + 2),
			   *online = el_str(r, i + 3);
		if (!id || !dev)
			continue;
		cmd_track(E.hub, id, el_int(r, i + 4));
		cmd_route(E.hub, id, dev, inst, online && !strcmp(online, "1"));
	}
}

static void on_active_rollouts(redisReply *r, void *arg)
{
	(void)arg;
	for (size_t i = 0; r && r->type == REDIS_REPLY_ARRAY && i < r->elements; i++) {
		const char *argv[1];
		if (r->element[i]->type != REDIS_REPLY_STRING)
			continue;
		argv[0] = r->element[i]->str;
		eval(S_RSTEP, on_step, NULL, 1, argv, NULL);
	}
}

/* Overdue deadlines of any instance (a crashed one's, or ours before a
 * restart): one query a second, whatever the number of pending commands;
 * and a release step for every running rollout (atomic: any instance may). */
static void sweep_cb(lws_sorted_usec_list_t *sul)
{
	char now[24];
	const char *argv[7] = { "ZRANGEBYSCORE", HUB_KEY_CMD_TIMERS, "-inf", now, "LIMIT", "0",
				SWEEP_BATCH };

	(void)sul;
	snprintf(now, sizeof(now), "%" PRId64, hub_now_ms());
	if (hub_redis_up(E.hub->redis)) {
		const char *ra[4] = { "ZRANGE", HUB_KEY_ROLLOUTS_ACTIVE, "0", "-1" };
		hub_redis_command_argv(E.hub->redis, on_sweep, NULL, 7, argv, NULL);
		hub_redis_command_argv(E.hub->redis, on_active_rollouts, NULL, 4, ra, NULL);
	}
	lws_sul_schedule(E.hub->ctx, 0, &E.sul_sweep, sweep_cb, SWEEP_US);
}

/* ---- delivery -------------------------------------------------------------- */

struct send_ctx {
	struct hub_link *conn;
	char id[CMD_ID_MAX + 1];
};

static void on_sent(redisReply *r, void *arg)
{
	struct send_ctx *s = arg;

	if (el_int(r, 0) == 1 && hub_link_open(s->conn)) {
		hub_buf m = { 0 };
		const char *dev = el_str(r, 1), *name = el_str(r, 2), *params = el_str(r, 3);

		hub_buf_puts(&m, "{\"type\":\"command\",\"id\":");
		hub_buf_json_str(&m, s->id, strlen(s->id));
		hub_buf_puts(&m, ",\"device\":");
		hub_buf_json_str(&m, dev ? dev : "", dev ? strlen(dev) : 0);
		hub_buf_puts(&m, ",\"name\":");
		hub_buf_json_str(&m, name ? name : "", name ? strlen(name) : 0);
		hub_buf_puts(&m, ",\"params\":");
		hub_buf_puts(&m, params && *params ? params : "{}");
		hub_buf_puts(&m, ",\"attempt\":");
		hub_buf_i64(&m, el_int(r, 4));
		hub_buf_puts(&m, ",\"expires_at\":");
		hub_buf_i64(&m, el_int(r, 5));
		hub_buf_puts(&m, "}");
		hub_link_send(s->conn, m.data, m.len);
		hub_buf_free(&m);
		E.hub->metrics.commands_sent_total++;
		cmd_track(E.hub, s->id, el_int(r, 6));
	}
	hub_link_release(s->conn);
	free(s);
}

static void send_to(struct hub_link *c, const char *id)
{
	struct send_ctx *s = hub_xcalloc(1, sizeof(*s));
	const char *argv[2] = { id, hub_link_id(c) };

	snprintf(s->id, sizeof(s->id), "%s", id);
	s->conn = c;
	hub_link_hold(c);
	if (eval(S_SEND, on_sent, s, 2, argv, NULL)) {
		hub_link_release(c);
		free(s);
	}
}

static void local_deliver(const char *id, const char *device)
{
	struct hub_link *c = hub_link_for_device(E.hub, device);

	if (c)
		send_to(c, id); /* else: it goes out when the device is next announced */
}

/* What a device's gateway is owed when it is announced: cancels of commands
 * it had, then its pending commands in creation order. One script for the
 * whole announce message, however many devices it names.
 * ARGV: devices -> {device, {cancel ids}, {pending ids}, ...} for devices
 * with anything owed. */
static const char owed_lua[] = HUB_LUA_KCANCELS HUB_LUA_KCMDS
	"local out = {}\n"
	"for _, dev in ipairs(ARGV) do\n"
	"  local cancels = redis.call('SMEMBERS', kcancels(dev))\n"
	"  local ids = redis.call('ZRANGE', kcmds(dev), 0, -1)\n"
	"  if #cancels > 0 or #ids > 0 then\n"
	"    out[#out + 1] = dev\n"
	"    out[#out + 1] = cancels\n"
	"    out[#out + 1] = ids\n"
	"  end\n"
	"end\n"
	"return out\n";

static void send_cancel_local(const char *id, const char *device);

static void on_owed(redisReply *r, void *arg)
{
	(void)arg;
	for (size_t i = 0; r && r->type == REDIS_REPLY_ARRAY && i + 2 < r->elements; i += 3) {
		const char *dev = el_str(r, i);
		const redisReply *cancels = r->element[i + 1], *ids = r->element[i + 2];
		struct hub_link *c = dev ? hub_link_for_device(E.hub, dev) : NULL;

		if (!c)
			continue; /* gone again: its next announce asks again */
		for (size_t j = 0; cancels->type == REDIS_REPLY_ARRAY && j < cancels->elements; j++)
			if (cancels->element[j]->type == REDIS_REPLY_STRING)
				send_cancel_local(cancels->element[j]->str, dev);
		for (size_t j = 0; ids->type == REDIS_REPLY_ARRAY && j < ids->elements; j++)
			if (ids->element[j]->type == REDIS_REPLY_STRING)
				send_to(c, ids->element[j]->str); /* in creation order */
	}
}

/* Devices were announced on a local link: what they are owed goes out. */
static void on_announced(struct hub *hub, enum hub_event ev, const void *payload, void *ctx)
{
	const struct hub_ev_announced *a = payload;
	const char *const *devices = a->devices;
	size_t n = a->n;
	const char **argv;

	(void)ev;
	(void)ctx;
	if (!n)
		return;
	argv = hub_xmalloc((n + 3) * sizeof(*argv));
	argv[0] = "EVALSHA";
	argv[1] = hub_redis_script_sha(hub->redis, scripts[S_OWED]);
	argv[2] = "0";
	for (size_t i = 0; i < n; i++)
		argv[3 + i] = devices[i];
	hub_redis_command_argv(hub->redis, on_owed, NULL, (int)(n + 3), argv, NULL);
	free(argv);
}

static void route_to(const char *instance, const char *verb, const char *id, const char *device)
{
	char ch[HUB_KEY_MAX], msg[256];

	if (!hub_ch_ctl_cmd(ch, sizeof(ch), instance))
		return;
	snprintf(msg, sizeof(msg), "%s %s %s", verb, id, device);
	hub_redis_publish(E.hub->redis, ch, msg, strlen(msg));
}

void cmd_route(struct hub *hub, const char *id, const char *device, const char *instance,
	       bool online)
{
	if (hub_link_for_device(hub, device))
		local_deliver(id, device);
	else if (online && instance && *instance && strcmp(instance, hub->instance_id))
		route_to(instance, "deliver", id, device);
}

/* ---- cancel ---------------------------------------------------------------- */

static void send_cancel_local(const char *id, const char *device)
{
	struct hub_link *c = hub_link_for_device(E.hub, device);
	hub_buf m = { 0 };

	if (!c)
		return;
	hub_buf_puts(&m, "{\"type\":\"cancel\",\"id\":");
	hub_buf_json_str(&m, id, strlen(id));
	hub_buf_puts(&m, ",\"device\":");
	hub_buf_json_str(&m, device, strlen(device));
	hub_buf_puts(&m, "}");
	hub_link_send(c, m.data, m.len);
	hub_buf_free(&m);
	/* Told: no longer owed at the next announce. */
	char key[HUB_KEY_MAX];
	const char *argv[3] = { "SREM", key, id };
	if (hub_key_dev_cancels(key, sizeof(key), device))
		hub_redis_command_argv(E.hub->redis, NULL, NULL, 3, argv, NULL);
}

struct cancel_route {
	char id[CMD_ID_MAX + 1];
	char device[HUB_ID_MAX + 1];
};

static void on_cancel_where(redisReply *r, void *arg)
{
	struct cancel_route *cr = arg;
	const char *inst = el_str(r, 0), *online = el_str(r, 1);

	if (inst && online && !strcmp(online, "1") && strcmp(inst, E.hub->instance_id))
		route_to(inst, "cancel", cr->id, cr->device);
	free(cr);
}

void cmd_route_cancel(struct hub *hub, const char *id, const char *device)
{
	struct cancel_route *cr;
	char key[HUB_KEY_MAX];
	const char *argv[4] = { "HMGET", key, "instance", "online" };

	if (hub_link_for_device(hub, device)) {
		send_cancel_local(id, device);
		return;
	}
	if (!hub_key_dev(key, sizeof(key), device))
		return;
	cr = hub_xcalloc(1, sizeof(*cr));
	snprintf(cr->id, sizeof(cr->id), "%s", id);
	snprintf(cr->device, sizeof(cr->device), "%s", device);
	if (hub_redis_command_argv(hub->redis, on_cancel_where, cr, 4, argv, NULL))
		free(cr);
}

/* ---- routed work from other instances -------------------------------------- */

static void on_ctl(const char *channel, const char *payload, size_t len, void *arg)
{
	char buf[320], *verb, *id, *dev, *save = NULL;

	(void)channel;
	(void)arg;
	if (len >= sizeof(buf))
		return;
	memcpy(buf, payload, len);
	buf[len] = '\0';
	verb = strtok_r(buf, " ", &save);
	id = strtok_r(NULL, " ", &save);
	dev = strtok_r(NULL, " ", &save);
	if (!verb || !id || !dev)
		return;
	if (!strcmp(verb, "deliver"))
		local_deliver(id, dev);
	else if (!strcmp(verb, "cancel"))
		send_cancel_local(id, dev);
}

/* ---- acks ------------------------------------------------------------------ */

struct ack_ctx {
	struct hub_link *conn;
	char id[160];
};

static void on_acked(redisReply *r, void *arg)
{
	struct ack_ctx *a = arg;

	if (((r && r->type == REDIS_REPLY_ARRAY && el_int(r, 0) == -1) || (!r && !cmd_id_valid(a->id))) &&
	    hub_link_open(a->conn)) {
		hub_buf m = { 0 };
		hub_buf_puts(&m, "{\"type\":\"error\",\"code\":\"unknown_command\",\"id\":");
		hub_buf_json_str(&m, a->id, strlen(a->id));
		hub_buf_puts(&m, ",\"message\":\"no command with this id for a device announced on this connection\"}");
		hub_link_send(a->conn, m.data, m.len);
		hub_buf_free(&m);
	}
	if (r && r->type == REDIS_REPLY_ARRAY)
		E.hub->metrics.command_acks_total++;
	hub_link_release(a->conn);
	free(a);
}

/* A gateway acknowledged a command. */
static void on_ack(struct hub *hub, enum hub_event ev, const void *payload, void *ctx)
{
	const struct hub_ev_command_ack *e = payload;
	struct hub_link *c = e->link;
	const struct gw_command_ack *ack = e->ack;
	const char *conn_id = hub_link_id(c);
	struct ack_ctx *a = hub_xcalloc(1, sizeof(*a));
	char progress[32] = "";
	char *result = ack->result ? json_dumps(ack->result, JSON_COMPACT | JSON_ENCODE_ANY) : NULL;
	const char *argv[7];

	(void)hub;
	(void)ev;
	(void)ctx;
	snprintf(a->id, sizeof(a->id), "%s", ack->id);
	a->conn = c;
	hub_link_hold(c);
	if (ack->progress && json_is_number(ack->progress)) {
		double p = json_number_value(ack->progress);
		if (p < 0)
			p = 0;
		if (p > 100)
			p = 100;
		snprintf(progress, sizeof(progress), "%g", p);
	}
	argv[0] = ack->id;
	argv[1] = conn_id;
	argv[2] = ack->status;
	argv[3] = progress;
	argv[4] = ack->message ? ack->message : "";
	argv[5] = result ? result : "";
	argv[6] = ack->error ? ack->error : "";
	if (!cmd_id_valid(ack->id)) {
		on_acked(NULL, a); /* answers unknown_command, releases */
	} else if (eval(S_ACK, on_acked, a, 7, argv, NULL)) {
		hub_link_release(c);
		free(a);
	}
	free(result);
}

/* ---- API entry points ------------------------------------------------------ */

int cmd_create(struct hub *hub, const struct cmd_spec *sp, hub_redis_cb cb, void *arg)
{
	char n[4][16];
	const char *argv[12];

	(void)hub;
	snprintf(n[0], 16, "%d", sp->ack_timeout_s);
	snprintf(n[1], 16, "%d", sp->timeout_s);
	snprintf(n[2], 16, "%d", sp->ttl_s);
	snprintf(n[3], 16, "%d", sp->max_attempts);
	argv[0] = sp->id;
	argv[1] = sp->device;
	argv[2] = sp->type;
	argv[3] = sp->name;
	argv[4] = sp->params;
	argv[5] = n[0];
	argv[6] = n[1];
	argv[7] = n[2];
	argv[8] = n[3];
	argv[9] = sp->idem ? sp->idem : "";
	argv[10] = sp->owner ? sp->owner : "";
	argv[11] = sp->rollout ? sp->rollout : "";
	return eval(S_CREATE, cb, arg, 12, argv, NULL);
}

int cmd_cancel(struct hub *hub, const char *id, hub_redis_cb cb, void *arg)
{
	const char *argv[1] = { id };

	(void)hub;
	return eval(S_CANCEL, cb, arg, 1, argv, NULL);
}

int cmd_get(struct hub *hub, const char *id, hub_redis_cb cb, void *arg)
{
	const char *argv[1] = { id };

	(void)hub;
	return eval_ro(S_GET, cb, arg, 1, argv);
}

int cmd_list(struct hub *hub, const char *device, const char *status, int limit,
	     hub_redis_cb cb, void *arg)
{
	char lim[16];
	const char *argv[3] = { device, status ? status : "", lim };

	(void)hub;
	snprintf(lim, sizeof(lim), "%d", limit);
	return eval_ro(S_LIST, cb, arg, 3, argv);
}

/* ---- start and stop -------------------------------------------------------- */

void cmd_init(struct hub *hub)
{
	E.hub = hub;
	E.armed_at = INT64_MAX;
	scripts[S_CREATE] = hub_redis_add_script(hub->redis, create_lua);
	scripts[S_SEND] = hub_redis_add_script(hub->redis, send_lua);
	scripts[S_ACK] = hub_redis_add_script(hub->redis, ack_lua);
	scripts[S_CANCEL] = hub_redis_add_script(hub->redis, cancel_lua);
	scripts[S_TICK] = hub_redis_add_script(hub->redis, tick_lua);
	scripts[S_GET] = hub_redis_add_script(hub->redis, get_lua);
	scripts[S_LIST] = hub_redis_add_script(hub->redis, list_lua);
	scripts[S_RCREATE] = hub_redis_add_script(hub->redis, rollout_create_lua);
	scripts[S_RSTEP] = hub_redis_add_script(hub->redis, rollout_step_lua);
	scripts[S_RGET] = hub_redis_add_script(hub->redis, rollout_get_lua);
	scripts[S_OWED] = hub_redis_add_script(hub->redis, owed_lua);
	hub_ch_ctl_cmd(E.ctl_channel, sizeof(E.ctl_channel), hub->instance_id);
	hub_redis_subscribe(hub->redis, E.ctl_channel, on_ctl, NULL);
	lws_sul_schedule(hub->ctx, 0, &E.sul_sweep, sweep_cb, SWEEP_US);
}

void cmd_stop(struct hub *hub)
{
	(void)hub;
	if (!E.hub)
		return;
	lws_sul_cancel(&E.sul_sweep);
	lws_sul_cancel(&E.sul_timer);
}

void cmd_free(struct hub *hub)
{
	(void)hub;
	free(E.heap);
	E.heap = NULL;
	E.n = E.cap = 0;
}

int cmd_rollout_create(struct hub *hub, const struct cmd_spec *sp, const char *labels,
		       const char *patterns, int max_per_minute, double ratio, int min_finished,
		       hub_redis_cb cb, void *arg)
{
	char n[7][32];
	const char *argv[14];

	(void)hub;
	snprintf(n[0], 32, "%d", sp->ack_timeout_s);
	snprintf(n[1], 32, "%d", sp->timeout_s);
	snprintf(n[2], 32, "%d", sp->ttl_s);
	snprintf(n[3], 32, "%d", sp->max_attempts);
	snprintf(n[4], 32, "%d", max_per_minute);
	snprintf(n[5], 32, "%.6f", ratio);
	snprintf(n[6], 32, "%d", min_finished);
	argv[0] = sp->id;
	argv[1] = sp->type;
	argv[2] = labels ? labels : "";
	argv[3] = patterns ? patterns : "";
	argv[4] = sp->name;
	argv[5] = sp->params;
	argv[6] = n[0];
	argv[7] = n[1];
	argv[8] = n[2];
	argv[9] = n[3];
	argv[10] = n[4];
	argv[11] = n[5];
	argv[12] = sp->owner ? sp->owner : "";
	argv[13] = n[6];
	return eval(S_RCREATE, cb, arg, 14, argv, NULL);
}

int cmd_rollout_get(struct hub *hub, const char *id, hub_redis_cb cb, void *arg)
{
	const char *argv[1] = { id };

	(void)hub;
	return eval_ro(S_RGET, cb, arg, 1, argv);
}

void cmd_rollout_kick(struct hub *hub, const char *id)
{
	const char *argv[1] = { id };

	(void)hub;
	eval(S_RSTEP, on_step, NULL, 1, argv, NULL);
}

/* ---- the module ---------------------------------------------------------- */

static int cmd_module_start(struct hub *hub, char *err, size_t errlen)
{
	(void)err;
	(void)errlen;
	cmd_init(hub);
	hub_observe(hub, HUB_EV_DEVICES_ANNOUNCED, on_announced, NULL);
	hub_observe(hub, HUB_EV_COMMAND_ACK, on_ack, NULL);
	return 0;
}

const struct hub_module cmd_module = {
	.name = "commands",
	.start = cmd_module_start,
	.stop = cmd_stop,
	.free = cmd_free,
};
