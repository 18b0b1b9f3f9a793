#include "hub/durability.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hub/events.h"
#include "hub/hub.h"
#include "hub/lifecycle.h"
#include "hub/log.h"
#include "hub/redis.h"
#include "hub/util.h"

#define FSYNC_RECHECK_MS  1000
#define REPEAT_LOG_US     (30 * 1000 * 1000)
#define PERSIST_RECHECK_MS (60 * 1000)
#define PERSIST_RETRY_MS   200

struct hub_durability {
	struct hub *hub;
	bool verified;             /* a Redis passed once: refusing no longer exits */
	bool refusing;             /* the last check failed */
	bool exiting;
	char last_why[192];
	int64_t logged_us;
	lws_sorted_usec_list_t sul_exit;
	/* Redis's own persistence (INFO persistence, CONFIG GET save):
	 * HUB_PERSIST_UNCHECKED until the first answer. */
	enum hub_persistence persist;
	bool persist_inflight;
	lws_sorted_usec_list_t sul_persist;
};

static const char *const persist_names[HUB__PERSIST_COUNT] = {
	"unchecked", "unknown", "none", "rdb", "aof",
};

const char *hub_persistence_name(enum hub_persistence p)
{
	return p < HUB__PERSIST_COUNT ? persist_names[p] : "unknown";
}

enum hub_persistence hub_durability_persistence(const struct hub *hub)
{
	return hub->durability ? hub->durability->persist : HUB_PERSIST_UNCHECKED;
}

static void persist_set(struct hub_durability *D, enum hub_persistence p, const char *why)
{
	const struct hub_config *cfg = &D->hub->cfg;

	if (p == D->persist)
		return;
	D->persist = p;
	switch (p) {
	case HUB_PERSIST_NONE:
		hub_warn("Redis %s:%d has no persistence (appendonly no, no save points): a Redis "
			 "restart loses every stored reading, command and registry entry; run it with "
			 "appendonly yes (docs/operations.md \"Durability\")", cfg->redis_host,
			 cfg->redis_port);
		break;
	case HUB_PERSIST_RDB:
		hub_warn("Redis %s:%d persists by RDB snapshots only (save %s): a crash loses what "
			 "was acked since the last snapshot; appendonly yes keeps it", cfg->redis_host,
			 cfg->redis_port, why);
		break;
	case HUB_PERSIST_AOF:
		hub_info("Redis %s:%d persistence: append-only file", cfg->redis_host,
			 cfg->redis_port);
		break;
	default:
		hub_info("Redis %s:%d persistence cannot be checked (%s)", cfg->redis_host,
			 cfg->redis_port, why);
		break;
	}
}

static void persist_tick(lws_sorted_usec_list_t *sul);

static void persist_schedule(struct hub_durability *D, int ms)
{
	lws_sul_schedule(D->hub->ctx, 0, &D->sul_persist, persist_tick, (lws_usec_t)ms * 1000);
}

static void save_cb(redisReply *r, void *arg)
{
	struct hub_durability *D = arg;

	D->persist_inflight = false;
	if (!r)
		return; /* the connection went: checked again when it is back */
	if (r->type == REDIS_REPLY_ARRAY && r->elements == 2 &&
	    r->element[1]->type == REDIS_REPLY_STRING) {
		const char *save = r->element[1]->str;
		persist_set(D, *save ? HUB_PERSIST_RDB : HUB_PERSIST_NONE, save);
	} else {
		persist_set(D, HUB_PERSIST_UNKNOWN, r->type == REDIS_REPLY_ERROR ? r->str :
			    "unexpected CONFIG GET save reply");
	}
}

/* The value of an INFO field ("name:value\r\n"), or -1. */
static long info_field(const char *info, const char *name)
{
	size_t n = strlen(name);

	for (const char *p = info; p && *p; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : NULL)
		if (!strncmp(p, name, n) && p[n] == ':')
			return strtol(p + n + 1, NULL, 10);
	return -1;
}

static void info_cb(redisReply *r, void *arg)
{
	struct hub_durability *D = arg;
	const char *argv[] = { "CONFIG", "GET", "save" };

	if (!r) {
		D->persist_inflight = false;
		return;
	}
	if (r->type != REDIS_REPLY_STRING) {
		D->persist_inflight = false;
		persist_set(D, HUB_PERSIST_UNKNOWN, r->type == REDIS_REPLY_ERROR ? r->str :
			    "unexpected INFO reply");
		return;
	}
	if (info_field(r->str, "aof_enabled") == 1) {
		D->persist_inflight = false;
		persist_set(D, HUB_PERSIST_AOF, NULL);
		return;
	}
	/* No AOF: the save points say whether RDB snapshots are taken (INFO
	 * does not show them; CONFIG may be refused, e.g. renamed away). */
	if (hub_redis_command_argv_slot(D->hub->redis, HUB_REDIS_SLOT_ANY, save_cb, D, 3, argv,
					NULL))
		D->persist_inflight = false;
}

