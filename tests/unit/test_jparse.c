/* Unit tests of jparse: every input is also given to jansson's
 * json_loadb(JSON_REJECT_DUPLICATES), and the two must agree on
 * accept/reject and build the same tree (types, key order, string bytes,
 * reals bit for bit). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "protocols/jparse.h"
#include "tests/jparse_same.h"

struct input {
	const char *s;
	size_t n;
};

/* A literal with its length, so that NUL bytes inside count. */
#define J(lit) { lit, sizeof(lit) - 1 }


/*
 * Parses s with both; checks they agree and, on error, that jparse says
 * where, inside the input. Returns 1 if accepted. The input is copied into
 * a block of exactly n bytes so that a read past the end shows under ASan.
 */
static int check(const char *s, size_t n)
{
	char *copy = malloc(n ? n : 1);
	json_error_t e;
	json_t *want, *got;
	int ok;

	assert_non_null(copy);
	memcpy(copy, s, n);
	want = json_loadb(copy, n, JSON_REJECT_DUPLICATES, NULL);
	got = jparse(copy, n, &e);
	if (!want != !got)
		fail_msg("%.*s: jansson %s, jparse %s (%s at byte %d)", (int)n, s,
			 want ? "accepts" : "rejects",
			 got ? "accepts" : "rejects", e.text, e.position);
	if (got && !(json_equal(want, got) && same(want, got)))
		fail_msg("%.*s: trees differ", (int)n, s);
	if (!got) {
		assert_true(e.text[0] != '\0');
		assert_in_range(e.position, 0, n);
		assert_true(e.line >= 1);
		assert_true(e.column >= 1);
		assert_string_equal(e.source, "<buffer>");
	}
	ok = got != NULL;
	json_decref(want);
	json_decref(got);
	free(copy);
	return ok;
}

static const struct input valid[] = {
	J("{}"), J("[]"), J(" \t\r\n{ } \t\r\n"), J("[[],{},[[]]]"),
	J("{\"type\":\"telemetry\",\"seq\":123456,\"readings\":[{\"device\":\"gw-0001-d042\","
	  "\"ts\":1700000000123,\"data\":{\"temperature\":21.53,\"humidity\":45.12}}]}"),
	J("[true,false,null]"), J("{\"a\":true,\"b\":false,\"c\":null}"),
	J("[ 1 , 2 ,\n3 ]"), J("{ \"a\" : 1 , \"b\" : [ ] }"),
	/* integers */
	J("[0,-0,1,-1,9223372036854775807,-9223372036854775808]"),
	J("[1700000000123,12345678,123456789,1234567890123456789]"),
	/* reals */
	J("[0.0,-0.0,0e0,-0e-0,0E+5,0.5,-0.5,1e2,1E2,1e+2,1e-2,21.53,45.12]"),
	J("[0e99999999999999999999,1e-99999999999999999999,-1e-400,4.9e-324]"),
	J("[0.000000000000000000000000000001234,123.456e-7,1.00000000000000000000000001]"),
	/* strings and escapes */
	J("[\"\",\"a\",\"\\\"\\\\\\/\\b\\f\\n\\r\\t\"]"),
	J("[\"\\u0041\\u00e9\\u20ac\\uD83D\\uDE00\\ud800\\udc00\\uDBFF\\uDFFF\"]"),
	J("[\"h\xc3\xa9llo \xe2\x82\xac \xf0\x9f\x98\x80\"]"),
	J("[\"\xc2\x80\xdf\xbf\xe0\xa0\x80\xed\x9f\xbf\xee\x80\x80\xef\xbf\xbf\xf0\x90\x80\x80\xf4\x8f\xbf\xbf\"]"),
	J("[\"\x7f\"]"), J("{\"\":1}"), J("{\"a\":1,\"b\":2,\"A\":3,\"aa\":4}"),
	J("{\"\\u0061\":1,\"b\":{\"a\":2}}"), J("{\"a\\nb\":1,\"a\\u000ab2\":2}"),
	/* jansson loses a NUL byte read just after a number or literal */
	J("[1\0]"), J("[-0\0]"), J("[1.5\0,2]"), J("[1e5\0]"), J("[true\0]"),
	J("[false\0,null\0]"), J("{\"a\":null\0}"), J("{\"a\":0\0 }"),
};

