#include "hub/registry.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hub/hub.h"
#include "hub/util.h"

/* KEYS[1] = iot:gw:<gw>:seqs, KEYS[2] = iot:feed
 * ARGV = seq, gw, window, device maxlen, feed maxlen, now ms, lines, n,
 *        then n x (device, ts, data), then m, then m x (type, from, to):
 *        lines[from..to] are the readings of that device type, published on
 *        iot:live:raw:<type> behind the frame's feed position.
 * Costs per frame: ZADD NX (the dedupe), one XADD per reading and one for
 * the feed, one PUBLISH per device type, TTL (EXPIRE once every 256 seqs).
 * The window is trimmed to `window` members only when seq is a multiple of
 * 64 (so it holds window..window+64 seqs): ZREMRANGEBYRANK on a 4,096-member
 * sorted set was a fifth of Redis's CPU per 1-reading frame. A seq older than
 * the whole window is stored again (at least once: a frame resent that late
 * was more likely never stored than acked and lost).
 * last_seen is flushed separately. Publishing here, atomically with the
 * XADDs, makes live order equal feed order (docs/dashboard.md). */
static const char store_lua[] =
	"if redis.call('ZADD', KEYS[1], 'NX', ARGV[1], ARGV[1]) == 0 then return {0} end\n"
	"if tonumber(ARGV[1]) % 64 == 0 then\n"
	"  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -tonumber(ARGV[3]) - 1)\n"
	"end\n"
	"local n = tonumber(ARGV[8])\n"
	"for i = 0, n - 1 do\n"
	"  redis.call('XADD', 'iot:tm:' .. ARGV[9 + 3 * i], 'MAXLEN', '~', ARGV[4], '*',\n"
	"             'ts', ARGV[10 + 3 * i], 'data', ARGV[11 + 3 * i],\n"
	"             'gw', ARGV[2], 'seq', ARGV[1])\n"
	"end\n"
	"local id = '0-0'\n"
	"if tonumber(ARGV[5]) > 0 then\n"
	"  id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*',\n"
	"                  'gw', ARGV[2], 'seq', ARGV[1], 'readings', ARGV[7])\n"
	"end\n"
	"local b = 9 + 3 * n\n"
	"for j = 0, tonumber(ARGV[b]) - 1 do\n"
	"  local k = b + 1 + 3 * j\n"
	"  redis.call('PUBLISH', 'iot:live:raw:' .. ARGV[k],\n"
	"             id .. '\\n' .. string.sub(ARGV[7], tonumber(ARGV[k + 1]), tonumber(ARGV[k + 2])))\n"
	"end\n"
	"if tonumber(ARGV[1]) % 256 == 0 or redis.call('TTL', KEYS[1]) < 0 then\n"
	"  redis.call('EXPIRE', KEYS[1], 2592000)\n"
	"end\n"
	"return {1, id}\n";

/* ARGV = gateway, conn, instance, now ms, n, then n x (device, type, labels).
 * Publishes one presence event line per device (ids and type names are
 * [A-Za-z0-9._:-], so they need no JSON escaping). */
static const char announce_lua[] =
	"local n = tonumber(ARGV[5])\n"
	"local ev = {}\n"
	"for i = 0, n - 1 do\n"
	"  local dev, typ = ARGV[6 + 3 * i], ARGV[7 + 3 * i]\n"
	"  local key = 'iot:dev:' .. dev\n"
	"  local old = redis.call('HGET', key, 'type')\n"
	"  if old and old ~= typ then redis.call('SREM', 'iot:type:' .. old, dev) end\n"
	"  redis.call('HSET', key, 'type', typ, 'labels', ARGV[8 + 3 * i],\n"
	"             'gateway', ARGV[1], 'conn', ARGV[2], 'instance', ARGV[3],\n"
	"             'online', '1', 'last_seen', ARGV[4], 'announced_at', ARGV[4])\n"
	"  redis.call('SADD', 'iot:devices', dev)\n"
	"  redis.call('SADD', 'iot:type:' .. typ, dev)\n"
	"  ev[#ev + 1] = dev .. '\\t' .. typ .. '\\t' .. ARGV[8 + 3 * i] ..\n"
	"    '\\t\"device\":\"' .. dev .. '\",\"online\":true,\"at\":' .. ARGV[4] ..\n"
	"    ',\"gateway\":\"' .. ARGV[1] .. '\",\"device_type\":\"' .. typ .. '\"\\n'\n"
	"end\n"
	"redis.call('PUBLISH', 'iot:live:presence', '\\n' .. table.concat(ev))\n"
	"return n\n";

/* ARGV = conn, now ms, then devices. Publishes presence for the devices it
 * marks offline. */
static const char offline_lua[] =
	"local ev = {}\n"
	"for i = 3, #ARGV do\n"
	"  local dev = ARGV[i]\n"
	"  local key = 'iot:dev:' .. dev\n"
	"  local h = redis.call('HMGET', key, 'conn', 'type', 'labels', 'gateway')\n"
	"  if h[1] == ARGV[1] then\n"
	"    redis.call('HSET', key, 'online', '0', 'last_seen', ARGV[2])\n"
	"    ev[#ev + 1] = dev .. '\\t' .. h[2] .. '\\t' .. h[3] ..\n"
	"      '\\t\"device\":\"' .. dev .. '\",\"online\":false,\"at\":' .. ARGV[2] ..\n"
	"      ',\"gateway\":\"' .. h[4] .. '\",\"device_type\":\"' .. h[2] .. '\"\\n'\n"
	"  end\n"
	"end\n"
	"if #ev > 0 then redis.call('PUBLISH', 'iot:live:presence', '\\n' .. table.concat(ev)) end\n"
	"return #ev\n";

