/*
 * bus_probe - the hub's Redis bus (hub/redis.c) on the lws loop, driven line
 * by line from stdin, for the cluster tests (tests/cluster/test_bus.py): the
 * bus against a real Redis Cluster whose slots migrate and whose nodes die,
 * without the key layout (which does not run on a cluster yet).
 *
 *   cmd ID ARG...          one command (arguments without spaces), routed
 *                          by its key: "ID ok <reply>", "ID err <error>",
 *                          "ID null" (Redis lost) or "ID refused" (-1)
 *   incr ID KEY N          the test script (INCRBY KEYS[1] N) by EVALSHA
 *   load N PREFIX          keeps one INCR (odd rounds: the script) in flight
 *                          on each of N keys PREFIX:{i} until "stop", which
 *                          prints "key K ok=.. err=.. null=.. refused=.."
 *                          per key, then "stopped"
 *   sub CH / unsub CH      a sharded channel: "msg CH PAYLOAD", "active CH 0|1"
 *   spub ID CH PAYLOAD     SPUBLISH
 *   status                 "status up=.. cluster=.. shards=.. moved=.. ask=..
 *                          refreshes=.. pending=.."
 *   quit
 * Arguments: the hub's own flags (--redis ..., --redis-timeout-ms ...).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <libwebsockets.h>

#include "hub/config.h"
#include "hub/hub.h"
#include "hub/log.h"
#include "hub/redis.h"
#include "hub/util.h"

#define MAX_KEYS   64
#define MAX_CHANS  16

static const char incr_lua[] = "return redis.call('INCRBY', KEYS[1], ARGV[1])";

struct lkey {
	char name[64];
	bool inflight;
	unsigned long ok, err, null, refused, round;
};

static struct probe {
	struct hub hub;
	int script;
	char line[8192];
	size_t len;
	bool loading;
	int nkeys;
	struct lkey keys[MAX_KEYS];
	struct hub_redis_channel *chans[MAX_CHANS];
	lws_sorted_usec_list_t sul_tick, sul_quit;
} P;

static void out(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void out(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	putchar('\n');
	fflush(stdout);
}

static void on_cmd_reply(redisReply *r, void *arg)
{
	char *id = arg;

	if (!r)
		out("%s null", id);
	else if (r->type == REDIS_REPLY_ERROR)
		out("%s err %s", id, r->str);
	else if (r->type == REDIS_REPLY_INTEGER)
		out("%s ok %lld", id, r->integer);
	else if (r->type == REDIS_REPLY_NIL)
		out("%s ok nil", id);
	else if (r->type == REDIS_REPLY_ARRAY)
		out("%s ok [%zu]", id, r->elements);
	else
		out("%s ok %s", id, r->str);
	free(id);
}

static void send_cmd(const char *id, int argc, const char **argv)
{
	char *tag = hub_xstrdup(id);

	if (hub_redis_command_argv(P.hub.redis, on_cmd_reply, tag, argc, argv, NULL)) {
		out("%s refused", id);
		free(tag);
	}
}

static void on_load_reply(redisReply *r, void *arg)
{
	struct lkey *k = arg;

	k->inflight = false;
	if (!r)
		k->null++;
	else if (r->type == REDIS_REPLY_ERROR) {
		k->err++;
		hub_warn("probe: %s: %s", k->name, r->str);
	} else
		k->ok++;
}

static void load_tick(lws_sorted_usec_list_t *sul)
{
	for (int i = 0; P.loading && i < P.nkeys; i++) {
		struct lkey *k = &P.keys[i];
		const char *incr[2] = { "INCR", k->name };
		const char *eval[5] = { "EVALSHA", hub_redis_script_sha(P.hub.redis, P.script), "1",
					k->name, "1" };
		int rc;

		if (k->inflight)
			continue;
		rc = k->round++ & 1 ?
		     hub_redis_command_argv(P.hub.redis, on_load_reply, k, 5, eval, NULL) :
		     hub_redis_command_argv(P.hub.redis, on_load_reply, k, 2, incr, NULL);
		if (rc)
			k->refused++;
		else
			k->inflight = true;
	}
	/* Also the heartbeat that keeps libev's timer armed (docs/pitfalls.md). */
	lws_sul_schedule(P.hub.ctx, 0, sul, load_tick, 2 * 1000);
}