static const struct input invalid[] = {
	/* structure */
	J(""), J(" "), J("1"), J("\"a\""), J("true"), J("null"), J("{"), J("["),
	J("}"), J("]"), J("[}"), J("{]"), J("[1,]"), J("[,1]"), J("[1 2]"),
	J("{\"a\":1,}"), J("{,}"), J("{\"a\"}"), J("{\"a\" 1}"), J("{\"a\":}"),
	J("{1:1}"), J("{a:1}"), J("{'a':1}"), J("[]]"), J("[][]"), J("[] x"),
	J("\xef\xbb\xbf[]"), J("[]\0"), J("\0[]"), J("[\0]"), J("[1 \0]"),
	J("[1\0\0]"), J("[\"a\"\0]"), J("{\"a\"\0:1}"), J("[\f]"), J("[\v1]"),
	J("{\"a\":1,\"a\":2}"), J("{\"a\":1,\"b\":2,\"a\":3}"),
	J("{\"\\u0061\":1,\"a\":2}"), J("{\"a\":{},\"a\":[]}"),
	J("[tru]"), J("[truex]"), J("[True]"), J("[nul]"), J("[nulll]"),
	J("[fals]"), J("[NaN]"), J("[Infinity]"), J("[-Infinity]"), J("[undefined]"),
	/* numbers */
	J("[01]"), J("[-01]"), J("[00]"), J("[+1]"), J("[-]"), J("[-a]"), J("[1.]"),
	J("[.5]"), J("[1.e5]"), J("[1e]"), J("[1e+]"), J("[1E-]"), J("[1ee5]"),
	J("[0x10]"), J("[1_000]"), J("[--1]"), J("[1.5.5]"), J("[1e5.5]"), J("[-"),
	J("[9223372036854775808]"), J("[-9223372036854775809]"),
	J("[18446744073709551616]"), J("[99999999999999999999999]"),
	J("[1e309]"), J("[-1e309]"), J("[1.7976931348623159e308]"),
	J("[123456789012345678901234567890e300]"),
	/* strings */
	J("[\"abc]"), J("[\"abc"), J("[\"\\"), J("[\"\\\"]"), J("[\"a\nb\"]"),
	J("[\"a\tb\"]"), J("[\"\x1f\"]"), J("[\"a\0b\"]"), J("[\"\\a\"]"), J("[\"\\x41\"]"),
	J("[\"\\u\"]"), J("[\"\\u12\"]"), J("[\"\\u12G4\"]"), J("[\"\\u0000\"]"),
	J("{\"\\u0000\":1}"), J("[\"\\ud800\"]"), J("[\"\\udc00\"]"),
	J("[\"\\ud800\\u0041\"]"), J("[\"\\ud800\\ud800\"]"), J("[\"\\ud800x\"]"),
	J("[\"\\ud800\\\"]"), J("[\"\\udc00\\ud800\"]"), J("['a']"),
	/* UTF-8 */
	J("[\"\x80\"]"), J("[\"\xbf\"]"), J("[\"\xc0\x80\"]"), J("[\"\xc1\xbf\"]"),
	J("[\"\xe0\x80\x80\"]"), J("[\"\xe0\x9f\xbf\"]"), J("[\"\xed\xa0\x80\"]"),
	J("[\"\xed\xbf\xbf\"]"), J("[\"\xf0\x80\x80\x80\"]"), J("[\"\xf0\x8f\xbf\xbf\"]"),
	J("[\"\xf4\x90\x80\x80\"]"), J("[\"\xf5\x80\x80\x80\"]"), J("[\"\xff\"]"),
	J("[\"\xc3\"]"), J("[\"\xe2\x82\"]"), J("[\"\xf0\x9f\x98\"]"), J("[\"\xc3"),
	J("[\"\xe2\x82"), J("[\"\xc3\x28\"]"), J("[\"\xe2\x28\xa1\"]"), J("{\"\xff\":1}"),
	J("[\xc3\xa9]"), J("[]\xff"),
};