/* ARGV = now ms, then devices: last_seen of devices that sent readings. */
static const char seen_lua[] =
	"for i = 2, #ARGV do\n"
	"  redis.call('HSET', 'iot:dev:' .. ARGV[i], 'last_seen', ARGV[1])\n"
	"end\n"
	"return #ARGV - 1\n";

static int script_store, script_announce, script_offline, script_seen;

void hub_registry_init(struct hub *hub)
{
	script_store = hub_redis_add_script(hub->redis, store_lua);
	script_announce = hub_redis_add_script(hub->redis, announce_lua);
	script_offline = hub_redis_add_script(hub->redis, offline_lua);
	script_seen = hub_redis_add_script(hub->redis, seen_lua);
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

static void resp_arg(const char *p, size_t n)
{
	hub_buf_reserve(&resp, n + 32);
	resp.data[resp.len++] = '$';
	resp.len += hub_fmt_i64(resp.data + resp.len, (int64_t)n);
	resp.data[resp.len++] = '\r';
	resp.data[resp.len++] = '\n';
	memcpy(resp.data + resp.len, p, n);
	resp.len += n;
	resp.data[resp.len++] = '\r';
	resp.data[resp.len++] = '\n';
}

static void resp_str(const char *s)
{
	resp_arg(s, strlen(s));
}

static void resp_int(int64_t v)
{
	char num[24];

	resp_arg(num, hub_fmt_i64(num, v));
}

/* Starts EVALSHA <script> <nkeys> followed by nargs more arguments. */
static void resp_eval(struct hub *hub, int script, int nkeys, size_t nargs)
{
	resp_head(3 + nargs);
	resp_arg("EVALSHA", 7);
	resp_arg(hub_redis_script_sha(hub->redis, script), 40);
	resp_int(nkeys);
}

static int resp_send(struct hub *hub, hub_redis_cb cb, void *arg)
{
	int rc = hub_redis_command_formatted(hub->redis, cb, arg, resp.data, resp.len);

	if (resp.cap > 256 * 1024)
		hub_buf_free(&resp); /* keep a huge command's buffer no longer */
	return rc;
}

void hub_registry_seen(struct hub *hub, int64_t now_ms,
		       const char *const *devices, size_t n)
{
	if (!n)
		return;
	resp_eval(hub, script_seen, 0, 1 + n);
	resp_int(now_ms);
	for (size_t i = 0; i < n; i++)
		resp_str(devices[i]);
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

void hub_registry_offline(struct hub *hub, const char *conn,
			  const char *const *devices, size_t n)
{
	resp_eval(hub, script_offline, 0, 2 + n);
	resp_str(conn);
	resp_int(hub_now_ms());
	for (size_t i = 0; i < n; i++)
		resp_str(devices[i]);
	resp_send(hub, NULL, NULL);
}

int hub_store_frame(struct hub *hub, const char *gateway, int64_t seq,
		    const struct hub_store_reading *r, size_t n,
		    const char *lines, size_t lines_len,
		    const struct hub_store_group *g, size_t ng,
		    hub_redis_cb cb, void *arg)
{
	size_t glen = strlen(gateway);

	resp_eval(hub, script_store, 2, 11 + 3 * n + 3 * ng);
	/* KEYS[1] = iot:gw:<gateway>:seqs */
	hub_buf_reserve(&resp, glen + 48);
	resp.data[resp.len++] = '$';
	resp.len += hub_fmt_i64(resp.data + resp.len, (int64_t)(glen + 12));
	memcpy(resp.data + resp.len, "\r\niot:gw:", 9);
	resp.len += 9;
	memcpy(resp.data + resp.len, gateway, glen);
	resp.len += glen;
	memcpy(resp.data + resp.len, ":seqs\r\n", 7);
	resp.len += 7;
	resp_arg("iot:feed", 8);
	resp_int(seq);
	resp_arg(gateway, glen);
	resp_int(hub->cfg.seq_window);
	resp_int(hub->cfg.device_stream_maxlen);
	resp_int(hub->cfg.feed_stream_maxlen);
	resp_int(hub_now_ms());
	resp_arg(lines, lines_len);
	resp_int((int64_t)n);
	for (size_t i = 0; i < n; i++) {
		resp_str(r[i].device);
		resp_arg(r[i].ts, r[i].ts_len);
		resp_arg(r[i].data, r[i].data_len);
	}
	resp_int((int64_t)ng);
	for (size_t i = 0; i < ng; i++) {
		resp_str(g[i].type);
		resp_int((int64_t)g[i].off + 1);            /* Lua: 1-based, inclusive */
		resp_int((int64_t)(g[i].off + g[i].len));
	}
	return resp_send(hub, cb, arg);
}
