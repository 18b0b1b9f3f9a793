/*
 * lifecycle.c - the hub's modules brought up in table order and taken down
 * in reverse (hub/module.h), and the graceful shutdown: stop accepting,
 * quiesce, drain, stop the modules, flush Redis, end the loop.
 */
#include "hub/lifecycle.h"

#include <stdio.h>

#include "hub/hub.h"
#include "hub/listener.h"
#include "hub/log.h"
#include "hub/loop.h"
#include "hub/module.h"
#include "hub/redis.h"
#include "hub/util.h"

#define DRAIN_TICK_US   (50 * 1000)
#define DRAIN_GRACE_US  (5 * 1000 * 1000)

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