static void test_valid(void **state)
{
	size_t i;

	(void)state;
	for (i = 0; i < sizeof(valid) / sizeof(valid[0]); i++)
		if (!check(valid[i].s, valid[i].n))
			fail_msg("rejected: %.*s", (int)valid[i].n, valid[i].s);
}

static void test_invalid(void **state)
{
	size_t i;

	(void)state;
	for (i = 0; i < sizeof(invalid) / sizeof(invalid[0]); i++)
		if (check(invalid[i].s, invalid[i].n))
			fail_msg("accepted: %.*s", (int)invalid[i].n, invalid[i].s);
}

/*
 * Reals whose shortest forms stress rounding: each must be the double
 * jansson (strtod) makes, bit for bit, whether jparse takes its fast path
 * or not.
 */
static void test_reals(void **state)
{
	static const char *const reals[] = {
		"0.1", "0.2", "0.3", "21.53", "45.12", "-21.53", "1e23", "8.41e21",
		"1e22", "9e22", "123456789e15", "4.5e15", "9007199254740992.0",
		"9007199254740993", "9007199254740993.0", "9007199254740995.0",
		"2.2250738585072011e-308", "2.2250738585072012e-308",
		"2.2250738585072014e-308", "1.7976931348623157e308",
		"1.7976931348623158e308", "4.9406564584124654e-324", "5e-324",
		"2.4703282292062327e-324", "2.4703282292062328e-324", "1e-400",
		"123456789012345678901234567890.5", "0.1e1", "100e-2",
		"3.141592653589793238462643383279", "1.000000000000000000000000000001",
		"0.30000000000000004", "1234567890123456789e-10", "1e-22", "1e-23",
		"9007199254740991e-22", "9007199254740993e-22", "1.5e300", "-0.0",
		"-0e0", "0.0000000000000000000000000000000000000001e40",
		"123.456e5", "1.7e308", "1.8e308",
		"17976931348623157081452742373170435679807056752584499659891747680315726"
		"078002853876058955863276687817154045895351438246423432132688946418276846"
		"754670353751698604991057655128207624549009038932894407586850845513394230"
		"458323690322294816580855933212334827479782620414472316873817718091929988"
		"1250404026184124858368.0",
	};
	char buf[600];
	size_t i;

	(void)state;
	for (i = 0; i < sizeof(reals) / sizeof(reals[0]); i++) {
		int n = snprintf(buf, sizeof(buf), "[%s]", reals[i]);

		assert_in_range(n, 0, sizeof(buf) - 1);
		check(buf, (size_t)n);
	}
}

/* n nested arrays around nothing or a scalar. */
static char *nest(int n, int scalar, size_t *len)
{
	char *s = malloc(2 * (size_t)n + 2);
	size_t k = 0;
	int i;

	assert_non_null(s);
	for (i = 0; i < n; i++)
		s[k++] = '[';
	if (scalar)
		s[k++] = '1';
	for (i = 0; i < n; i++)
		s[k++] = ']';
	*len = k;
	return s;
}

/* jansson counts a scalar as a level: 2048 empty levels parse, a scalar
 * inside 2048 does not; 2049 never. */
static void test_depth(void **state)
{
	static const struct {
		int n, scalar, ok;
	} cases[] = {
		{ 1, 0, 1 }, { 33, 1, 1 }, { 2047, 1, 1 }, { 2048, 0, 1 },
		{ 2048, 1, 0 }, { 2049, 0, 0 }, { 2049, 1, 0 }, { 100000, 0, 0 },
	};
	size_t i, len;
	char *s;

	(void)state;
	for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		s = nest(cases[i].n, cases[i].scalar, &len);
		assert_int_equal(check(s, len), cases[i].ok);
		free(s);
	}
	/* Objects all the way down, each with a key, a scalar innermost. */
	for (i = 2047; i <= 2048; i++) {
		int d;

		s = malloc((size_t)i * 6 + 1);
		assert_non_null(s);
		len = 0;
		for (d = 0; d < (int)i; d++) {
			memcpy(s + len, "{\"k\":", 5);
			len += 5;
		}
		s[len++] = '1';
		memset(s + len, '}', i);
		len += i;
		assert_int_equal(check(s, len), i == 2047);
		free(s);
	}
}

