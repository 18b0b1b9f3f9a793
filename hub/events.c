/*
 * events.c - the observer lists of hub/events.h.
 */
#include "hub/events.h"

#include <stdlib.h>

#include "hub/hub.h"
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
