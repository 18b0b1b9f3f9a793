/* Unit tests of the rollup partials, buckets and usage tiers
 * (hub/rollup_core.h). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include "hub/keys.h"
#include "hub/rollup_core.h"

static void part_of(struct ru_part *p, const double *v, const int64_t *ts, size_t n)
{
	memset(p, 0, sizeof(*p));
	for (size_t i = 0; i < n; i++)
		ru_part_add(p, v[i], ts[i]);
}

static void assert_part_equal(const struct ru_part *a, const struct ru_part *b)
{
	assert_int_equal(a->count, b->count);
	assert_true(a->sum == b->sum);
	assert_true(a->sumsq == b->sumsq);
	assert_true(a->min == b->min);
	assert_true(a->max == b->max);
	assert_int_equal(a->first_ts, b->first_ts);
	assert_true(a->first == b->first);
	assert_int_equal(a->last_ts, b->last_ts);
	assert_true(a->last == b->last);
}

static void test_add_and_stats(void **state)
{
	const double v[] = { 2, 4, 4, 4, 5, 5, 7, 9 };
	const int64_t ts[] = { 50, 10, 20, 30, 40, 60, 70, 80 };
	struct ru_part p;

	(void)state;
	part_of(&p, v, ts, 8);
	assert_int_equal(p.count, 8);
	assert_true(p.sum == 40);
	assert_true(p.sumsq == 232);
	assert_true(p.min == 2 && p.max == 9);
	assert_int_equal(p.first_ts, 10);
	assert_true(p.first == 4);
	assert_int_equal(p.last_ts, 80);
	assert_true(p.last == 9);
	assert_true(ru_part_mean(&p) == 5);
	assert_true(ru_part_stddev(&p) == 2); /* population */
}

static void test_merge_is_order_free(void **state)
{
	const double v[] = { 1.5, -3, 8.25, 8.25, 0, 2 };
	const int64_t ts[] = { 100, 100, 90, 200, 200, 150 };
	struct ru_part whole, a, b, ab, ba;

	(void)state;
	part_of(&whole, v, ts, 6);
	part_of(&a, v, ts, 3);
	part_of(&b, v + 3, ts + 3, 3);
	ab = a;
	ru_part_merge(&ab, &b);
	ba = b;
	ru_part_merge(&ba, &a);
	assert_part_equal(&ab, &ba);
	assert_part_equal(&ab, &whole);
	/* equal timestamps: first takes the smaller value, last the larger */
	assert_int_equal(whole.last_ts, 200);
	assert_true(whole.last == 8.25);
	/* merging an empty partial changes nothing; into an empty copies */
	struct ru_part empty = { 0 }, c = whole;
	ru_part_merge(&c, &empty);
	assert_part_equal(&c, &whole);
	ru_part_merge(&empty, &whole);
	assert_part_equal(&empty, &whole);
}

static void test_nonfinite_ignored(void **state)
{
	struct ru_part p = { 0 };

	(void)state;
	ru_part_add(&p, 1.0 / 0.0, 1);
	ru_part_add(&p, 0.0 / 0.0, 1);
	assert_int_equal(p.count, 0);
}

static void test_text_round_trip(void **state)
{
	const double v[] = { 0.1, 1e300, -2.5e-7 };
	const int64_t ts[] = { 1733490000123, 1733490000124, 1733490000000 };
	struct ru_part p, q;
	hub_buf b = { 0 };

	(void)state;
	part_of(&p, v, ts, 3);
	ru_part_format(&p, &b);
	assert_int_equal(ru_part_parse(b.data, b.len, &q), 0);
	assert_part_equal(&p, &q);
	/* what the Lua script writes back (%.17g, %d) parses too */
	const char *lua = "3 1.0000000000000001e+300 1e+600 -2.4999999999999999e-07 "
			  "1.0000000000000001e+300 1733490000000 -2.4999999999999999e-07 "
			  "1733490000124 1.0000000000000001e+300";
	assert_int_equal(ru_part_parse(lua, strlen(lua), &q), 0);
	assert_int_equal(q.count, 3);
	assert_int_equal(q.last_ts, 1733490000124);
	/* malformed */
	assert_int_equal(ru_part_parse("", 0, &q), -1);
	assert_int_equal(ru_part_parse("1 2 3", 5, &q), -1);
	assert_int_equal(ru_part_parse("0 0 0 0 0 0 0 0 0", 17, &q), -1);     /* count 0 */
	assert_int_equal(ru_part_parse("1 0 0 0 0 0 0 0 0 9", 19, &q), -1);   /* ten numbers */
	assert_int_equal(ru_part_parse("1 0 0 0 0 0 0 0 x", 17, &q), -1);
	assert_int_equal(ru_part_parse("1  0 0 0 0 0 0 0 0", 18, &q), -1);
	hub_buf_free(&b);
}