static void on_msg(const char *channel, const char *payload, size_t len, void *arg)
{
	(void)arg;
	out("msg %s %.*s", channel, (int)len, payload);
}

static void on_state(struct hub_redis_channel *ch, bool active, void *arg)
{
	(void)arg;
	out("active %s %d", hub_redis_channel_name(ch), active ? 1 : 0);
}

/* As the hub stops: the bus first (pending callbacks get NULL), then the
 * first context destroy, which only breaks the libev loop. */
static void quit_cb(lws_sorted_usec_list_t *sul)
{
	(void)sul;
	P.loading = false;
	lws_sul_cancel(&P.sul_tick);
	for (int i = 0; i < MAX_CHANS; i++) {
		hub_redis_channel_put(P.chans[i]);
		P.chans[i] = NULL;
	}
	hub_redis_stop(P.hub.redis);
	P.hub.exiting = true;
	lws_context_destroy(P.hub.ctx);
}

static void run_line(char *line)
{
	const char *argv[64];
	int argc = 0;

	for (char *t = strtok(line, " "); t && argc < 64; t = strtok(NULL, " "))
		argv[argc++] = t;
	if (!argc)
		return;
	if (!strcmp(argv[0], "cmd") && argc >= 3) {
		send_cmd(argv[1], argc - 2, argv + 2);
	} else if (!strcmp(argv[0], "incr") && argc == 4) {
		const char *a[5] = { "EVALSHA", hub_redis_script_sha(P.hub.redis, P.script), "1",
				     argv[2], argv[3] };
		send_cmd(argv[1], 5, a);
	} else if (!strcmp(argv[0], "load") && argc == 3) {
		P.nkeys = atoi(argv[1]);
		if (P.nkeys > MAX_KEYS)
			P.nkeys = MAX_KEYS;
		memset(P.keys, 0, sizeof(P.keys));
		for (int i = 0; i < P.nkeys; i++)
			snprintf(P.keys[i].name, sizeof(P.keys[i].name), "%s:{%d}", argv[2], i);
		P.loading = true;
		out("loading");
	} else if (!strcmp(argv[0], "stop")) {
		P.loading = false;
		for (int i = 0; i < P.nkeys; i++) {
			const struct lkey *k = &P.keys[i];
			out("key %s ok=%lu err=%lu null=%lu refused=%lu inflight=%d", k->name, k->ok,
			    k->err, k->null, k->refused, k->inflight);
		}
		out("stopped");
	} else if (!strcmp(argv[0], "sub") && argc == 2) {
		for (int i = 0; i < MAX_CHANS; i++)
			if (!P.chans[i]) {
				P.chans[i] = hub_redis_schannel_get(P.hub.redis, argv[1], on_msg,
								    on_state, NULL);
				break;
			}
	} else if (!strcmp(argv[0], "unsub") && argc == 2) {
		for (int i = 0; i < MAX_CHANS; i++)
			if (P.chans[i] && !strcmp(hub_redis_channel_name(P.chans[i]), argv[1])) {
				hub_redis_channel_put(P.chans[i]);
				P.chans[i] = NULL;
			}
	} else if (!strcmp(argv[0], "spub") && argc == 4) {
		char *tag = hub_xstrdup(argv[1]);

		if (hub_redis_spublish(P.hub.redis, argv[2], argv[3], strlen(argv[3]), on_cmd_reply,
				       tag)) {
			out("%s refused", argv[1]);
			free(tag);
		}
	} else if (!strcmp(argv[0], "status")) {
		const struct hub_metrics *m = &P.hub.metrics;

		out("status up=%d cluster=%d shards=%d moved=%llu ask=%llu refreshes=%llu pending=%zu",
		    hub_redis_up(P.hub.redis), hub_redis_cluster(P.hub.redis),
		    hub_redis_shards(P.hub.redis), (unsigned long long)m->redis_moved_total,
		    (unsigned long long)m->redis_ask_total,
		    (unsigned long long)m->redis_map_refreshes_total, hub_redis_pending(P.hub.redis));
	} else if (!strcmp(argv[0], "quit")) {
		lws_sul_schedule(P.hub.ctx, 0, &P.sul_quit, quit_cb, 1);
	} else {
		out("? %s", argv[0]);
	}
}