static void persist_tick(lws_sorted_usec_list_t *sul)
{
	struct hub_durability *D = lws_container_of(sul, struct hub_durability, sul_persist);
	const char *argv[] = { "INFO", "persistence" };

	if (D->hub->draining)
		return;
	if (D->persist_inflight || !hub_redis_up(D->hub->redis)) {
		persist_schedule(D, PERSIST_RETRY_MS);
		return;
	}
	if (!hub_redis_command_argv_slot(D->hub->redis, HUB_REDIS_SLOT_ANY, info_cb, D, 2, argv,
					 NULL))
		D->persist_inflight = true;
	persist_schedule(D, D->persist_inflight ? PERSIST_RECHECK_MS : PERSIST_RETRY_MS);
}

/* Redis is (again) up: check its persistence soon (a gate's callback runs
 * before the connection counts as up, so from a timer). */
static void on_redis_ready(struct hub *hub, enum hub_event ev, const void *payload, void *ctx)
{
	persist_schedule(ctx, 1);
}

static void exit_tick(lws_sorted_usec_list_t *sul)
{
	struct hub_durability *D = lws_container_of(sul, struct hub_durability, sul_exit);

	D->hub->exit_code = 1;
	hub_begin_shutdown(D->hub);
}

/* The value of name in a CONFIG GET reply (name, value pairs), or NULL. */
static const char *config_value(const redisReply *r, const char *name)
{
	for (size_t i = 0; i + 1 < r->elements; i += 2)
		if (r->element[i]->type == REDIS_REPLY_STRING &&
		    r->element[i + 1]->type == REDIS_REPLY_STRING &&
		    !strcmp(r->element[i]->str, name))
			return r->element[i + 1]->str;
	return NULL;
}

static bool fsync_gate(redisReply *r, void *arg)
{
	struct hub_durability *D = arg;
	struct hub *hub = D->hub;
	const char *ao = NULL, *af = NULL;
	char why[192];

	if (r->type == REDIS_REPLY_ARRAY) {
		ao = config_value(r, "appendonly");
		af = config_value(r, "appendfsync");
	}
	if (ao && af && !strcmp(ao, "yes") && !strcmp(af, "always")) {
		if (D->refusing)
			hub_info("ack-durability fsync: Redis %s:%d runs appendonly yes and appendfsync "
				 "always again: serving", hub->cfg.redis_host, hub->cfg.redis_port);
		D->verified = true;
		D->refusing = false;
		D->last_why[0] = '\0';
		return true;
	}
	if (r->type == REDIS_REPLY_ERROR)
		snprintf(why, sizeof(why), "cannot be checked (CONFIG GET: %.100s)", r->str);
	else
		snprintf(why, sizeof(why), "runs appendonly %.16s and appendfsync %.16s",
			 ao ? ao : "(unknown)", af ? af : "(unknown)");
	D->refusing = true;
	if (!D->verified) {
		if (!D->exiting) {
			D->exiting = true;
			hub_err("ack-durability fsync: Redis %s:%d %s; fsync needs appendonly yes and "
				"appendfsync always (redis.conf, or CONFIG SET appendonly yes and CONFIG "
				"SET appendfsync always): refusing to start", hub->cfg.redis_host,
				hub->cfg.redis_port, why);
			lws_sul_schedule(hub->ctx, 0, &D->sul_exit, exit_tick, 1);
		}
		return false;
	}
	int64_t now = hub_mono_us();
	if (strcmp(why, D->last_why) || now - D->logged_us > REPEAT_LOG_US) {
		snprintf(D->last_why, sizeof(D->last_why), "%s", why);
		D->logged_us = now;
		hub_err("ack-durability fsync: Redis %s:%d %s; fsync needs appendonly yes and "
			"appendfsync always: not serving (not ready, telemetry answered unavailable) "
			"until it does", hub->cfg.redis_host, hub->cfg.redis_port, why);
	}
	return false;
}

void hub_durability_init(struct hub *hub)
{
	const struct hub_config *cfg = &hub->cfg;
	struct hub_durability *D = hub_xcalloc(1, sizeof(*D));

	D->hub = hub;
	hub->durability = D;
	hub_observe(hub, HUB_EV_REDIS_READY, on_redis_ready, D);
	switch (cfg->ack_mode) {
	case HUB_ACK_ACCEPTED:
		hub_info("ack-durability accepted: a frame is acked once Redis took it");
		break;
	case HUB_ACK_FSYNC: {
		const char *argv[] = { "CONFIG", "GET", "appendonly", "appendfsync" };
		hub_info("ack-durability fsync: a frame is acked once Redis took it, and Redis must "
			 "run appendonly yes and appendfsync always (checked on connect and every %d ms)",
			 FSYNC_RECHECK_MS);
		hub_redis_add_gate(hub->redis, 4, argv, fsync_gate, D, FSYNC_RECHECK_MS);
		break;
	}
	case HUB_ACK_REPLICATED:
		hub_info("ack-durability replicated: a frame is acked once WAIT saw %d replica%s "
			 "confirm it within %d ms", cfg->ack_replicas, cfg->ack_replicas == 1 ? "" : "s",
			 cfg->ack_wait_ms);
		break;
	}
}

void hub_durability_free(struct hub *hub)
{
	struct hub_durability *D = hub->durability;

	if (!D)
		return;
	free(D); /* after the loop: its timer went with the context */
	hub->durability = NULL;
}