/* Objects past the memcmp-tracked keys (16 per object, 128 in all) fall
 * back to json_object_getn(); duplicates are found either way. */
static void test_many_keys(void **state)
{
	char *s = malloc(1 << 16);
	size_t k;
	int i, j, dup;

	(void)state;
	assert_non_null(s);
	for (dup = -1; dup < 39; dup++) {
		k = 0;
		s[k++] = '{';
		for (i = 0; i < 40; i++)
			k += (size_t)sprintf(s + k, "%s\"k%d\":%d", i ? "," : "",
					     i == dup + 1 && dup >= 0 ? dup : i, i);
		s[k++] = '}';
		assert_int_equal(check(s, k), dup < 0);
	}
	/* Nested objects, many keys each: the shared records run out. */
	for (dup = 0; dup < 2; dup++) {
		k = 0;
		s[k++] = '[';
		for (j = 0; j < 12; j++) {
			k += (size_t)sprintf(s + k, "%s{\"o\":{\"p\":{", j ? "," : "");
			for (i = 0; i < 20; i++)
				k += (size_t)sprintf(s + k, "%s\"k%d\":%d", i ? "," : "", i, i);
			k += (size_t)sprintf(s + k, "},\"q\":[{\"a\":1,\"b\":2}]");
			for (i = 0; i < 14; i++)
				k += (size_t)sprintf(s + k, ",\"x%d\":%d", i, i);
			if (dup && j == 11)
				k += (size_t)sprintf(s + k, ",\"x3\":0");
			k += (size_t)sprintf(s + k, "},\"z\":0}");
		}
		s[k++] = ']';
		assert_int_equal(check(s, k), !dup);
	}
	/* Objects 12 deep with 16 keys each: the records run out on the
	 * way down; a duplicate after the nested object, at each level. */
	for (dup = -1; dup < 12; dup++) {
		k = 0;
		for (j = 0; j < 12; j++) {
			s[k++] = '{';
			for (i = 0; i < 15; i++)
				k += (size_t)sprintf(s + k, "\"a%d\":%d,", i, i);
			k += (size_t)sprintf(s + k, "\"n\":");
		}
		k += (size_t)sprintf(s + k, "[]");
		for (j = 11; j >= 0; j--)
			k += (size_t)sprintf(s + k, "%s}", j == dup ? ",\"a7\":0" : "");
		assert_int_equal(check(s, k), dup < 0);
	}
	/* A duplicate of an escaped key, and of a key after an escaped one. */
	{
		static const char a[] = "{\"a\\u0062\":1,\"c\":2,\"ab\":3}";
		static const char b[] = "{\"\\u0061\":1,\"b\":2,\"b\":3}";
		static const char c[] = "{\"\\u0061\":1,\"b\":2,\"c\":3}";

		assert_int_equal(check(a, sizeof(a) - 1), 0);
		assert_int_equal(check(b, sizeof(b) - 1), 0);
		assert_int_equal(check(c, sizeof(c) - 1), 1);
	}
	free(s);
}

/* Long strings and numbers take the heap paths. */
static void test_long_tokens(void **state)
{
	char *s = malloc(40000);
	size_t k;
	int i;

	(void)state;
	assert_non_null(s);
	k = 0;
	s[k++] = '[';
	s[k++] = '"';
	for (i = 0; i < 3000; i++) {
		static const char *const pieces[] = {
			"abc", "\\n", "\\u00e9", "\\ud83d\\ude00", "\xc3\xa9", "\\\"",
			"\xf0\x9f\x98\x80", "\\/",
		};
		size_t n = strlen(pieces[i % 8]);

		memcpy(s + k, pieces[i % 8], n);
		k += n;
	}
	s[k++] = '"';
	s[k++] = ',';
	for (i = 0; i < 500; i++)
		s[k++] = (char)('1' + i % 9);
	k += (size_t)sprintf(s + k, ".5e-480,");
	s[k++] = '0';
	s[k++] = '.';
	for (i = 0; i < 500; i++)
		s[k++] = (char)('0' + i % 10);
	s[k++] = ']';
	assert_int_equal(check(s, k), 1);
	/* The same as a key, twice. */
	s[0] = '{';
	k = 1 + (size_t)sprintf(s + 1, "\"%0500d\\n\":1,\"%0500d\\n\":2}", 7, 7);
	assert_int_equal(check(s, k), 0);
	free(s);
}

