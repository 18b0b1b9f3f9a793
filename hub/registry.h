/*
 * registry.h - what the hub writes to Redis for gateways: the device registry
 * (announce, offline) and the telemetry store (one frame = one atomic Lua call
 * that checks the gateway's seq window, XADDs every accepted reading and the
 * frame's feed entry, and records the seq). Key layout: docs/streams.md.
 * Each call queues one command on the bus and returns 0 (cb runs once) or -1
 * when Redis is down (cb does not run).
 *
 * Admission: connect, announce and reannounce calls (the connect-storm path),
 * and the offline and limits of closing connections (the drop before it),
 * share a bound, registry-inflight calls at Redis at once. A call over it
 * waits in a FIFO in the hub, a copy of its arguments, and is sent when an
 * earlier one is answered; its cb runs then, later, never from inside the
 * call itself. The FIFO holds at most one connect or announce per gateway
 * connection (a connection is not read while one is pending), the offline
 * and limits of each connection that closed, and the re-announce's paced
 * share (REBUILD_INFLIGHT devices). While Redis is down nothing is queued
 * (-1; a fire-and-forget call is then dropped, as it always was).
 */
#ifndef HUB_REGISTRY_H
#define HUB_REGISTRY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "hub/redis.h"

struct hub;

/* The module (hub/module.h): hub->registry and its scripts, created by its start hook (before hub_redis_start()). */
struct hub_module;
extern const struct hub_module hub_registry_module;

/* Redis lost its data (hub/lease.c): the slot directory bits this process
 * set are set again at the next announces. */
void hub_registry_forget_slots(struct hub *hub);

/* A call waiting for room (opaque). A caller that may go away while its
 * call waits passes wait: *wait is set while the call is in the FIFO and
 * NULL once it left it (sent, failed or cancelled); it must stay valid
 * until then. */
struct hub_registry_call;

/* Takes a waiting call out of the FIFO: nothing is sent, and its cb runs
 * now with reply NULL (as for a failed command). No-op when *wait is NULL.
 * For a connection that closes: what it queued must not reach Redis after
 * its devices went offline. */
void hub_registry_cancel(struct hub *hub, struct hub_registry_call **wait);

struct hub_announce_item {
	const char *device;
	const char *type;
	const char *labels;   /* JSON object text */
	size_t labels_len;
};

/* Marks devices online, owned by conn (a connection id), with type and labels,
 * and adds them to the set of conn's run (docs/streams.md "Instance
 * leases"); presence only for devices whose state changed; devices taken
 * from another connection are named on the takeover channel (keys.h
 * HUB_CH_DEVTAKE).
 * Reply: an array with each device's stored rate-limit TAT (ms, "0": none). */
int hub_registry_announce(struct hub *hub, const char *gateway, const char *conn,
			  const struct hub_announce_item *items, size_t n,
			  hub_redis_cb cb, void *arg, struct hub_registry_call **wait);

/* The same for devices this hub already holds (hub/lease.c rebuilds the
 * registry after Redis lost it, or after this instance's lease was reaped):
 * a device another connection holds online is left alone and its reply
 * element is "-1" (it moved meanwhile; the local connection drops it). */
int hub_registry_reannounce(struct hub *hub, const char *gateway, const char *conn,
			    const struct hub_announce_item *items, size_t n,
			    hub_redis_cb cb, void *arg, struct hub_registry_call **wait);

/* Raises iot:gw:{gateway}:epoch to at least epoch (a live connection's,
 * after Redis lost it). Fire and forget. */
void hub_registry_epoch_floor(struct hub *hub, const char *gateway, int64_t epoch);

/* Marks devices offline, but only those still owned by conn (a takeover on any
 * instance moved the others), and keeps each device's rate-limit TAT (tats[i],
 * ms; 0 = none). Fire and forget, paced with the connects and announces (a
 * closing connection's call: the burst of a fleet that drops at once). */
void hub_registry_offline(struct hub *hub, const char *conn, const char *const *devices,
			  const int64_t *tats, size_t n);

struct hub_seen_item {
	const char *device;
	const char *conn;      /* the connection that thinks it owns it */
	int64_t tat_ms;        /* its rate-limit TAT, 0 = none */
};

/* Sets last_seen = now_ms and keeps the TAT of devices still owned by their
 * item's conn. The owning hub calls it about once a second for devices that
 * sent readings, instead of a write per frame. Reply: an array of the
 * 0-based indexes of items whose device conn no longer owns. cb may be NULL. */
int hub_registry_seen(struct hub *hub, int64_t now_ms, const struct hub_seen_item *items,
		      size_t n, hub_redis_cb cb, void *arg);

/* A new connection of gateway: INCRs its epoch, applies the connect rate
 * (rate/s, burst; rate 0 = unlimited) and reads its stored rate limits.
 * Reply: {epoch, allowed 1|0, retry ms, telemetry TAT, announce TAT, ack
 * TAT} (TATs as strings, "0" = none). */
int hub_registry_connect(struct hub *hub, const char *gateway, double rate, double burst,
			 hub_redis_cb cb, void *arg, struct hub_registry_call **wait);

/* Keeps the gateway's rate-limit TATs (ms; 0 = none): a later stored value
 * wins. Fire and forget; paced (a closing connection's) waits its turn with
 * the connects and announces, else it is sent now. */
void hub_registry_save_limits(struct hub *hub, const char *gateway, int64_t telemetry_tat,
			      int64_t announce_tat, int64_t ack_tat, bool paced);

struct hub_store_reading {
	const char *device;
	const char *ts;        /* decimal ms */
	size_t ts_len;
	const char *data;      /* compact JSON object */
	size_t data_len;
	const char *sig;       /* the device's signature (128 hex digits) or NULL */
	size_t sig_len;
	const char *anom;      /* its anomaly flags, a JSON array (docs/anomalies.md), or NULL */
	size_t anom_len;
};

/* The readings of one device type: lines[off, off+len). */
struct hub_store_group {
	const char *type;
	size_t off, len;
};

/* Stores one telemetry frame and publishes it live. lines holds one line per
 * reading, `device\ttype\tlabels\tbody\n`, grouped by device type (g):
 * it becomes the feed entry and, per group, the iot:live:raw:<type> message
 * (docs/dashboard.md). Reply: array {1, feed-id} when stored, {0} when the
 * seq was already durable (nothing stored or published), or an error.
 * Frames are batched: stored together at the end of the loop turn, by one
 * call of hub/lua/store.lua per ingest shard (hub/ingest.c, which
 * implements this). -1 (cb not called) while Redis is down or the shard
 * count is not known yet. */
int hub_store_frame(struct hub *hub, const char *gateway, int64_t seq,
		    const struct hub_store_reading *r, size_t n,
		    const char *lines, size_t lines_len,
		    const struct hub_store_group *g, size_t ng,
		    hub_redis_cb cb, void *arg);

#endif
