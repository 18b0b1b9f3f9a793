/*
 * anomaly.h - the anomaly module (docs/anomalies.md): an online model per
 * device and marked field (hub/anomaly.h), scored on the telemetry path
 * before the store so the flags are stored with the reading, kept in
 * memory per device on the instance that receives its readings and saved
 * to Redis (iot:dev:{<device>}:anom, a hash field per marked field, with a
 * TTL) once a second when it changed, so another instance that takes the
 * device over goes on with it. Devices whose type marks no field cost one
 * NULL test per reading.
 */
#ifndef HUB_PROTO_ANOMALY_H
#define HUB_PROTO_ANOMALY_H

#include <stddef.h>
#include <stdint.h>
#include <jansson.h>

#include "hub/util.h"
#include "protocols/schema.h"

struct hub;
struct hub_module;

/* The length of `,"anomalies":`, before the array anom_check appends. */
#define ANOM_PREFIX_LEN (sizeof(",\"anomalies\":") - 1)

extern const struct hub_module anom_module;

/* Scores the marked numeric fields of data (one accepted reading of device
 * id[0..len) of type t, at ts ms) and updates their models. When a field is
 * flagged, appends `,"anomalies":[{"field":…,"kind":…,"score":…},…]` to
 * out and returns the number of flags; else appends nothing and returns 0.
 * Counts iot_hub_anomalies_total. Call on the loop thread. */
size_t anom_check(struct hub *hub, const char *id, size_t len, const schema_type *t,
		  int64_t ts, const json_t *data, hub_buf *out);

/* A device of type t is being announced here: its models are read from
 * Redis now (when t marks a field and they are not in memory), so that on
 * one Redis they are known before the announce is answered. */
void anom_prefetch(struct hub *hub, const char *id, const schema_type *t);

#endif
