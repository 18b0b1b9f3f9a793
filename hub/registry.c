#include "hub/registry.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <libwebsockets.h>

#include "hub/hub.h"
#include "hub/keys.h"
#include "hub/util.h"

/* Stores a batch of telemetry frames (the frames of one loop turn).
 * KEYS[1] = iot:feed, KEYS[1 + f] = iot:gw:{<gateway of frame f>}:seqs
 * ARGV = window, device maxlen, feed maxlen, k, then per frame:
 *        seq, gw, lines, n, n x (device, ts, data), m, m x (type, from, to):
 *        lines[from..to] are the readings of that device type, published on
 *        iot:live:raw:<type> behind the frame's feed position.
 * Returns one {1, feed id} (stored) or {0} (the seq was durable already)
 * per frame, in order. Frames are stored one after the other exactly as one
 * script per frame would: a resend in the same batch is a duplicate, live
 * order is feed order. One script per turn instead of per frame saves Redis
 * the command, script lookup and Lua call setup of each frame (~a fifth of
 * its CPU per 1-reading frame).
 * Costs per frame: ZADD NX (the dedupe), one XADD per reading and one for
 * the feed, one PUBLISH per device type, TTL (EXPIRE once every 256 seqs).
 * The window is trimmed to `window` members only when seq is a multiple of
 * 64 (so it holds window..window+64 seqs): ZREMRANGEBYRANK on a 4,096-member
 * sorted set for every frame cost more than the rest of the dedupe. A seq
 * older than the whole window is stored again (at least once: a frame
 * resent that late was more likely never stored than acked and lost).
 * A duplicate refreshes the window's expiry: a write, so that a WAIT after
 * this call (ack-durability replicated) also covers the first copy's store,
 * which may have been another connection's (WAIT only counts this
 * connection's writes).
 * last_seen is flushed separately. Publishing here, atomically with the
 * XADDs, makes live order equal feed order (docs/dashboard.md). Key names
 * are hub/keys.h's, spliced in place rather than through its Lua helpers:
 * this script runs per frame batch and builds a key per reading, so it makes
 * no closure and no call for them. */
static const char store_lua[] =
	"local window, dmax, fmax = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])\n"
	"local out, p = {}, 5\n"
	"for f = 1, tonumber(ARGV[4]) do\n"
	"  local key, seq, gw, lines = KEYS[1 + f], ARGV[p], ARGV[p + 1], ARGV[p + 2]\n"
	"  local n = tonumber(ARGV[p + 3])\n"
	"  local r = p + 4\n"
	"  local b = r + 3 * n\n"
	"  local m = tonumber(ARGV[b])\n"
	"  p = b + 1 + 3 * m\n"
	"  if redis.call('ZADD', key, 'NX', seq, seq) == 0 then\n"
	"    redis.call('EXPIRE', key, 2592000)\n"
	"    out[f] = {0}\n"
	"  else\n"
	"    if tonumber(seq) % 64 == 0 then\n"
	"      redis.call('ZREMRANGEBYRANK', key, 0, -window - 1)\n"
	"    end\n"
	"    for i = r, b - 1, 3 do\n"
	"      redis.call('XADD', '" HUB_KEY_TM "{' .. ARGV[i] .. '}', 'MAXLEN', '~', dmax, '*',\n"
	"                 'ts', ARGV[i + 1], 'data', ARGV[i + 2], 'gw', gw, 'seq', seq)\n"
	"    end\n"
	"    local id = '0-0'\n"
	"    if fmax > 0 then\n"
	"      id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*',\n"
	"                      'gw', gw, 'seq', seq, 'readings', lines)\n"
	"    end\n"
	"    for k = b + 1, p - 1, 3 do\n"
	"      redis.call('PUBLISH', '" HUB_CH_RAW "' .. ARGV[k],\n"
	"                 id .. '\\n' .. string.sub(lines, tonumber(ARGV[k + 1]), tonumber(ARGV[k + 2])))\n"
	"    end\n"
	"    if tonumber(seq) % 256 == 0 or redis.call('TTL', key) < 0 then\n"
	"      redis.call('EXPIRE', key, 2592000)\n"
	"    end\n"
	"    out[f] = {1, id}\n"
	"  end\n"
	"end\n"
	"return out\n";

