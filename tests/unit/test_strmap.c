/* Unit tests of the string hash map. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <cmocka.h>

#include "hub/strmap.h"

static void count_cb(const char *key, void *value, void *arg)
{
	(void)key;
	*(size_t *)arg += (size_t)(uintptr_t)value;
}

static void test_put_get_del(void **state)
{
	hub_strmap m = { 0 };
	int a, b;

	(void)state;
	assert_null(hub_strmap_get(&m, "x", 1)); /* empty map, no buckets yet */
	assert_null(hub_strmap_del(&m, "x", 1));
	assert_null(hub_strmap_put(&m, "t-17", 4, &a));
	assert_ptr_equal(hub_strmap_get(&m, "t-17", 4), &a);
	/* Keys are compared by length too: a prefix is another key. */
	assert_null(hub_strmap_get(&m, "t-1", 3));
	assert_null(hub_strmap_get(&m, "t-17x", 4 + 1));
	/* Not NUL-terminated keys work. */
	assert_ptr_equal(hub_strmap_get(&m, "t-17 trailing", 4), &a);
	assert_ptr_equal(hub_strmap_put(&m, "t-17", 4, &b), &a);
	assert_ptr_equal(hub_strmap_get(&m, "t-17", 4), &b);
	assert_int_equal(m.count, 1);
	assert_ptr_equal(hub_strmap_del(&m, "t-17", 4), &b);
	assert_int_equal(m.count, 0);
	assert_null(hub_strmap_get(&m, "t-17", 4));
	hub_strmap_free(&m);
}

static void test_growth_keeps_everything(void **state)
{
	hub_strmap m = { 0 };
	char key[32];
	size_t sum = 0, want = 0;

	(void)state;
	for (uintptr_t i = 1; i <= 5000; i++) {
		int n = snprintf(key, sizeof(key), "device-%lu", (unsigned long)i);
		assert_null(hub_strmap_put(&m, key, (size_t)n, (void *)i));
		want += i;
	}
	assert_int_equal(m.count, 5000);
	assert_true(m.nbuckets >= 5000);
	for (uintptr_t i = 1; i <= 5000; i++) {
		int n = snprintf(key, sizeof(key), "device-%lu", (unsigned long)i);
		assert_int_equal((uintptr_t)hub_strmap_get(&m, key, (size_t)n), i);
	}
	hub_strmap_foreach(&m, count_cb, &sum);
	assert_int_equal(sum, want);
	for (uintptr_t i = 1; i <= 5000; i += 2) {
		int n = snprintf(key, sizeof(key), "device-%lu", (unsigned long)i);
		assert_int_equal((uintptr_t)hub_strmap_del(&m, key, (size_t)n), i);
	}
	assert_int_equal(m.count, 2500);
	assert_null(hub_strmap_get(&m, "device-1", 8));
	assert_int_equal((uintptr_t)hub_strmap_get(&m, "device-2", 8), 2);
	hub_strmap_free(&m);
	assert_int_equal(m.count, 0);
	assert_null(m.buckets);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_put_get_del),
		cmocka_unit_test(test_growth_keeps_everything),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
