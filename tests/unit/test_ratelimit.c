/* Unit tests of the token bucket. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "hub/ratelimit.h"

static void test_burst_then_limit(void **state)
{
	hub_bucket b;

	(void)state;
	hub_bucket_init(&b, 5, 0);
	for (int i = 0; i < 5; i++)
		assert_int_equal(hub_bucket_take(&b, 10, 5, 1, 0), 0);
	/* Empty: at 10/s the next token is 100 ms away. */
	assert_int_equal(hub_bucket_take(&b, 10, 5, 1, 0), 100);
	/* 50 ms later: still 50 ms to go. */
	assert_int_equal(hub_bucket_take(&b, 10, 5, 1, 50000), 50);
	/* 100 ms after empty: one token. */
	assert_int_equal(hub_bucket_take(&b, 10, 5, 1, 100000), 0);
	assert_int_equal(hub_bucket_take(&b, 10, 5, 1, 100000), 100);
}

static void test_refill_caps_at_burst(void **state)
{
	hub_bucket b;

	(void)state;
	hub_bucket_init(&b, 3, 0);
	assert_int_equal(hub_bucket_take(&b, 1000, 3, 3, 0), 0);
	/* An hour later the bucket holds burst tokens, not 3.6 million. */
	int64_t t = 3600LL * 1000000;
	for (int i = 0; i < 3; i++)
		assert_int_equal(hub_bucket_take(&b, 1000, 3, 1, t), 0);
	assert_true(hub_bucket_take(&b, 1000, 3, 1, t) > 0);
}

static void test_unlimited_and_oversized(void **state)
{
	hub_bucket b;

	(void)state;
	hub_bucket_init(&b, 1, 0);
	for (int i = 0; i < 1000; i++)
		assert_int_equal(hub_bucket_take(&b, 0, 1, 1, 0), 0);
	/* More than the burst can never be taken at once: the wait is for a
	 * full bucket, and the answer is at least 1 ms. */
	hub_bucket_init(&b, 2, 0);
	assert_int_equal(hub_bucket_take(&b, 1000, 2, 5, 0), 1);
	/* Time going backwards does not add tokens. */
	hub_bucket_init(&b, 1, 1000000);
	assert_int_equal(hub_bucket_take(&b, 1, 1, 1, 1000000), 0);
	assert_int_equal(hub_bucket_take(&b, 1, 1, 1, 0), 1000);
}

static void test_tat_round_trip_and_merge(void **state)
{
	hub_bucket a, b;
	int64_t wall = 1700000000000LL;

	(void)state;
	/* Full: TAT is now. */
	hub_bucket_init(&a, 10, 0);
	assert_int_equal(hub_bucket_tat_ms(&a, 5, 10, 0, wall), wall);
	/* 6 of 10 taken at 5/s: full again in 1.2 s. */
	for (int i = 0; i < 6; i++)
		assert_int_equal(hub_bucket_take(&a, 5, 10, 1, 0), 0);
	assert_int_equal(hub_bucket_tat_ms(&a, 5, 10, 0, wall), wall + 1200);
	/* A fresh bucket elsewhere (another connection, another instance),
	 * merged with that TAT 200 ms later, holds what a holds: 4 + 1. */
	hub_bucket_init(&b, 10, 500000);
	hub_bucket_merge_tat(&b, wall + 1200, 5, 10, 500000, wall + 200);
	for (int i = 0; i < 5; i++)
		assert_int_equal(hub_bucket_take(&b, 5, 10, 1, 500000), 0);
	assert_true(hub_bucket_take(&b, 5, 10, 1, 500000) > 0);
	/* Merging an older (earlier) TAT never refills. */
	hub_bucket_merge_tat(&b, wall, 5, 10, 500000, wall + 200);
	assert_true(hub_bucket_take(&b, 5, 10, 1, 500000) > 0);
	/* A TAT far in the future is a debt: the wait covers it. */
	hub_bucket_init(&b, 10, 0);
	hub_bucket_merge_tat(&b, wall + 10000, 5, 10, 0, wall);
	assert_int_equal(hub_bucket_take(&b, 5, 10, 1, 0), 8200);
	/* Unlimited: no TAT, merging does nothing. */
	assert_int_equal(hub_bucket_tat_ms(&b, 0, 10, 0, wall), 0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_burst_then_limit),
		cmocka_unit_test(test_refill_caps_at_burst),
		cmocka_unit_test(test_unlimited_and_oversized),
		cmocka_unit_test(test_tat_round_trip_and_merge),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
