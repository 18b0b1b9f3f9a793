/* Unit tests of the gateway wire codec. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "protocols/gw_codec.h"
#include "protocols/schema.h"

static enum gw_parse_result parse(const char *s, gw_msg *m, char *why)
{
	return gw_msg_parse(s, strlen(s), 10, 3, m, why, 160);
}

static void test_telemetry_ok(void **state)
{
	gw_msg m;
	char why[160];

	(void)state;
	assert_int_equal(parse("{\"type\":\"telemetry\",\"seq\":42,\"readings\":[{\"device\":\"t-17\",\"data\":{}}]}",
			       &m, why), GW_OK);
	assert_int_equal(m.type, GW_MSG_TELEMETRY);
	assert_true(m.has_seq);
	assert_int_equal(m.seq, 42);
	assert_int_equal(json_array_size(m.items), 1);
	gw_msg_clear(&m);
	gw_msg_clear(&m); /* idempotent */
}

static void test_bad_json(void **state)
{
	gw_msg m;
	char why[160];

	(void)state;
	assert_int_equal(parse("{bad", &m, why), GW_BAD_JSON);
	assert_non_null(strstr(why, "invalid JSON"));
	assert_int_equal(parse("[1,2]", &m, why), GW_BAD_JSON);
	assert_int_equal(parse("{\"a\":1,\"a\":2}", &m, why), GW_BAD_JSON);
	/* Not NUL-terminated: only len bytes are read. */
	assert_int_equal(gw_msg_parse("{\"type\":\"announce\",\"devices\":[]}garbage", 32, 10, 3,
				      &m, why, sizeof(why)), GW_OK);
	gw_msg_clear(&m);
}

static void test_bad_message(void **state)
{
	gw_msg m;
	char why[160];

	(void)state;
	assert_int_equal(parse("{\"seq\":1}", &m, why), GW_BAD_MESSAGE);
	gw_msg_clear(&m);
	assert_int_equal(parse("{\"type\":\"nope\"}", &m, why), GW_BAD_MESSAGE);
	assert_string_equal(why, "unknown message type \"nope\"");
	gw_msg_clear(&m);
	assert_int_equal(parse("{\"type\":\"telemetry\",\"readings\":[]}", &m, why), GW_BAD_MESSAGE);
	assert_false(m.has_seq);
	gw_msg_clear(&m);
	assert_int_equal(parse("{\"type\":\"telemetry\",\"seq\":-1,\"readings\":[]}", &m, why), GW_BAD_MESSAGE);
	gw_msg_clear(&m);
	assert_int_equal(parse("{\"type\":\"telemetry\",\"seq\":1.5,\"readings\":[]}", &m, why), GW_BAD_MESSAGE);
	gw_msg_clear(&m);
	/* seq known even though readings is wrong: the error can name it. */
	assert_int_equal(parse("{\"type\":\"telemetry\",\"seq\":7,\"readings\":{}}", &m, why), GW_BAD_MESSAGE);
	assert_true(m.has_seq);
	assert_int_equal(m.seq, 7);
	gw_msg_clear(&m);
	assert_int_equal(parse("{\"type\":\"telemetry\",\"seq\":7,\"readings\":[1,2,3,4,5,6,7,8,9,10,11]}",
			       &m, why), GW_BAD_MESSAGE);
	assert_string_equal(why, "too many readings: 11 > max-readings-per-frame 10");
	gw_msg_clear(&m);
	/* Each kind has its own limit. */
	assert_int_equal(parse("{\"type\":\"announce\",\"devices\":[1,2,3,4]}", &m, why),
			 GW_BAD_MESSAGE);
	assert_string_equal(why, "too many devices: 4 > max-devices-per-gateway 3");
	gw_msg_clear(&m);
	assert_int_equal(parse("{\"type\":\"telemetry\",\"seq\":1,\"readings\":[1,2,3,4]}", &m, why),
			 GW_OK);
	gw_msg_clear(&m);
	assert_int_equal(parse("{\"type\":\"announce\",\"devices\":\"x\"}", &m, why), GW_BAD_MESSAGE);
	gw_msg_clear(&m);
}

