/*
 * agg.h - tumbling-window aggregates (1s, 10s, 1m) that merge across hub
 * instances (docs/dashboard.md, "Aggregates").
 *
 * Ingest side: every instance folds the readings it stores (it observes
 * HUB_EV_READINGS_STORED, hub/events.h) into 1-second
 * partial states per device and publishes them on iot:live:agg shortly after
 * each second ends. Merge side: while this instance has aggregate
 * subscribers, it merges the partials of every instance into the windows its
 * subscribers asked for and, aggregate-grace-ms after a window ends, hands
 * the merged per-device states to its emit callback (the dashboard stream).
 *
 * State per field is (count, min, max, sum, last, last_ts): every piece
 * merges associatively, so 10s and 1m windows are merges of 1s partials.
 */
#ifndef HUB_AGG_H
#define HUB_AGG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <jansson.h>

#include "hub/util.h"

struct hub;
struct agg;
struct hub_slot;

enum agg_window { AGG_1S, AGG_10S, AGG_1M, AGG__COUNT };

extern const int64_t agg_window_ms[AGG__COUNT];
extern const char *const agg_window_names[AGG__COUNT];

struct agg_field {
	char *name;
	int64_t count;
	double min, max, sum, last;
	int64_t last_ts;
};

/* One device's state for one window. */
struct agg_state {
	char *device;
	char *type;
	json_t *labels;            /* merge side: object (owned reference) */
	char *labels_text;         /* ingest side: compact JSON as announced */
	int64_t start;
	size_t nfields, cap;
	struct agg_field *fields;
	struct hub_slot *cache;    /* ingest: the one device slot pointing here */
	struct agg_state *due_next; /* ingest: next partial of the same second */
};

/* Merged windows: the states of window w starting at start, one per device
 * (borrowed for the call). */
typedef void (*agg_emit_fn)(void *ctx, enum agg_window w, int64_t start,
			    struct agg_state **v, size_t n);

/* The module (hub/module.h): creates hub->agg. */
struct hub_module;
extern const struct hub_module agg_module;

/* Needs the hub's loop and Redis adapter (not yet connected). */
struct agg *agg_new(struct hub *hub);
void agg_set_emit(struct agg *ag, agg_emit_fn emit, void *ctx);
void agg_stop(struct agg *ag);   /* timers; while the loop still exists */
void agg_free(struct agg *ag);   /* memory; after the loop is gone */

/* ---- ingest -------------------------------------------------------------- */

/* Folds one value of field (name[0..len)) at time ts into st. */
void agg_state_add(struct agg_state *st, const char *name, size_t len, double v, int64_t ts);

/* ---- merge side ---------------------------------------------------------- */

/* The dashboard stream takes (want = true) or drops a need for window w; the
 * merge runs only for windows someone needs. */
void agg_want(struct agg *ag, enum agg_window w, bool want);

/* A message from iot:live:agg (the stream module owns that subscription). */
void agg_on_partials(struct agg *ag, const char *payload, size_t len);

/* The iot:live:agg subscription became active (or stopped being): windows
 * that started before it was active are incomplete here and not emitted. */
void agg_set_active(struct agg *ag, bool active);

/* Appends `"metrics":{...}` for st's fields to out (JSON). */
void agg_metrics_json(const struct agg_state *st, hub_buf *out);

/* Merges src's fields into dst (same window). */
void agg_state_merge(struct agg_state *dst, const struct agg_state *src);

/* Frees what st owns (not st). */
void agg_state_clear(struct agg_state *st);

#endif