/* Rate limits kept between connections (docs/protocol.md "Limits"): each
 * is a theoretical arrival time (TAT, wall-clock ms; hub/ratelimit.h), and
 * a save keeps the later of the stored and the new one, so an older or
 * concurrent write never refills a bucket. The gateway's are fields of
 * iot:gw:{g}:limits (which expires once every TAT is past), a device's the
 * field `rl` of its registry hash. */
#define LUA_MAXSET \
	"local function maxset(key, field, v)\n" \
	"  v = tonumber(v)\n" \
	"  if v and v > 0 and v > tonumber(redis.call('HGET', key, field) or 0) then\n" \
	"    redis.call('HSET', key, field, v)\n" \
	"  end\n" \
	"end\n"

/* ARGV = gateway, now ms, connect rate (per s, 0 = unlimited), connect
 * burst. A new connection of the gateway: its epoch (INCR, orders takeovers
 * across instances), whether the connect rate allows it (GCRA on the
 * `connect` TAT), and the gateway's stored TATs.
 * -> {epoch, allowed 1|0, retry ms, telemetry TAT, announce TAT, ack TAT} */
static const char connect_lua[] = HUB_LUA_KGW
	"local g, now = ARGV[1], tonumber(ARGV[2])\n"
	"local rate, burst = tonumber(ARGV[3]), tonumber(ARGV[4])\n"
	"local epoch = redis.call('INCR', kgw(g, ':epoch'))\n"
	"local lk = kgw(g, ':limits')\n"
	"local h = redis.call('HMGET', lk, 'connect', 'telemetry', 'announce', 'ack')\n"
	"local ok, retry = 1, 0\n"
	"if rate > 0 then\n"
	"  local t = 1000 / rate\n"
	"  local tat = math.max(tonumber(h[1] or 0), now) + t\n"
	"  if tat - now > burst * t then\n"
	"    ok, retry = 0, math.ceil(tat - now - burst * t)\n"
	"  else\n"
	"    redis.call('HSET', lk, 'connect', tat)\n"
	"    redis.call('PEXPIRE', lk, math.ceil(tat - now) + 60000)\n"
	"  end\n"
	"end\n"
	"return {epoch, ok, retry, h[2] or '0', h[3] or '0', h[4] or '0'}\n";

/* ARGV = gateway, now ms, telemetry TAT, announce TAT, ack TAT (0 = none). */
static const char limits_lua[] = HUB_LUA_KGW LUA_MAXSET
	"local lk, now = kgw(ARGV[1], ':limits'), tonumber(ARGV[2])\n"
	"maxset(lk, 'telemetry', ARGV[3])\n"
	"maxset(lk, 'announce', ARGV[4])\n"
	"maxset(lk, 'ack', ARGV[5])\n"
	"local h = redis.call('HVALS', lk)\n"
	"local last = now\n"
	"for _, v in ipairs(h) do last = math.max(last, tonumber(v) or 0) end\n"
	"redis.call('PEXPIRE', lk, math.ceil(last - now) + 60000)\n"
	"return 1\n";

/* ARGV = gateway, conn, instance, now ms, n, then n x (device, type, labels).
 * Registers the devices as owned by conn. Presence is published only for a
 * device whose state changed (it was offline or owned by another
 * connection, or its type or labels changed), so re-announcing changes
 * nothing and costs the dashboards nothing; devices taken from another
 * connection are named on HUB_CH_DEVTAKE ("device conn" lines) so that
 * connection stops storing their readings. Ids and type names are
 * [A-Za-z0-9._:-]: no JSON escaping. -> each device's stored rate-limit
 * TAT, in order. */