static void test_reading_parse(void **state)
{
	schema_error e;
	gw_reading r;
	json_t *j;

	(void)state;
	j = json_loads("{\"device\":\"t-1\",\"ts\":5,\"data\":{\"x\":1}}", 0, NULL);
	assert_int_equal(gw_reading_parse(j, &r, &e), 0);
	assert_string_equal(r.device, "t-1");
	assert_true(r.has_ts);
	assert_int_equal(r.ts, 5);
	json_decref(j);

	j = json_loads("{\"device\":\"t-1\",\"data\":{}}", 0, NULL);
	assert_int_equal(gw_reading_parse(j, &r, &e), 0);
	assert_false(r.has_ts);
	json_decref(j);

	j = json_loads("{\"data\":{}}", 0, NULL);
	assert_int_equal(gw_reading_parse(j, &r, &e), -1);
	assert_string_equal(e.path, "device");
	assert_string_equal(e.code, "required");
	json_decref(j);

	j = json_loads("{\"device\":\"bad id\",\"data\":{}}", 0, NULL);
	assert_int_equal(gw_reading_parse(j, &r, &e), -1);
	assert_string_equal(e.code, "pattern");
	json_decref(j);

	j = json_loads("{\"device\":\"t\",\"ts\":\"now\",\"data\":{}}", 0, NULL);
	assert_int_equal(gw_reading_parse(j, &r, &e), -1);
	assert_string_equal(e.path, "ts");
	json_decref(j);

	j = json_loads("{\"device\":\"t\",\"data\":[1]}", 0, NULL);
	assert_int_equal(gw_reading_parse(j, &r, &e), -1);
	assert_string_equal(e.path, "data");
	assert_string_equal(e.code, "type");
	json_decref(j);

	assert_int_equal(gw_reading_parse(NULL, &r, &e), -1);
}

static void test_announce_parse(void **state)
{
	gw_announce a;
	char why[128];
	json_t *j;

	(void)state;
	j = json_loads("{\"device\":\"t-17\",\"device_type\":\"thermostat\",\"labels\":{\"site\":\"b1\"}}", 0, NULL);
	assert_int_equal(gw_announce_parse(j, &a, why, sizeof(why)), 0);
	assert_string_equal(a.device, "t-17");
	assert_string_equal(a.device_type, "thermostat");
	assert_non_null(a.labels);
	json_decref(j);

	j = json_loads("{\"device\":\"t-17\",\"device_type\":\"thermostat\",\"labels\":{\"site\":1}}", 0, NULL);
	assert_int_equal(gw_announce_parse(j, &a, why, sizeof(why)), -1);
	assert_string_equal(a.device, "t-17"); /* still named in the rejection */
	json_decref(j);

	j = json_loads("{\"device\":\"t-17\"}", 0, NULL);
	assert_int_equal(gw_announce_parse(j, &a, why, sizeof(why)), -1);
	assert_string_equal(why, "\"device_type\" must be a string");
	json_decref(j);

	j = json_loads("{\"device\":5}", 0, NULL);
	assert_int_equal(gw_announce_parse(j, &a, why, sizeof(why)), -1);
	assert_null(a.device);
	json_decref(j);
}

static void test_error_writer(void **state)
{
	hub_buf b = { 0 };

	(void)state;
	gw_write_error(&b, "unavailable", 42, 1000, "say \"again\"\n");
	assert_string_equal(b.data, "{\"type\":\"error\",\"code\":\"unavailable\",\"seq\":42,"
				    "\"retry_after_ms\":1000,\"message\":\"say \\\"again\\\"\\u000a\"}");
	json_t *j = json_loadb(b.data, b.len, 0, NULL);
	assert_non_null(j);
	json_decref(j);
	b.len = 0;
	gw_write_error(&b, "bad_json", -1, -1, "x");
	assert_string_equal(b.data, "{\"type\":\"error\",\"code\":\"bad_json\",\"message\":\"x\"}");
	hub_buf_free(&b);
}

static void test_json_str_utf8(void **state)
{
	hub_buf b = { 0 };

	(void)state;
	/* Valid multi-byte sequences pass; invalid bytes become U+FFFD. */
	hub_buf_json_str(&b, "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80", 9);
	assert_string_equal(b.data, "\"\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80\"");
	b.len = 0;
	hub_buf_json_str(&b, "a\xd4\x9a\\\xff\xc0\xaf\xed\xa0\x80\xe2\x82", 12);
	assert_string_equal(b.data, "\"a\xd4\x9a\\\\\\ufffd\\ufffd\\ufffd\\ufffd\\ufffd\\ufffd\\ufffd\\ufffd\"");
	json_t *j = json_loadb(b.data, b.len, JSON_DECODE_ANY, NULL);
	assert_non_null(j);
	json_decref(j);
	hub_buf_free(&b);
}

static void test_buf_i64(void **state)
{
	hub_buf b = { 0 };

	(void)state;
	hub_buf_i64(&b, 0);
	hub_buf_puts(&b, ",");
	hub_buf_i64(&b, 1732345678123LL);
	hub_buf_puts(&b, ",");
	hub_buf_i64(&b, -42);
	hub_buf_puts(&b, ",");
	hub_buf_i64(&b, INT64_MIN);
	hub_buf_puts(&b, ",");
	hub_buf_i64(&b, INT64_MAX);
	assert_string_equal(b.data, "0,1732345678123,-42,-9223372036854775808,9223372036854775807");
	hub_buf_free(&b);
}

