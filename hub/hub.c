#include "hub/hub.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "hub/listener.h"
#include "hub/log.h"
#include "hub/loop.h"
#include "hub/module.h"
#include "hub/redis.h"
#include "hub/util.h"

#define DRAIN_TICK_US   (50 * 1000)
#define DRAIN_GRACE_US  (5 * 1000 * 1000)

static int load_jwt_key(struct hub *hub, char **key, size_t *len, char *err, size_t errlen)
{
	if (!hub->cfg.jwt_key) {
		*key = NULL;
		*len = 0;
		return 0;
	}
	*key = hub_read_file(hub->cfg.jwt_key, 65536, len);
	if (!*key) {
		snprintf(err, errlen, "jwt-key %s: %s", hub->cfg.jwt_key, strerror(errno));
		return -1;
	}
	/* A secret file usually ends with a newline that is not part of it. */
	if (!strcmp(hub->cfg.jwt_alg, "HS256"))
		while (*len && ((*key)[*len - 1] == '\n' || (*key)[*len - 1] == '\r'))
			(*key)[--*len] = '\0';
	return 0;
}

int hub_reload(struct hub *hub, bool initial)
{
	char err[512] = "";
	schema_set *set;
	hub_auth *auth;
	char *key = NULL;
	size_t keylen = 0;

	set = schema_set_load_dir(hub->cfg.schemas, err, sizeof(err));
	if (!set)
		goto fail;
	if (!schema_set_count(set)) {
		snprintf(err, sizeof(err), "schemas %s: no device types found", hub->cfg.schemas);
		schema_set_free(set);
		set = NULL;
		goto fail;
	}
	if (hub->jwt_ephemeral) {
		key = hub_xmalloc(hub->jwt_key_len + 1);
		memcpy(key, hub->jwt_key, hub->jwt_key_len + 1);
		keylen = hub->jwt_key_len;
	} else if (load_jwt_key(hub, &key, &keylen, err, sizeof(err))) {
		goto fail;
	}
	auth_config ac = {
		.alg = !strcmp(hub->cfg.jwt_alg, "RS256") ? AUTH_ALG_RS256 :
		       !strcmp(hub->cfg.jwt_alg, "ES256") ? AUTH_ALG_ES256 : AUTH_ALG_HS256,
		.jwt_key = key,
		.jwt_key_len = keylen,
		.issuer = hub->cfg.jwt_issuer,
		.audience = hub->cfg.jwt_audience,
		.leeway_s = hub->cfg.jwt_leeway_s,
		.api_keys_file = hub->cfg.api_keys,
	};
	auth = auth_new(&ac, err, sizeof(err));
	if (!auth)
		goto fail;

	schema_set_free(hub->schemas);
	hub->schemas = set;
	hub->schemas_gen++;
	auth_free(hub->auth);
	hub->auth = auth;
	free(hub->jwt_key);
	hub->jwt_key = key;
	hub->jwt_key_len = keylen;
	if (!initial)
		hub_info("reloaded %zu device types from %s", schema_set_count(set),
			 hub->cfg.schemas);
	return 0;

fail:
	schema_set_free(set);
	free(key);
	if (initial)
		fprintf(stderr, "iot-hub: %s\n", err);
	else
		hub_err("reload failed, keeping the previous configuration: %s", err);
	return -1;
}

/* ---- the modules' lifecycle ---------------------------------------------- */

int hub_modules_start(struct hub *hub, char *err, size_t errlen)
{
	for (size_t i = 0; i < hub->nmodules; i++) {
		const struct hub_module *m = hub->modules[i];
		char why[256] = "";

		if (!m->start || !m->start(hub, why, sizeof(why)))
			continue;
		snprintf(err, errlen, "%s: %s", m->name, why);
		while (i--) {
			m = hub->modules[i];
			if (m->stop)
				m->stop(hub);
		}
		hub_modules_free(hub);
		return -1;
	}
	return 0;
}

void hub_modules_free(struct hub *hub)
{
	for (size_t i = hub->nmodules; i--;)
		if (hub->modules[i]->free)
			hub->modules[i]->free(hub);
}

static void modules_stop(struct hub *hub)
{
	for (size_t i = hub->nmodules; i--;)
		if (hub->modules[i]->stop)
			hub->modules[i]->stop(hub);
}

static void drain_tick(lws_sorted_usec_list_t *sul)
{
	struct hub *hub = lws_container_of(sul, struct hub, sul_drain);
	bool late = hub_mono_us() > hub->drain_deadline_us;
	unsigned open = 0;

	for (size_t i = 0; i < hub->nmodules; i++)
		if (hub->modules[i]->drain)
			open += hub->modules[i]->drain(hub, late);
	if (open && hub_mono_us() < hub->drain_deadline_us + 1000000) {
		lws_sul_schedule(hub->ctx, 0, &hub->sul_drain, drain_tick, DRAIN_TICK_US);
		return;
	}
	/* Stop the modules (the lease is given up, the last offline scripts
	 * queued), then let what they queued reach Redis before the
	 * connection goes (a few ms; capped). */
	if (!hub->modules_stopped) {
		hub_info("drained; stopping");
		hub->modules_stopped = true;
		modules_stop(hub);
	}
	if (hub_redis_pending(hub->redis) && hub_mono_us() < hub->drain_deadline_us + 1000000) {
		lws_sul_schedule(hub->ctx, 0, &hub->sul_drain, drain_tick, DRAIN_TICK_US / 5);
		return;
	}
	hub_redis_stop(hub->redis);
	hub_loop_stop(hub);
}

void hub_begin_shutdown(struct hub *hub)
{
	if (hub->draining)
		return;
	hub->draining = true;
	hub_info("shutting down: draining %zu gateway connections",
		 hub->metrics.gateway_connections);
	hub_listener_close(hub->listener);
	for (size_t i = 0; i < hub->nmodules; i++)
		if (hub->modules[i]->quiesce)
			hub->modules[i]->quiesce(hub);
	hub->drain_deadline_us = hub_mono_us() + DRAIN_GRACE_US;
	lws_sul_schedule(hub->ctx, 0, &hub->sul_drain, drain_tick, 1);
}