static const char announce_lua[] = HUB_LUA_KDEV HUB_LUA_KTYPE HUB_LUA_FIXED
	"local n, conn = tonumber(ARGV[5]), ARGV[2]\n"
	"local ev, taken, tats = {}, {}, {}\n"
	"for i = 0, n - 1 do\n"
	"  local dev, typ, labels = ARGV[6 + 3 * i], ARGV[7 + 3 * i], ARGV[8 + 3 * i]\n"
	"  local key = kdev(dev)\n"
	"  local old = redis.call('HMGET', key, 'type', 'labels', 'conn', 'online', 'rl')\n"
	"  if old[1] and old[1] ~= typ then redis.call('SREM', ktype(old[1]), dev) end\n"
	"  if old[3] and old[3] ~= conn and old[4] == '1' then\n"
	"    taken[#taken + 1] = dev .. ' ' .. conn .. '\\n'\n"
	"  end\n"
	"  redis.call('HSET', key, 'type', typ, 'labels', labels,\n"
	"             'gateway', ARGV[1], 'conn', conn, 'instance', ARGV[3],\n"
	"             'online', '1', 'last_seen', ARGV[4], 'announced_at', ARGV[4])\n"
	"  redis.call('SADD', K_DEVICES, dev)\n"
	"  redis.call('SADD', ktype(typ), dev)\n"
	"  if old[3] ~= conn or old[4] ~= '1' or old[1] ~= typ or old[2] ~= labels then\n"
	"    ev[#ev + 1] = dev .. '\\t' .. typ .. '\\t' .. labels ..\n"
	"      '\\t\"device\":\"' .. dev .. '\",\"online\":true,\"at\":' .. ARGV[4] ..\n"
	"      ',\"gateway\":\"' .. ARGV[1] .. '\",\"device_type\":\"' .. typ .. '\"\\n'\n"
	"  end\n"
	"  tats[i + 1] = old[5] or '0'\n"
	"end\n"
	"if #ev > 0 then redis.call('PUBLISH', CH_PRESENCE, '\\n' .. table.concat(ev)) end\n"
	"if #taken > 0 then redis.call('PUBLISH', '" HUB_CH_DEVTAKE "', table.concat(taken)) end\n"
	"return tats\n";

/* ARGV = conn, now ms, then devices and their rate-limit TATs. Marks
 * offline (and publishes presence for) the devices still owned by conn;
 * keeps every TAT. */
static const char offline_lua[] = HUB_LUA_KDEV HUB_LUA_FIXED LUA_MAXSET
	"local ev = {}\n"
	"for i = 3, #ARGV, 2 do\n"
	"  local dev = ARGV[i]\n"
	"  local key = kdev(dev)\n"
	"  local h = redis.call('HMGET', key, 'conn', 'type', 'labels', 'gateway')\n"
	"  if h[1] == ARGV[1] then\n"
	"    redis.call('HSET', key, 'online', '0', 'last_seen', ARGV[2])\n"
	"    ev[#ev + 1] = dev .. '\\t' .. h[2] .. '\\t' .. h[3] ..\n"
	"      '\\t\"device\":\"' .. dev .. '\",\"online\":false,\"at\":' .. ARGV[2] ..\n"
	"      ',\"gateway\":\"' .. h[4] .. '\",\"device_type\":\"' .. h[2] .. '\"\\n'\n"
	"  end\n"
	"  if h[2] then maxset(key, 'rl', ARGV[i + 1]) end\n"
	"end\n"
	"if #ev > 0 then redis.call('PUBLISH', CH_PRESENCE, '\\n' .. table.concat(ev)) end\n"
	"return #ev\n";

/* ARGV = now ms, then (device, conn, TAT) triples: last_seen and the
 * rate-limit TAT of devices that sent readings. -> the 0-based indexes of
 * the triples whose device another connection owns (its takeover notice was
 * missed: the hub drops them now, within a second). A device with no
 * registry entry (Redis lost it) is left alone: no partial record. */