static int stdin_cb(struct lws *wsi, enum lws_callback_reasons reason, void *user, void *in,
		    size_t len)
{
	ssize_t n;
	char *nl;

	if (reason != LWS_CALLBACK_RAW_RX_FILE)
		return 0;
	n = read(0, P.line + P.len, sizeof(P.line) - 1 - P.len);
	if (n <= 0) {
		if (!P.hub.exiting)
			lws_sul_schedule(P.hub.ctx, 0, &P.sul_quit, quit_cb, 1);
		return -1;
	}
	P.len += (size_t)n;
	P.line[P.len] = '\0';
	while ((nl = strchr(P.line, '\n'))) {
		*nl = '\0';
		run_line(P.line);
		P.len -= (size_t)(nl + 1 - P.line);
		memmove(P.line, nl + 1, P.len + 1);
	}
	if (P.len == sizeof(P.line) - 1)
		P.len = 0; /* a line too long: dropped */
	return 0;
}

int main(int argc, char **argv)
{
	static struct lws_protocols protocols[3] = {
		{ "probe-stdin", stdin_cb, 0, 0, 0, NULL, 0 },
	};
	struct lws_context_creation_info info;
	lws_sock_file_fd_type fd;
	char err[512];

	if (hub_config_load(&P.hub.cfg, argc, argv, err, sizeof(err))) {
		fprintf(stderr, "bus_probe: %s\n", err);
		return 2;
	}
	hub_log_threshold = hub_log_parse_level(P.hub.cfg.log_level);
	protocols[1] = hub_redis_protocol;
	lws_set_log_level(LLL_ERR, NULL);
	memset(&info, 0, sizeof(info));
	info.options = LWS_SERVER_OPTION_EXPLICIT_VHOSTS | LWS_SERVER_OPTION_LIBEV;
	info.user = &P.hub;
	P.hub.ctx = lws_create_context(&info);
	if (!P.hub.ctx)
		return 1;
	info.port = CONTEXT_PORT_NO_LISTEN_SERVER;
	info.protocols = protocols;
	P.hub.vh = lws_create_vhost(P.hub.ctx, &info);
	fd.filefd = dup(0);
	if (!P.hub.vh || !lws_adopt_descriptor_vhost(P.hub.vh, LWS_ADOPT_RAW_FILE_DESC, fd,
						     "probe-stdin", NULL)) {
		fprintf(stderr, "bus_probe: no vhost or stdin\n");
		return 1;
	}
	P.hub.redis = hub_redis_new(&P.hub);
	P.script = hub_redis_add_script(P.hub.redis, incr_lua);
	hub_redis_start(P.hub.redis);
	lws_sul_schedule(P.hub.ctx, 0, &P.sul_tick, load_tick, 2 * 1000);
	out("ready");
	lws_cancel_service(P.hub.ctx);
	while (!P.hub.exiting)
		if (lws_service(P.hub.ctx, 0) < 0)
			break;
	lws_context_destroy(P.hub.ctx);
	hub_redis_free(P.hub.redis);
	hub_config_free(&P.hub.cfg);
	return 0;
}
