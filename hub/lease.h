/*
 * lease.h - this hub process's lease in Redis, the reaping of dead ones,
 * and the rebuild of the registry after Redis lost it (docs/streams.md
 * "Instance leases" and "When Redis comes back empty").
 *
 * Every lease-renew-ms the hub renews its lease (iot:{hub}:leases: run id ->
 * expiry, Redis's clock, lease-ttl-ms ahead) and checks iot:{hub}:epoch, a token
 * the first hub sets on an empty Redis. One script does both, run by a
 * thread of its own on a blocking connection of its own while the event
 * loop keeps turning (a busy loop keeps its lease, a stuck one does not:
 * hub/lease.c "the renewer thread"); the loop acts on what it found. When the
 * token is not the one this hub saw last (Redis restarted empty, was
 * flushed or replaced) or its own lease was gone or had expired (reaped by
 * another instance after missed renewals), the hub re-announces the devices
 * of all its live connections (HUB_EV_LEASE_RENEWED with rebuild, which the
 * gateway module observes). When a lease has
 * expired, this hub (if it has renewed its own without a gap for a whole
 * lease-ttl-ms, so that an outage of its own is never taken for another
 * instance's death) claims the dead run (in the {hub} slot, with the
 * bitmap of the slots its sets were written in), walks those slots and
 * marks their devices offline in batches, one slot per call on a cluster:
 * only those the dead run still owned, with the offline script's presence
 * event. A hub whose own lease expired while a reaper claims it
 * re-announces once the claim is gone.
 */
#ifndef HUB_LEASE_H
#define HUB_LEASE_H

/* The module (hub/module.h): hub->lease. Needs hub->run_token; renews on
 * HUB_EV_REDIS_READY, gives the lease up in its stop hook. */
struct hub_module;
extern const struct hub_module hub_lease_module;

#endif
