/*
 * keepalive.c - two FIFO lists of connections (keepalive.h).
 */
#include "hub/keepalive.h"

#include <stddef.h>

static void list_unlink(struct hub_ka_list *l, struct hub_ka_entry *e)
{
	if (e->prev)
		e->prev->next = e->next;
	else
		l->head = e->next;
	if (e->next)
		e->next->prev = e->prev;
	else
		l->tail = e->prev;
	e->prev = e->next = NULL;
}

static void list_append(struct hub_ka_list *l, struct hub_ka_entry *e)
{
	e->next = NULL;
	e->prev = l->tail;
	if (l->tail)
		l->tail->next = e;
	else
		l->head = e;
	l->tail = e;
}

static struct hub_ka_list *list_of(struct hub_ka *ka, const struct hub_ka_entry *e)
{
	return e->where == HUB_KA_IDLE ? &ka->idle : &ka->pinged;
}

void hub_ka_init(struct hub_ka *ka, int64_t ping_us, int64_t hangup_us)
{
	ka->ping_us = ping_us > 0 ? ping_us : 1;
	ka->hangup_us = hangup_us > 0 ? hangup_us : 1;
	ka->idle.head = ka->idle.tail = NULL;
	ka->pinged.head = ka->pinged.tail = NULL;
	ka->tracked = 0;
}

void hub_ka_remove(struct hub_ka *ka, struct hub_ka_entry *e)
{
	if (e->where == HUB_KA_NONE)
		return;
	list_unlink(list_of(ka, e), e);
	e->where = HUB_KA_NONE;
	e->ping_owed = 0;
	ka->tracked--;
}

void hub_ka_valid(struct hub_ka *ka, struct hub_ka_entry *e, int64_t now)
{
	/* A PING written and not yet answered stays owed only until its PONG:
	 * a PONG clears it, as does a PING not yet written (nothing to ask). */
	hub_ka_remove(ka, e);
	/* Deadlines in a list never decrease: the clock is monotonic and the
	 * delay fixed. The max() keeps that if a caller's clock steps back. */
	int64_t due = now + ka->ping_us;
	if (ka->idle.tail && due < ka->idle.tail->due_us)
		due = ka->idle.tail->due_us;
	e->due_us = due;
	e->where = HUB_KA_IDLE;
	list_append(&ka->idle, e);
	ka->tracked++;
}

int64_t hub_ka_next_due(const struct hub_ka *ka)
{
	const struct hub_ka_entry *a = ka->idle.head, *b = ka->pinged.head;

	if (!a)
		return b ? b->due_us : 0;
	if (!b)
		return a->due_us;
	return a->due_us < b->due_us ? a->due_us : b->due_us;
}

unsigned hub_ka_expire(struct hub_ka *ka, int64_t now, unsigned max,
		       void (*ping)(struct hub_ka_entry *, void *),
		       void (*hangup)(struct hub_ka_entry *, void *), void *arg)
{
	unsigned n = 0;

	while (n < max) {
		struct hub_ka_entry *a = ka->idle.head, *b = ka->pinged.head;

		if (b && b->due_us <= now && (!a || b->due_us <= a->due_us)) {
			hub_ka_remove(ka, b);
			n++;
			hangup(b, arg);
		} else if (a && a->due_us <= now) {
			list_unlink(&ka->idle, a);
			int64_t due = now + ka->hangup_us;
			if (ka->pinged.tail && due < ka->pinged.tail->due_us)
				due = ka->pinged.tail->due_us;
			a->due_us = due;
			a->where = HUB_KA_PINGED;
			a->ping_owed = 1;
			list_append(&ka->pinged, a);
			n++;
			ping(a, arg);
		} else {
			break;
		}
	}
	return n;
}
