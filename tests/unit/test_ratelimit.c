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

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_burst_then_limit),
		cmocka_unit_test(test_refill_caps_at_burst),
		cmocka_unit_test(test_unlimited_and_oversized),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