static const char seen_lua[] = HUB_LUA_KDEV LUA_MAXSET
	"local lost = {}\n"
	"for i = 2, #ARGV, 3 do\n"
	"  local key = kdev(ARGV[i])\n"
	"  local owner = redis.call('HGET', key, 'conn')\n"
	"  if owner == ARGV[i + 1] then\n"
	"    redis.call('HSET', key, 'last_seen', ARGV[1])\n"
	"    maxset(key, 'rl', ARGV[i + 2])\n"
	"  elseif owner then\n"
	"    lost[#lost + 1] = (i - 2) / 3\n"
	"  end\n"
	"end\n"
	"return lost\n";

static int script_store, script_announce, script_offline, script_seen, script_connect,
	   script_limits;

void hub_registry_init(struct hub *hub)
{
	script_store = hub_redis_add_script(hub->redis, store_lua);
	script_announce = hub_redis_add_script(hub->redis, announce_lua);
	script_offline = hub_redis_add_script(hub->redis, offline_lua);
	script_seen = hub_redis_add_script(hub->redis, seen_lua);
	script_connect = hub_redis_add_script(hub->redis, connect_lua);
	script_limits = hub_redis_add_script(hub->redis, limits_lua);
}

/* ---- RESP built in place -------------------------------------------------
 * Every script call is formatted here into one reused buffer (the loop is
 * single-threaded) and queued as is: hiredis's argv formatting costs an
 * allocation and a printf-style pass per argument, about an eighth of the
 * hub's instructions per frame. */

static hub_buf resp;

static void resp_head(size_t argc)
{
	resp.len = 0;
	hub_buf_reserve(&resp, 32);
	resp.data[resp.len++] = '*';
	resp.len += hub_fmt_i64(resp.data + resp.len, (int64_t)argc);
	resp.data[resp.len++] = '\r';
	resp.data[resp.len++] = '\n';
}

static void buf_arg(hub_buf *b, const char *p, size_t n)
{
	hub_buf_reserve(b, n + 32);
	b->data[b->len++] = '$';
	b->len += hub_fmt_i64(b->data + b->len, (int64_t)n);
	b->data[b->len++] = '\r';
	b->data[b->len++] = '\n';
	memcpy(b->data + b->len, p, n);
	b->len += n;
	b->data[b->len++] = '\r';
	b->data[b->len++] = '\n';
}

static void buf_int(hub_buf *b, int64_t v)
{
	char num[24];

	buf_arg(b, num, hub_fmt_i64(num, v));
}

static void resp_arg(const char *p, size_t n)
{
	buf_arg(&resp, p, n);
}

static void resp_str(const char *s)
{
	resp_arg(s, strlen(s));
}

static void resp_int(int64_t v)
{
	buf_int(&resp, v);
}

/* Starts EVALSHA <script> <nkeys> followed by nargs more arguments. */
static void resp_eval(struct hub *hub, int script, int nkeys, size_t nargs)
{
	resp_head(3 + nargs);
	resp_arg("EVALSHA", 7);
	resp_arg(hub_redis_script_sha(hub->redis, script), 40);
	resp_int(nkeys);
}

static int resp_send_as(struct hub *hub, hub_redis_cb cb, void *arg, bool durable)
{
	int rc = (durable ? hub_redis_command_durable : hub_redis_command_formatted)
		 (hub->redis, cb, arg, resp.data, resp.len);

	if (resp.cap > 256 * 1024)
		hub_buf_free(&resp); /* keep a huge command's buffer no longer */
	return rc;
}

static int resp_send(struct hub *hub, hub_redis_cb cb, void *arg)
{
	return resp_send_as(hub, cb, arg, false);
}

