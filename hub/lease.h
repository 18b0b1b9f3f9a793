/*
 * lease.h - this hub process's lease in Redis, the reaping of dead ones,
 * and the rebuild of the registry after Redis lost it (docs/streams.md
 * "Instance leases" and "When Redis comes back empty").
 *
 * Every lease-renew-ms the hub renews its lease (iot:leases: run id ->
 * expiry, Redis's clock, lease-ttl-ms ahead) and checks iot:epoch, a token
 * the first hub sets on an empty Redis. One script does both. When the
 * token is not the one this hub saw last (Redis restarted empty, was
 * flushed or replaced) or its own lease was gone or had expired (reaped by
 * another instance after missed renewals), the hub re-announces the devices
 * of all its live connections (gw_reannounce_all). When a lease has
 * expired, this hub (if it has renewed its own without a gap for a whole
 * lease-ttl-ms, so that an outage of its own is never taken for another
 * instance's death) claims the dead run and marks its devices offline in
 * batches: only those the dead run still owned, with the offline script's
 * presence event.
 *
 * All functions run on the loop; none may be called before hub_redis_new().
 */
#ifndef HUB_LEASE_H
#define HUB_LEASE_H

#include <stdbool.h>

struct hub;

/* Registers the scripts and starts the renewal timer; before
 * hub_redis_start(). hub->run_token must be set. */
void hub_lease_init(struct hub *hub);

/* The command connection to Redis is (again) up: renew and check the epoch
 * now, and do not reap for a lease-ttl-ms. From the connect gate. */
void hub_lease_connected(struct hub *hub);

/* Shutdown, after the gateways were drained and before Redis is
 * disconnected: stops the timers and gives the lease up (removed when this
 * run holds no device any more, else expired at once for a reaper).
 * Returns true when it queued that (the first call with Redis up): let the
 * loop write it before disconnecting. */
bool hub_lease_stop(struct hub *hub);

#endif
