/*
 * keepalive.h - WebSocket liveness (PING after ping-interval-s without a
 * PONG, hang-up ping-timeout-s after the last one) for many connections,
 * O(1) per connection event. No lws: hub/loop.c drives it from one timer.
 *
 * lws 4.1.6's own keepalive (the vhost's retry_and_idle_policy) keeps every
 * connection's validity timer in the one sorted list of all the loop's
 * timers, and a new deadline (now + interval) is later than every other, so
 * each connect and each PONG walks the whole list: a ramp or a reconnect
 * storm of N connections costs N^2/2 list steps (half of a hub's CPU in a
 * 10,000-gateway storm, bench/results/2026-12-06-w1-100k.md). Here every
 * connection waits in one of two FIFO lists, each with one fixed delay, so
 * each list is sorted by deadline by construction: appending is O(1) and
 * the timer only looks at the two heads.
 */
#ifndef HUB_KEEPALIVE_H
#define HUB_KEEPALIVE_H

#include <stdint.h>

enum { HUB_KA_NONE, HUB_KA_IDLE, HUB_KA_PINGED };

/* One connection's place; zeroed = not tracked. Lives in the connection's
 * lws per-session data. */
struct hub_ka_entry {
	struct hub_ka_entry *prev, *next;
	int64_t due_us;
	void *owner;         /* the caller's (the wsi) */
	uint8_t where;       /* HUB_KA_* */
	uint8_t ping_owed;   /* a PING is to be written at the next writeable */
};

struct hub_ka_list {
	struct hub_ka_entry *head, *tail;
};

struct hub_ka {
	int64_t ping_us;     /* idle this long after the last PONG: PING */
	int64_t hangup_us;   /* no PONG this long after that PING: hang up */
	struct hub_ka_list idle, pinged;
	unsigned long long tracked;
};

/* ping_us >= 1, hangup_us >= 1 (ping-timeout-s - ping-interval-s). */
void hub_ka_init(struct hub_ka *ka, int64_t ping_us, int64_t hangup_us);

/* The connection is alive at now (established, or a PONG came): its PING is
 * due at now + ping_us. Tracks an untracked entry (owner set by the caller). */
void hub_ka_valid(struct hub_ka *ka, struct hub_ka_entry *e, int64_t now);

/* Stops tracking e; a no-op for an entry not tracked. */
void hub_ka_remove(struct hub_ka *ka, struct hub_ka_entry *e);

/* The earliest deadline, or 0 when nothing is tracked. */
int64_t hub_ka_next_due(const struct hub_ka *ka);

/* Handles at most max entries whose deadline is <= now, earliest first: a
 * connection whose PING is due gets ping_owed and moves to the pinged list
 * (deadline now + hangup_us), then ping(e, arg); a pinged one past its
 * deadline is removed, then hangup(e, arg). Returns how many it handled. */
unsigned hub_ka_expire(struct hub_ka *ka, int64_t now, unsigned max,
		       void (*ping)(struct hub_ka_entry *, void *),
		       void (*hangup)(struct hub_ka_entry *, void *), void *arg);

#endif