/* Only len bytes are read, what follows is not looked at. */
static void test_not_terminated(void **state)
{
	const char *s = "{\"a\":[1,2.5,\"x\"]}garbage";
	json_t *j;

	(void)state;
	j = jparse(s, 17, NULL);
	assert_non_null(j);
	json_decref(j);
	assert_null(jparse(s, 16, NULL));
	assert_null(jparse(s, 18, NULL));
	assert_null(jparse(NULL, 0, NULL));
}

static void expect_error(const char *s, size_t n, const char *text, int pos,
			 int line, int column, enum json_error_code code)
{
	json_error_t e;

	assert_null(jparse(s, n, &e));
	assert_string_equal(e.text, text);
	assert_int_equal(e.position, pos);
	assert_int_equal(e.line, line);
	assert_int_equal(e.column, column);
	assert_int_equal(json_error_code(&e), code);
	assert_string_equal(e.source, "<buffer>");
}

/* The hub prints "invalid JSON at byte %d: %s": where and why. */
static void test_errors(void **state)
{
	json_error_t e;
	json_t *j;

	(void)state;
	expect_error("", 0, "unexpected end of input", 0, 1, 1,
		     json_error_premature_end_of_input);
	expect_error("[1,", 3, "unexpected end of input", 3, 1, 4,
		     json_error_premature_end_of_input);
	expect_error("x", 1, "'[' or '{' expected", 0, 1, 1,
		     json_error_invalid_syntax);
	expect_error("[1,\n tru]", 9, "invalid token", 5, 2, 2,
		     json_error_invalid_syntax);
	expect_error("{\"a\":1,\"a\":2}", 13, "duplicate object key", 7, 1, 8,
		     json_error_duplicate_key);
	expect_error("[9223372036854775808]", 21, "too big integer", 1, 1, 2,
		     json_error_numeric_overflow);
	expect_error("[-9223372036854775809]", 22, "too big negative integer", 1,
		     1, 2, json_error_numeric_overflow);
	expect_error("[1e999]", 7, "real number overflow", 1, 1, 2,
		     json_error_numeric_overflow);
	expect_error("[\"\xc0\x80\"]", 6, "invalid UTF-8", 2, 1, 3,
		     json_error_invalid_utf8);
	expect_error("[\"\\u0000\"]", 10, "\\u0000 is not allowed", 2, 1, 3,
		     json_error_null_character);
	expect_error("[\"a\nb\"]", 7, "control character in string", 3, 1, 4,
		     json_error_invalid_syntax);
	expect_error("[1]x", 4, "end of input expected", 3, 1, 4,
		     json_error_end_of_input_expected);
	expect_error("[1 2]", 5, "',' or ']' expected", 3, 1, 4,
		     json_error_invalid_syntax);
	expect_error("{\"a\" 1}", 7, "':' expected", 5, 1, 6,
		     json_error_invalid_syntax);
	{
		size_t len;
		char *s = nest(2049, 0, &len);

		assert_null(jparse(s, len, &e));
		assert_string_equal(e.text, "maximum parsing depth reached");
		assert_int_equal(e.position, 2048);
		assert_int_equal(json_error_code(&e), json_error_stack_overflow);
		free(s);
	}
	/* Success leaves the error empty, as jansson does. */
	j = jparse("[1]", 3, &e);
	assert_non_null(j);
	assert_string_equal(e.text, "");
	assert_int_equal(e.position, 3);
	json_decref(j);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_valid),
		cmocka_unit_test(test_invalid),
		cmocka_unit_test(test_reals),
		cmocka_unit_test(test_depth),
		cmocka_unit_test(test_many_keys),
		cmocka_unit_test(test_long_tokens),
		cmocka_unit_test(test_not_terminated),
		cmocka_unit_test(test_errors),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
