/* Unit tests of the keepalive lists (hub/keepalive.h): PING after the
 * interval, hang-up after the timeout, a PONG restarts the wait, O(1) per
 * event (the lists stay in deadline order without searching). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include "hub/keepalive.h"

#define S 1000000LL

struct seen {
	struct hub_ka_entry *pinged[16], *hung[16];
	int np, nh;
};

static void on_ping(struct hub_ka_entry *e, void *arg)
{
	struct seen *s = arg;

	s->pinged[s->np++] = e;
}

static void on_hangup(struct hub_ka_entry *e, void *arg)
{
	struct seen *s = arg;

	s->hung[s->nh++] = e;
}

static unsigned expire(struct hub_ka *ka, int64_t now, struct seen *s)
{
	return hub_ka_expire(ka, now, 1000, on_ping, on_hangup, s);
}

static void test_ping_then_hangup(void **state)
{
	struct hub_ka ka;
	struct hub_ka_entry e;
	struct seen s;

	(void)state;
	memset(&e, 0, sizeof(e));
	memset(&s, 0, sizeof(s));
	hub_ka_init(&ka, 30 * S, 45 * S);     /* interval 30 s, timeout 75 s */
	assert_int_equal(hub_ka_next_due(&ka), 0);
	hub_ka_valid(&ka, &e, 100 * S);
	assert_int_equal(hub_ka_next_due(&ka), 130 * S);
	assert_int_equal(expire(&ka, 129 * S, &s), 0);
	assert_int_equal(expire(&ka, 130 * S, &s), 1);
	assert_int_equal(s.np, 1);
	assert_ptr_equal(s.pinged[0], &e);
	assert_int_equal(e.ping_owed, 1);
	assert_int_equal(e.where, HUB_KA_PINGED);
	/* no PONG: hung up 75 s after the last sign of life */
	assert_int_equal(hub_ka_next_due(&ka), 175 * S);
	assert_int_equal(expire(&ka, 174 * S, &s), 0);
	assert_int_equal(expire(&ka, 175 * S, &s), 1);
	assert_int_equal(s.nh, 1);
	assert_ptr_equal(s.hung[0], &e);
	assert_int_equal(e.where, HUB_KA_NONE);
	assert_int_equal(ka.tracked, 0);
	assert_int_equal(hub_ka_next_due(&ka), 0);
}

static void test_pong_restarts_the_wait(void **state)
{
	struct hub_ka ka;
	struct hub_ka_entry e;
	struct seen s;

	(void)state;
	memset(&e, 0, sizeof(e));
	memset(&s, 0, sizeof(s));
	hub_ka_init(&ka, 1 * S, 2 * S);
	hub_ka_valid(&ka, &e, 0);
	assert_int_equal(expire(&ka, 1 * S, &s), 1);
	hub_ka_valid(&ka, &e, 1 * S + 500);   /* the PONG */
	assert_int_equal(e.where, HUB_KA_IDLE);
	assert_int_equal(e.ping_owed, 0);
	assert_int_equal(expire(&ka, 2 * S, &s), 0);   /* next PING at 2 s + 500 us */
	assert_int_equal(expire(&ka, 2 * S + 500, &s), 1);
	assert_int_equal(s.np, 2);
	assert_int_equal(s.nh, 0);
}

static void test_remove_is_idempotent(void **state)
{
	struct hub_ka ka;
	struct hub_ka_entry a, b, c;
	struct seen s;

	(void)state;
	memset(&a, 0, sizeof(a));
	memset(&b, 0, sizeof(b));
	memset(&c, 0, sizeof(c));
	memset(&s, 0, sizeof(s));
	hub_ka_init(&ka, 10 * S, 5 * S);
	hub_ka_remove(&ka, &a);   /* never tracked */
	hub_ka_valid(&ka, &a, 0);
	hub_ka_valid(&ka, &b, 1);
	hub_ka_valid(&ka, &c, 2);
	hub_ka_remove(&ka, &b);
	hub_ka_remove(&ka, &b);
	assert_int_equal(ka.tracked, 2);
	assert_int_equal(expire(&ka, 20 * S, &s), 2);
	assert_ptr_equal(s.pinged[0], &a);
	assert_ptr_equal(s.pinged[1], &c);
	hub_ka_remove(&ka, &a);   /* from the pinged list */
	assert_int_equal(expire(&ka, 100 * S, &s), 1);
	assert_ptr_equal(s.hung[0], &c);
	assert_int_equal(ka.tracked, 0);
	assert_null(ka.idle.head);
	assert_null(ka.pinged.head);
	assert_null(ka.pinged.tail);
}

/* Deadlines come out in order, across both lists, and at most max a run. */
static void test_order_and_batches(void **state)
{
	struct hub_ka ka;
	struct hub_ka_entry e[8];
	struct seen s;

	(void)state;
	memset(e, 0, sizeof(e));
	memset(&s, 0, sizeof(s));
	hub_ka_init(&ka, 10 * S, 1 * S);   /* a short hang-up wait */
	for (int i = 0; i < 8; i++)
		hub_ka_valid(&ka, &e[i], i * S);
	/* e0..e3 pinged at 10..13 s: two a run */
	assert_int_equal(hub_ka_expire(&ka, 13 * S, 2, on_ping, on_hangup, &s), 2);
	assert_int_equal(hub_ka_expire(&ka, 13 * S, 2, on_ping, on_hangup, &s), 2);
	assert_int_equal(s.np, 4);
	for (int i = 0; i < 4; i++)
		assert_ptr_equal(s.pinged[i], &e[i]);
	/* at 14.5 s: e0..e3 (hang-up due 14 s) go before e4 (PING due 14 s
	 * ties: the hang-up first), e5 is not due */
	assert_int_equal(expire(&ka, 14 * S + S / 2, &s), 5);
	assert_int_equal(s.nh, 4);
	assert_int_equal(s.np, 5);
	assert_ptr_equal(s.pinged[4], &e[4]);
	assert_int_equal(hub_ka_next_due(&ka), 15 * S);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_ping_then_hangup),
		cmocka_unit_test(test_pong_restarts_the_wait),
		cmocka_unit_test(test_remove_is_idempotent),
		cmocka_unit_test(test_order_and_batches),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
