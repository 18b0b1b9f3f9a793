/*
 * events.c - the observer lists of hub/events.h and the link directory of
 * hub/link.h.
 */
#include "hub/events.h"

#include <stdlib.h>

#include "hub/hub.h"
#include "hub/link.h"
#include "hub/log.h"

void hub_observe(struct hub *hub, enum hub_event ev, hub_observer_fn fn, void *ctx)
{
	struct hub_observers *o = &hub->observers;

	if (o->n[ev] == HUB_OBSERVERS_MAX) {
		hub_err("events: more than %d observers of event %d", HUB_OBSERVERS_MAX, (int)ev);
		abort();
	}
	o->of[ev][o->n[ev]].fn = fn;
	o->of[ev][o->n[ev]++].ctx = ctx;
}

void hub_emit(struct hub *hub, enum hub_event ev, const void *payload)
{
	const struct hub_observers *o = &hub->observers;

	for (unsigned i = 0; i < o->n[ev]; i++)
		o->of[ev][i].fn(hub, ev, payload, o->of[ev][i].ctx);
}

/* ---- links (hub/link.h) -------------------------------------------------- */

void hub_links_provide(struct hub *hub, hub_link_lookup_fn lookup, void *ctx)
{
	hub->link_lookup = lookup;
	hub->link_lookup_ctx = ctx;
}

struct hub_link *hub_link_for_device(struct hub *hub, const char *device)
{
	return hub->link_lookup ? hub->link_lookup(hub->link_lookup_ctx, device) : NULL;
}
