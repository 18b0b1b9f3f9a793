#include "hub/durability.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hub/hub.h"
#include "hub/lifecycle.h"
#include "hub/log.h"
#include "hub/redis.h"
#include "hub/util.h"

#define FSYNC_RECHECK_MS  1000
#define REPEAT_LOG_US     (30 * 1000 * 1000)

struct hub_durability {
	struct hub *hub;
	bool verified;             /* a Redis passed once: refusing no longer exits */
	bool refusing;             /* the last check failed */
	bool exiting;
	char last_why[192];
	int64_t logged_us;
	lws_sorted_usec_list_t sul_exit;
};

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