static void test_command_ack(void **state)
{
	gw_msg m;
	gw_command_ack a;
	char why[128];
	char w[160];

	(void)state;
	assert_int_equal(parse("{\"type\":\"command_ack\",\"id\":\"c_1\",\"status\":\"in_progress\",\"progress\":40}",
			       &m, w), GW_OK);
	assert_int_equal(gw_command_ack_parse(&m, &a, why, sizeof(why)), 0);
	assert_string_equal(a.id, "c_1");
	assert_string_equal(a.status, "in_progress");
	gw_msg_clear(&m);
	assert_int_equal(parse("{\"type\":\"command_ack\",\"id\":\"c_1\",\"status\":\"x\",\"progress\":\"40\"}",
			       &m, w), GW_OK);
	assert_int_equal(gw_command_ack_parse(&m, &a, why, sizeof(why)), -1);
	gw_msg_clear(&m);

	/* Sizes: a 30 KB result is refused under a 16 KiB cap, kept under a
	 * larger one; long texts and ids are refused. */
	char *big = malloc(40000);
	int n = snprintf(big, 40000, "{\"type\":\"command_ack\",\"id\":\"c_1\",\"status\":\"succeeded\","
			 "\"result\":{\"blob\":\"");
	memset(big + n, 'x', 30000);
	snprintf(big + n + 30000, 40000 - (size_t)n - 30000, "\"}}");
	assert_int_equal(parse(big, &m, w), GW_OK);
	assert_int_equal(gw_command_ack_parse(&m, &a, why, sizeof(why)), 0);
	assert_int_equal(gw_command_ack_check(&a, 16384, why, sizeof(why)), -1);
	assert_non_null(strstr(why, "result"));
	assert_int_equal(gw_command_ack_check(&a, 65536, why, sizeof(why)), 0);
	gw_msg_clear(&m);
	n = snprintf(big, 40000, "{\"type\":\"command_ack\",\"id\":\"c_1\",\"status\":\"failed\",\"error\":\"");
	memset(big + n, 'e', 2000);
	snprintf(big + n + 2000, 40000 - (size_t)n - 2000, "\"}");
	assert_int_equal(parse(big, &m, w), GW_OK);
	assert_int_equal(gw_command_ack_parse(&m, &a, why, sizeof(why)), 0);
	assert_int_equal(gw_command_ack_check(&a, 16384, why, sizeof(why)), -1);
	gw_msg_clear(&m);
	n = snprintf(big, 40000, "{\"type\":\"command_ack\",\"id\":\"");
	memset(big + n, 'i', 100);
	snprintf(big + n + 100, 40000 - (size_t)n - 100, "\",\"status\":\"received\"}");
	assert_int_equal(parse(big, &m, w), GW_OK);
	assert_int_equal(gw_command_ack_parse(&m, &a, why, sizeof(why)), 0);
	assert_int_equal(gw_command_ack_check(&a, 16384, why, sizeof(why)), -1);
	gw_msg_clear(&m);
	free(big);
}

static void test_fmt_decimal(void **state)
{
	static const struct { double v; const char *want; } cases[] = {
		{ 21.5, "21.5" }, { -0.125, "-0.125" }, { 40, "40" }, { 0, "0" },
		{ 0.1, "0.1" }, { 0.07, "0.07" }, { -3.00000001, "-3.00000001" },
		{ 123456.78, "123456.78" }, { 1e15, "1000000000000000" },
		{ 0.1 + 0.2, NULL }, { 1e-9, NULL }, { 1e300, NULL }, { 1.0 / 3, NULL },
	};
	char out[32];

	(void)state;
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		size_t n = hub_fmt_decimal(out, cases[i].v);
		if (!cases[i].want) {
			assert_int_equal(n, 0);
			continue;
		}
		out[n] = '\0';
		assert_string_equal(out, cases[i].want);
	}
	/* Whatever it writes reads back as the same double. */
	srand(7);
	for (int i = 0; i < 200000; i++) {
		double v = (double)(rand() - RAND_MAX / 2) / (double)(1 + rand() % 100000);
		if (i % 2)
			v = (double)(rand() % 2000000 - 1000000) / 100.0;
		size_t n = hub_fmt_decimal(out, v);
		if (!n)
			continue;
		out[n] = '\0';
		assert_true(strtod(out, NULL) == v);
	}
}

