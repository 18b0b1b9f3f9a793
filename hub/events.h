/*
 * events.h - how modules hear about each other without including each
 * other: a module that has news emits an event with a typed payload; the
 * modules that care observe it (at start, in the module table's order, and
 * are called in that order). The payload is borrowed for the call.
 * Observers run synchronously on the loop, inside the emitter's call stack:
 * they must not free what the emitter is using (take a reference instead).
 */
#ifndef HUB_EVENTS_H
#define HUB_EVENTS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct hub;
struct hub_link;

enum hub_event {
	/* NULL. The command connection to Redis is up (again) and its key
	 * layout checked. */
	HUB_EV_REDIS_READY,
	/* const struct hub_ev_lease *. This run's lease was renewed. */
	HUB_EV_LEASE_RENEWED,
	/* const struct hub_ev_announced *. Devices were announced (or
	 * re-announced after Redis lost them) on a local link and are held by
	 * it: the registry says so, and the link's `announced` reply is queued
	 * ahead of anything an observer sends. */
	HUB_EV_DEVICES_ANNOUNCED,
	/* const struct hub_ev_command_ack *. A gateway acknowledged a command. */
	HUB_EV_COMMAND_ACK,
	/* const struct hub_ev_readings *. Readings were stored (once per frame,
	 * never for a resend Redis already had). */
	HUB_EV_READINGS_STORED,
	/* const struct hub_ev_revoked *. Credentials were revoked (here or on
	 * another instance): live connections they cover must close. */
	HUB_EV_REVOKED,
	HUB_EV__COUNT
};

struct hub_ev_lease {
	/* Redis lost this run's registry entries (it restarted empty, was
	 * flushed, or the lease had expired): the devices of live links must
	 * be announced again. */
	bool rebuild;
};

struct hub_ev_revoked {
	bool jti;                  /* value is a token id, else a token subject */
	const char *value;
};

struct hub_ev_announced {
	struct hub_link *link;
	const char *const *devices;
	size_t n;
};

struct gw_command_ack;
struct hub_ev_command_ack {
	struct hub_link *link;
	const struct gw_command_ack *ack;
};

/* One stored reading's numeric fields, for the aggregates. */
struct hub_ev_field {
	const char *name;
	size_t len;
	double value;
};

/* Per-device memory one observer may use as a cache (the aggregates keep
 * the device's current partial there). The observer sets p and drop; the
 * device's owner calls hub_slot_drop before it frees the slot. */
struct hub_slot {
	void *p;
	void (*drop)(struct hub_slot *s);
};

static inline void hub_slot_drop(struct hub_slot *s)
{
	if (s->drop)
		s->drop(s);
	s->p = NULL;
	s->drop = NULL;
}

struct hub_ev_reading {
	const char *device, *type;
	const char *labels;        /* compact JSON as announced */
	size_t labels_len;
	struct hub_slot *slot;     /* the device's, valid for the call */
	int64_t ts;
	const struct hub_ev_field *fields;
	size_t nfields;
};

struct hub_ev_readings {
	const struct hub_ev_reading *v;
	size_t n;
};

typedef void (*hub_observer_fn)(struct hub *hub, enum hub_event ev, const void *payload,
				void *ctx);

#define HUB_OBSERVERS_MAX 8

struct hub_observers {
	struct {
		hub_observer_fn fn;
		void *ctx;
	} of[HUB_EV__COUNT][HUB_OBSERVERS_MAX];
	unsigned n[HUB_EV__COUNT];
};

/* At start (a module's start hook). Aborts past HUB_OBSERVERS_MAX per event
 * (a programming error). */
void hub_observe(struct hub *hub, enum hub_event ev, hub_observer_fn fn, void *ctx);

void hub_emit(struct hub *hub, enum hub_event ev, const void *payload);

/* Forgets every observer (after the modules are freed). */
void hub_events_free(struct hub *hub);

#endif