static void test_buckets(void **state)
{
	(void)state;
	assert_int_equal(ru_gran_parse("1m"), RU_1M);
	assert_int_equal(ru_gran_parse("1h"), RU_1H);
	assert_int_equal(ru_gran_parse("1d"), RU_1D);
	assert_int_equal(ru_gran_parse("5m"), -1);
	assert_int_equal(ru_gran_parse(""), -1);
	assert_int_equal(ru_bucket(1733490123456, RU_1M), 1733490120000);
	assert_int_equal(ru_bucket(1733490123456, RU_1H), 1733490000000);
	assert_int_equal(ru_bucket(1733490123456, RU_1D), 1733443200000);
	assert_int_equal(ru_bucket(-1, RU_1M), -60000);
	assert_int_equal(ru_bucket(60000, RU_1M), 60000);
}

static void test_bucket_keys(void **state)
{
	char k[HUB_KEY_MAX];

	(void)state;
	assert_int_equal(hub_key_ru_bucket(k, sizeof(k), 3, "1h", 1733490000000),
			 strlen("iot:ru:{i3}:1h:1733490000000"));
	assert_string_equal(k, "iot:ru:{i3}:1h:1733490000000");
	hub_key_ru_devs(k, sizeof(k), 12);
	assert_string_equal(k, "iot:ru:{i12}:devs");
	hub_key_ru_applied(k, sizeof(k), 0);
	assert_string_equal(k, "iot:ru:{i0}:applied");
	hub_key_aq_lock(k, sizeof(k), "ab12");
	assert_string_equal(k, "iot:aq:{ab12}:lock");
	hub_key_tier(k, sizeof(k), "reader");
	assert_string_equal(k, "iot:tier:{reader}");
	/* one slot per shard, whatever the bucket */
	char k2[HUB_KEY_MAX];
	hub_key_ru_bucket(k, sizeof(k), 5, "1m", 60000);
	hub_key_ru_devs(k2, sizeof(k2), 5);
	assert_int_equal(hub_slot(k, strlen(k)), hub_slot(k2, strlen(k2)));
}

static void test_tiers(void **state)
{
	struct ru_tiers t;
	char err[160];

	(void)state;
	assert_int_equal(ru_tiers_parse("free:10/1:604800,standard:100/60:7776000,internal:0/1:1",
					&t, err, sizeof(err)), 0);
	assert_int_equal(t.n, 3);
	assert_string_equal(t.v[1].name, "standard");
	assert_int_equal(t.v[1].requests, 100);
	assert_int_equal(t.v[1].window_ms, 60000);
	assert_int_equal(t.v[1].max_range_ms, 7776000000LL);
	assert_int_equal(t.v[2].requests, 0);
	assert_non_null(ru_tiers_find(&t, "free"));
	assert_null(ru_tiers_find(&t, "gold"));

	const char *bad[] = { "", "free", "free:10", "free:10/1", "free:10/0:5", "Free:1/1:1",
			      "free:1/1:1,free:2/1:1", "free:1/1:1,", "free:-1/1:1", "free:1/1:1x",
			      ":1/1:1", "a:1/1:1,b:1/1:1,c:1/1:1,d:1/1:1,e:1/1:1,f:1/1:1,g:1/1:1,"
			      "h:1/1:1,i:1/1:1" };
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		err[0] = '\0';
		if (ru_tiers_parse(bad[i], &t, err, sizeof(err)) != -1)
			fail_msg("tier spec \"%s\" was accepted", bad[i]);
		assert_true(err[0] != '\0');
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_add_and_stats),
		cmocka_unit_test(test_merge_is_order_free),
		cmocka_unit_test(test_nonfinite_ignored),
		cmocka_unit_test(test_text_round_trip),
		cmocka_unit_test(test_buckets),
		cmocka_unit_test(test_bucket_keys),
		cmocka_unit_test(test_tiers),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