/* Each reading's data span, compacted, is exactly its data: same value as
 * jansson parsed, no whitespace between tokens, digits as written. */
static void check_spans(const char *frame, const char *const *want, size_t nwant)
{
	gw_msg m;
	char why[160];
	gw_span spans[10];
	hub_buf b = { 0 };

	assert_int_equal(parse(frame, &m, why), GW_OK);
	assert_int_equal(json_array_size(m.items), nwant);
	assert_int_equal(gw_data_spans(&m, spans, nwant), 0);
	for (size_t i = 0; i < nwant; i++) {
		json_t *data = json_object_get(json_array_get(m.items, i), "data");
		b.len = 0;
		if (!want[i]) {
			assert_int_equal(spans[i].len, 0);
			continue;
		}
		gw_append_compact(&b, m.text + spans[i].off, spans[i].len);
		assert_int_equal(b.len, strlen(want[i]));
		assert_memory_equal(b.data, want[i], b.len);
		json_t *back = json_loadb(b.data, b.len, 0, NULL);
		assert_non_null(back);
		assert_true(json_equal(back, data));
		json_decref(back);
	}
	gw_msg_clear(&m);
	hub_buf_free(&b);
}

static void test_data_spans(void **state)
{
	(void)state;
	const char *w1[] = { "{\"t\":21.50,\"h\":4e1}" };
	check_spans("{\"type\":\"telemetry\",\"seq\":1,\"readings\":[{\"device\":\"d\",\"data\":{\"t\":21.50,\"h\":4e1}}]}",
		    w1, 1);
	/* whitespace everywhere, readings before type, data before device,
	 * strings holding brackets, quotes, escapes and spaces */
	const char *w2[] = { "{\"s\":\"a } \\\" ] {\",\"n\":[1,{\"x\":null}],\"b\":true}",
			     NULL, "{}", NULL };
	check_spans(" {\n \"readings\" : [ { \"data\" : { \"s\" : \"a } \\\" ] {\" ,\n\t\"n\": [ 1 , { \"x\" : null } ] , \"b\" : true } ,"
		    " \"device\" : \"d\" } , { \"device\" : \"e\" } , {\"device\":\"f\",\"data\":{}} , 7 ] ,"
		    " \"seq\" : 2 , \"type\" : \"telemetry\" , \"extra\" : { \"readings\" : 1 } }",
		    w2, 4);
	const char *w3[] = { "{\"u\":\"\\u00e9\\/\\\\\"}" };
	check_spans("{\"type\":\"telemetry\",\"seq\":3,\"readings\":[{\"device\":\"d\",\"data\":{\"u\":\"\\u00e9\\/\\\\\"}}]}",
		    w3, 1);
}

static void test_data_spans_fallback(void **state)
{
	gw_msg m;
	char why[160];
	gw_span spans[4];

	(void)state;
	/* an escaped key could be "data" or "readings": not mapped */
	assert_int_equal(parse("{\"type\":\"telemetry\",\"seq\":1,\"readings\":[{\"device\":\"d\",\"d\\u0061ta\":{\"t\":1}}]}",
			       &m, why), GW_OK);
	assert_int_equal(gw_data_spans(&m, spans, 1), -1);
	gw_msg_clear(&m);
	assert_int_equal(parse("{\"type\":\"telemetry\",\"seq\":1,\"r\\u0065adings\":[{\"device\":\"d\",\"data\":{}}]}",
			       &m, why), GW_OK);
	assert_int_equal(gw_data_spans(&m, spans, 1), -1);
	gw_msg_clear(&m);
	/* a count that differs from the caller's */
	assert_int_equal(parse("{\"type\":\"telemetry\",\"seq\":1,\"readings\":[{\"data\":{}},{\"data\":{}}]}",
			       &m, why), GW_OK);
	assert_int_equal(gw_data_spans(&m, spans, 1), -1);
	assert_int_equal(gw_data_spans(&m, spans, 3), -1);
	assert_int_equal(gw_data_spans(&m, spans, 2), 0);
	gw_msg_clear(&m);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_telemetry_ok),
		cmocka_unit_test(test_bad_json),
		cmocka_unit_test(test_bad_message),
		cmocka_unit_test(test_reading_parse),
		cmocka_unit_test(test_announce_parse),
		cmocka_unit_test(test_error_writer),
		cmocka_unit_test(test_json_str_utf8),
		cmocka_unit_test(test_buf_i64),
		cmocka_unit_test(test_command_ack),
		cmocka_unit_test(test_fmt_decimal),
		cmocka_unit_test(test_data_spans),
		cmocka_unit_test(test_data_spans_fallback),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
