/* Unit tests of the strict number and position parsers (hub/util.h). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include "hub/util.h"

static int i64(const char *s, int64_t min, int64_t max, int64_t *out)
{
	return hub_parse_i64(s, strlen(s), min, max, out);
}

static void test_parse_i64(void **state)
{
	int64_t v = 42;

	(void)state;
	assert_int_equal(i64("0", 0, 10, &v), 0);
	assert_int_equal(v, 0);
	assert_int_equal(i64("-0", -1, 1, &v), 0);
	assert_int_equal(v, 0);
	assert_int_equal(i64("0007", 0, 10, &v), 0);
	assert_int_equal(v, 7);
	assert_int_equal(i64("9223372036854775807", INT64_MIN, INT64_MAX, &v), 0);
	assert_true(v == INT64_MAX);
	assert_int_equal(i64("-9223372036854775808", INT64_MIN, INT64_MAX, &v), 0);
	assert_true(v == INT64_MIN);
	v = 42;
	/* overflow, junk, empty, out of range: -1 and *out untouched */
	static const char *const bad[] = {
		"9223372036854775808", "-9223372036854775809", "99999999999999999999",
		"18446744073709551616", "", "-", "+1", " 1", "1 ", "1x", "0x10", "1e3",
		"1.0", "--1", "1-", "5\n",
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		if (i64(bad[i], INT64_MIN, INT64_MAX, &v) != -1)
			fail_msg("\"%s\" was accepted", bad[i]);
		assert_int_equal(v, 42);
	}
	assert_int_equal(i64("11", 1, 10, &v), -1);
	assert_int_equal(i64("0", 1, 10, &v), -1);
	assert_int_equal(i64("-1", 0, 10, &v), -1);
	assert_int_equal(v, 42);
	/* the length is honoured: not NUL-terminated input */
	assert_int_equal(hub_parse_i64("12345", 2, 0, 100, &v), 0);
	assert_int_equal(v, 12);
	assert_int_equal(hub_parse_i64(NULL, 0, 0, 1, &v), -1);
}

static int pos(const char *s, bool need_seq, uint64_t *ms, uint64_t *seq)
{
	return hub_parse_pos(s, strlen(s), need_seq, ms, seq);
}

static void test_parse_pos(void **state)
{
	uint64_t ms = 7, seq = 7;

	(void)state;
	assert_int_equal(pos("1732345678123-0", true, &ms, &seq), 0);
	assert_true(ms == 1732345678123ULL && seq == 0);
	assert_int_equal(pos("18446744073709551615-18446744073709551615", true, &ms, &seq), 0);
	assert_true(ms == UINT64_MAX && seq == UINT64_MAX);
	assert_int_equal(pos("123", false, &ms, &seq), 0);
	assert_true(ms == 123 && seq == 0);
	ms = seq = 7;
	static const char *const bad[] = {
		"99999999999999999999-99999999999999999999", "18446744073709551616-0",
		"0-18446744073709551616", "", "-", "1-", "-1", "1--1", "-1-0", "1-2-3",
		"+1-0", "1-+0", " 1-0", "1-0 ", "0x1-0", "1.0-0", "a-b", "1-0\n",
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		if (pos(bad[i], false, &ms, &seq) != -1)
			fail_msg("\"%s\" was accepted", bad[i]);
		assert_true(ms == 7 && seq == 7);
	}
	assert_int_equal(pos("123", true, &ms, &seq), -1);
	assert_true(ms == 7 && seq == 7);
}

static void test_hex(void **state)
{
	uint8_t b[3] = { 0, 0, 0 };

	(void)state;
	assert_int_equal(hub_hex_val('0'), 0);
	assert_int_equal(hub_hex_val('9'), 9);
	assert_int_equal(hub_hex_val('a'), 10);
	assert_int_equal(hub_hex_val('F'), 15);
	assert_int_equal(hub_hex_val('g'), -1);
	assert_int_equal(hub_hex_val('/'), -1);
	assert_int_equal(hub_hex_val(0xe9), -1);
	assert_int_equal(hub_unhex("aBff", 4, b, 2), 0);
	assert_int_equal(b[0], 0xab);
	assert_int_equal(b[1], 0xff);
	assert_int_equal(b[2], 0);
	assert_int_equal(hub_unhex("abf", 3, b, 2), -1);
	assert_int_equal(hub_unhex("abff00", 6, b, 2), -1);
	assert_int_equal(hub_unhex("zzzz", 4, b, 2), -1);
	assert_int_equal(hub_unhex("0\xe9", 2, b, 1), -1);
	assert_int_equal(hub_unhex(NULL, 0, b, 0), -1);
	assert_int_equal(hub_unhex("", 0, b, 0), 0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_parse_i64),
		cmocka_unit_test(test_parse_pos),
		cmocka_unit_test(test_hex),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