int hub_registry_seen(struct hub *hub, int64_t now_ms, const struct hub_seen_item *items,
		      size_t n, hub_redis_cb cb, void *arg)
{
	resp_eval(hub, script_seen, 0, 1 + 3 * n);
	resp_int(now_ms);
	for (size_t i = 0; i < n; i++) {
		resp_str(items[i].device);
		resp_str(items[i].conn);
		resp_int(items[i].tat_ms);
	}
	return resp_send(hub, cb, arg);
}

int hub_registry_connect(struct hub *hub, const char *gateway, double rate, double burst,
			 hub_redis_cb cb, void *arg)
{
	char num[32];
	int n;

	resp_eval(hub, script_connect, 0, 4);
	resp_str(gateway);
	resp_int(hub_now_ms());
	n = snprintf(num, sizeof(num), "%.17g", rate);
	resp_arg(num, (size_t)n);
	n = snprintf(num, sizeof(num), "%.17g", burst);
	resp_arg(num, (size_t)n);
	return resp_send(hub, cb, arg);
}

void hub_registry_save_limits(struct hub *hub, const char *gateway, int64_t telemetry_tat,
			      int64_t announce_tat, int64_t ack_tat)
{
	resp_eval(hub, script_limits, 0, 5);
	resp_str(gateway);
	resp_int(hub_now_ms());
	resp_int(telemetry_tat);
	resp_int(announce_tat);
	resp_int(ack_tat);
	resp_send(hub, NULL, NULL);
}

int hub_registry_announce(struct hub *hub, const char *gateway, const char *conn,
			  const struct hub_announce_item *items, size_t n,
			  hub_redis_cb cb, void *arg)
{
	resp_eval(hub, script_announce, 0, 5 + 3 * n);
	resp_str(gateway);
	resp_str(conn);
	resp_str(hub->instance_id);
	resp_int(hub_now_ms());
	resp_int((int64_t)n);
	for (size_t i = 0; i < n; i++) {
		resp_str(items[i].device);
		resp_str(items[i].type);
		resp_arg(items[i].labels, items[i].labels_len);
	}
	return resp_send(hub, cb, arg);
}

void hub_registry_offline(struct hub *hub, const char *conn, const char *const *devices,
			  const int64_t *tats, size_t n)
{
	resp_eval(hub, script_offline, 0, 2 + 2 * n);
	resp_str(conn);
	resp_int(hub_now_ms());
	for (size_t i = 0; i < n; i++) {
		resp_str(devices[i]);
		resp_int(tats[i]);
	}
	resp_send(hub, NULL, NULL);
}

/* ---- the store batch ------------------------------------------------------
 * Frames are appended to one batch and stored by one EVALSHA when the
 * command connection is next writeable: the end of the loop turn in which
 * they arrived (or at once when the batch is full). The batch's callbacks
 * get their own frame's answer. */

#define BATCH_FRAMES    64
#define BATCH_READINGS  2048
#define BATCH_BYTES     (512 * 1024)
#define BATCH_LATE_US   1000          /* the writeable never came: flush anyway */

struct batch_cb {
	hub_redis_cb cb;
	void *arg;
};

struct batch_sent {
	size_t n;
	struct batch_cb cbs[];
};

static struct {
	struct hub *hub;
	hub_buf keys, args;        /* RESP of KEYS[2..] and of the frames' ARGV */
	size_t nframes, nargs, nreadings, cap;
	struct batch_cb *cbs;
	lws_sorted_usec_list_t sul;
} B;

static void on_batch(redisReply *reply, void *arg)
{
	struct batch_sent *bs = arg;

	for (size_t i = 0; i < bs->n; i++) {
		redisReply *one = reply;
		if (reply && reply->type == REDIS_REPLY_ARRAY)
			one = i < reply->elements ? reply->element[i] : NULL;
		bs->cbs[i].cb(one, bs->cbs[i].arg);
	}
	free(bs);
}

