/*
 * module.h - the shape every part of the hub has: the HTTP front, the device
 * registry, the gateway, dashboard, aggregate and command flows, the
 * operator API. hub/main.c lists them in one table, in start order; the hub
 * starts them in that order once the loop and the Redis adapter exist, and
 * takes them down in reverse. A module keeps its state in an object hanging
 * off struct hub (created by start, freed by free), never in file statics,
 * and reaches other modules only through the interfaces they expose to
 * everyone (routes, WebSocket endpoints, observers in hub/events.h).
 *
 * Every hook may be NULL. docs/hacking.md shows a module end to end.
 */
#ifndef HUB_MODULE_H
#define HUB_MODULE_H

#include <stdbool.h>
#include <stddef.h>
#include <libwebsockets.h>

struct hub;

struct hub_module {
	const char *name;
	/* The lws protocol the module serves, filled in before the loop
	 * exists (the HTTP module's comes first: lws binds every new
	 * connection to protocols[0]). */
	void (*protocol)(const struct hub *hub, struct lws_protocols *out);
	/* Creates the module's object and registers its routes, endpoints,
	 * observers, scripts, subscriptions and timers. The loop exists and
	 * Redis is not connected yet (it connects once every module started).
	 * Returns 0, or -1 with a message in err. */
	int (*start)(struct hub *hub, char *err, size_t errlen);
	/* Shutdown begins: take no new work (the listener is closed). */
	void (*quiesce)(struct hub *hub);
	/* Shutdown: closes what it can gracefully; returns how many
	 * connections are still open. Called every tick until every module
	 * returns 0 or the grace period ends; force is true once it has. */
	unsigned (*drain)(struct hub *hub, bool force);
	/* Timers and subscriptions; the loop still runs, Redis is still up
	 * (pending Redis callbacks then get NULL replies). */
	void (*stop)(struct hub *hub);
	/* Memory, after the loop is gone. */
	void (*free)(struct hub *hub);
};

#endif
