/* Unit tests of sink/batch.c: feed entries as the hub writes them
 * (protocols/gateway.c feed_line) into COPY rows; escaping; entries that do
 * not parse are dropped whole and still acknowledged. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "sink/batch.h"

#define L1 "t-1\tthermostat\t{\"site\":\"a\"}\t\"device\":\"t-1\",\"ts\":1700000000123,\"data\":{\"temperature\":21.5}\n"
#define L2 "t-2\tthermostat\t{}\t\"device\":\"t-2\",\"ts\":1700000000999,\"data\":{\"note\":\"a\\\\b\\tc\"}\n"

static char *row(const struct sink_batch *b, size_t i)
{
	char *s = malloc(b->rows[i].len + 1);

	memcpy(s, b->copy + b->rows[i].off, b->rows[i].len);
	s[b->rows[i].len] = '\0';
	return s;
}

static void test_entry_rows(void **state)
{
	struct sink_batch b = { 0 };
	const char *rd = L1 L2;
	char *r;

	(void)state;
	assert_int_equal(sink_batch_add(&b, 3, "1-0", "gw-1", 4, "42", 2, rd, strlen(rd), 1000), 2);
	assert_int_equal(b.nrows, 2);
	assert_int_equal(b.nentries, 1);
	assert_int_equal(b.started_ms, 1000);
	assert_int_equal(b.acks[3].n, 1);
	assert_string_equal(b.acks[3].ids[0], "1-0");
	assert_int_equal(b.rows[0].ts_ms, 1700000000123LL);
	r = row(&b, 0);
	assert_string_equal(r, "gw-1\t42\t0\tt-1\tthermostat\t{\"site\":\"a\"}\t1700000000123\t{\"temperature\":21.5}\t\\N\n");
	free(r);
	/* a JSON escape's backslash doubled for COPY */
	r = row(&b, 1);
	assert_string_equal(r, "gw-1\t42\t1\tt-2\tthermostat\t{}\t1700000000999\t{\"note\":\"a\\\\\\\\b\\\\tc\"}\t\\N\n");
	free(r);
	sink_batch_reset(&b);
	assert_int_equal(b.nrows, 0);
	assert_int_equal(b.acks[3].n, 0);
	assert_int_equal(b.started_ms, 0);
	sink_batch_free(&b);
}

static void test_anomalies(void **state)
{
	struct sink_batch b = { 0 };
	const char *rd = "t-1\tthermostat\t{}\t\"device\":\"t-1\",\"ts\":5,\"data\":{\"s\":\"}]\"},"
			 "\"anomalies\":[{\"field\":\"temperature\"}]\n";
	const char *junk = "t-1\tthermostat\t{}\t\"device\":\"t-1\",\"ts\":5,\"data\":{},\"x\":1\n";
	char *r;

	(void)state;
	assert_int_equal(sink_batch_add(&b, 0, "1-0", "g", 1, "7", 1, rd, strlen(rd), 1), 1);
	r = row(&b, 0);
	assert_string_equal(r, "g\t7\t0\tt-1\tthermostat\t{}\t5\t{\"s\":\"}]\"}\t[{\"field\":\"temperature\"}]\n");
	free(r);
	assert_int_equal(sink_batch_add(&b, 0, "2-0", "g", 1, "8", 1, junk, strlen(junk), 1), 0);
	assert_int_equal(b.bad_entries, 1);
	sink_batch_free(&b);
}

static void test_bad_entries(void **state)
{
	struct sink_batch b = { 0 };
	const char *half = L1 "t-3\tthermostat\t{}\t\"device\":\"t-3\",\"data\":{}\n"; /* no ts */
	const char *notabs = "t-1 thermostat {} x\n";

	(void)state;
	assert_int_equal(sink_batch_add(&b, 0, "1-0", "gw", 2, "1", 1, half, strlen(half), 5), 0);
	assert_int_equal(b.nrows, 0);         /* all or nothing: L1 dropped too */
	assert_int_equal(b.copy_len, 0);
	assert_int_equal(b.acks[0].n, 1);     /* still acknowledged */
	assert_int_equal(sink_batch_add(&b, 0, "2-0", "gw", 2, "x1", 2, L1, strlen(L1), 5), 0); /* seq */
	assert_int_equal(sink_batch_add(&b, 0, "3-0", "gw", 2, "1", 1, notabs, strlen(notabs), 5), 0);
	assert_int_equal(sink_batch_add(&b, 0, "4-0", NULL, 0, NULL, 0, NULL, 0, 5), 0);
	assert_int_equal(b.bad_entries, 4);
	assert_int_equal(sink_batch_add(&b, 0, "5-0", "gw", 2, "2", 1, L1, strlen(L1), 5), 1);
	assert_int_equal(b.acks[0].n, 5);
	assert_int_equal(sink_batch_add(&b, HUB_FEED_SHARDS_MAX, "6-0", "gw", 2, "2", 1, L1, strlen(L1), 5), 0);
	sink_batch_free(&b);
}

static void test_escape(void **state)
{
	char *o = NULL;
	size_t len = 0, cap = 0;

	(void)state;
	sink_copy_escape(&o, &len, &cap, "a\\b\tc\nd\re", 9);
	assert_int_equal(len, 13);
	assert_memory_equal(o, "a\\\\b\\tc\\nd\\re", 13);
	free(o);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_entry_rows),
		cmocka_unit_test(test_anomalies),
		cmocka_unit_test(test_bad_entries),
		cmocka_unit_test(test_escape),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