static void store_flush(void *unused)
{
	struct hub *hub = B.hub;
	struct batch_sent *bs;

	(void)unused;
	if (!B.nframes)
		return;
	lws_sul_cancel(&B.sul);
	bs = hub_xmalloc(sizeof(*bs) + B.nframes * sizeof(bs->cbs[0]));
	bs->n = B.nframes;
	memcpy(bs->cbs, B.cbs, B.nframes * sizeof(bs->cbs[0]));
	resp_eval(hub, script_store, (int)(1 + B.nframes), 1 + B.nframes + 4 + B.nargs);
	resp_arg(HUB_KEY_FEED, sizeof(HUB_KEY_FEED) - 1);
	hub_buf_append(&resp, B.keys.data, B.keys.len);
	resp_int(hub->cfg.seq_window);
	resp_int(hub->cfg.device_stream_maxlen);
	resp_int(hub->cfg.feed_stream_maxlen);
	resp_int((int64_t)B.nframes);
	hub_buf_append(&resp, B.args.data, B.args.len);
	B.nframes = B.nargs = B.nreadings = 0;
	B.keys.len = B.args.len = 0;
	if (B.args.cap > 2 * BATCH_BYTES)
		hub_buf_free(&B.args);
	/* Durable: with ack-durability replicated, answered after its WAIT. */
	if (resp_send_as(hub, on_batch, bs, true))
		on_batch(NULL, bs); /* down: every frame is answered `unavailable` */
}

static void store_flush_late(lws_sorted_usec_list_t *sul)
{
	(void)sul;
	store_flush(NULL);
}

void hub_registry_stop(struct hub *hub)
{
	(void)hub;
	store_flush(NULL);
	lws_sul_cancel(&B.sul);
}

int hub_store_frame(struct hub *hub, const char *gateway, int64_t seq,
		    const struct hub_store_reading *r, size_t n,
		    const char *lines, size_t lines_len,
		    const struct hub_store_group *g, size_t ng,
		    hub_redis_cb cb, void *arg)
{
	size_t glen = strlen(gateway), klen;
	hub_buf *a = &B.args;
	char key[HUB_KEY_MAX];

	if (!hub_redis_up(hub->redis) || !(klen = hub_key_gw_seqs(key, sizeof(key), gateway)))
		return -1;
	if (!B.hub) {
		B.hub = hub;
		hub_redis_set_flush(hub->redis, store_flush, NULL);
	}
	buf_arg(&B.keys, key, klen);   /* KEYS[1 + f] */
	buf_int(a, seq);
	buf_arg(a, gateway, glen);
	buf_arg(a, lines, lines_len);
	buf_int(a, (int64_t)n);
	for (size_t i = 0; i < n; i++) {
		buf_arg(a, r[i].device, strlen(r[i].device));
		buf_arg(a, r[i].ts, r[i].ts_len);
		buf_arg(a, r[i].data, r[i].data_len);
	}
	buf_int(a, (int64_t)ng);
	for (size_t i = 0; i < ng; i++) {
		buf_arg(a, g[i].type, strlen(g[i].type));
		buf_int(a, (int64_t)g[i].off + 1);            /* Lua: 1-based, inclusive */
		buf_int(a, (int64_t)(g[i].off + g[i].len));
	}
	B.nargs += 4 + 3 * n + 1 + 3 * ng;
	if (B.nframes == B.cap) {
		B.cap = B.cap ? B.cap * 2 : 16;
		B.cbs = hub_xrealloc(B.cbs, B.cap * sizeof(*B.cbs));
	}
	B.cbs[B.nframes].cb = cb;
	B.cbs[B.nframes].arg = arg;
	B.nframes++;
	B.nreadings += n;
	if (B.nframes == 1) {
		hub_redis_want_flush(hub->redis);
		lws_sul_schedule(hub->ctx, 0, &B.sul, store_flush_late, BATCH_LATE_US);
	}
	if (B.nframes >= BATCH_FRAMES || B.nreadings >= BATCH_READINGS || a->len >= BATCH_BYTES)
		store_flush(NULL);
	return 0;
}
