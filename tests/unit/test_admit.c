/* Unit tests of a reading's admission (protocols/admit.h): each check in its
 * order, the code it returns and the rejection entry it writes. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <cmocka.h>

#include "protocols/admit.h"

#define NOW 1800000000000LL

/* The devices this connection announced: "d1" of type "t", "gone" taken
 * over, "old" of a type no longer loaded. */
struct conn {
	const schema_type *t;
};

static void lookup(void *ctx, const char *device, size_t len, struct admit_device *out)
{
	struct conn *c = ctx;

	if (len == 2 && !memcmp(device, "d1", 2)) {
		out->announced = true;
		out->type = c->t;
		out->type_name = "t";
		out->ref = c;
	} else if (len == 4 && !memcmp(device, "gone", 4)) {
		out->announced = true;
		out->lost = true;
		out->type = c->t;
	} else if (len == 3 && !memcmp(device, "old", 3)) {
		out->announced = true;
		out->type_name = "retired";
	}
}

static schema_set *set;
static struct conn conn;

static int setup(void **state)
{
	char err[256] = "";
	json_t *docs = json_loads("[{\"device_type\":\"t\",\"telemetry\":{\"type\":\"object\","
				  "\"properties\":{\"v\":{\"type\":\"number\",\"maximum\":10}},"
				  "\"required\":[\"v\"]}}]", 0, NULL);

	(void)state;
	set = schema_set_from_json(docs, err, sizeof(err));
	json_decref(docs);
	if (!set)
		fail_msg("schema: %s", err);
	conn.t = schema_set_find(set, "t", 1);
	return 0;
}

static int teardown(void **state)
{
	(void)state;
	schema_set_free(set);
	return 0;
}

/* Admits item (JSON text) under a claim of "d*" (NULL claim when !claimed);
 * returns the code and the rejection text in out. */
static enum hub_reject_code run(const char *item, bool claimed, char *out, size_t outlen)
{
	char *pat = "d*";
	auth_patterns claim = { &pat, 1, false };
	struct admit_rules r = { NOW, 60000, 5000, claimed ? &claim : NULL, lookup, &conn };
	struct admit_device dev;
	gw_reading rd;
	hub_buf rej = { 0 };
	json_t *j = json_loads(item, 0, NULL);
	enum hub_reject_code code;

	assert_non_null(j);
	code = admit_reading(&r, j, 3, &rd, &dev, &rej);
	snprintf(out, outlen, "%.*s", (int)rej.len, rej.data ? rej.data : "");
	if (code == HUB_REJ_NONE) {
		assert_int_equal(rej.len, 0);
		assert_ptr_equal(dev.ref, &conn);
	}
	hub_buf_free(&rej);
	json_decref(j);
	return code;
}

static void test_admitted(void **state)
{
	char out[512];

	(void)state;
	assert_int_equal(run("{\"device\":\"d1\",\"data\":{\"v\":1}}", true, out, sizeof(out)),
			 HUB_REJ_NONE);
	assert_int_equal(run("{\"device\":\"d1\",\"ts\":1800000004000,\"data\":{\"v\":1}}", true,
			     out, sizeof(out)), HUB_REJ_NONE);
}

static void test_each_check(void **state)
{
	char out[512];

	(void)state;
	assert_int_equal(run("{\"data\":{\"v\":1}}", true, out, sizeof(out)), HUB_REJ_INVALID);
	assert_non_null(strstr(out, "\"index\":3"));
	assert_int_equal(run("{\"device\":\"gone\",\"data\":{\"v\":1}}", true, out, sizeof(out)),
			 HUB_REJ_UNKNOWN_DEVICE);
	assert_non_null(strstr(out, "announce it again"));
	assert_int_equal(run("{\"device\":\"x9\",\"data\":{\"v\":1}}", true, out, sizeof(out)),
			 HUB_REJ_UNAUTHORIZED_DEVICE);
	assert_int_equal(run("{\"device\":\"d9\",\"data\":{\"v\":1}}", true, out, sizeof(out)),
			 HUB_REJ_UNKNOWN_DEVICE);
	assert_non_null(strstr(out, "not announced"));
	/* Without a claim, an unannounced device is just unknown. */
	assert_int_equal(run("{\"device\":\"x9\",\"data\":{\"v\":1}}", false, out, sizeof(out)),
			 HUB_REJ_UNKNOWN_DEVICE);
	assert_int_equal(run("{\"device\":\"d1\",\"ts\":1800000006000,\"data\":{\"v\":1}}", true,
			     out, sizeof(out)), HUB_REJ_CLOCK_SKEW);
	assert_non_null(strstr(out, "\"hub_time\":1800000000000"));
	assert_int_equal(run("{\"device\":\"d1\",\"ts\":1799999939999,\"data\":{\"v\":1}}", true,
			     out, sizeof(out)), HUB_REJ_CLOCK_SKEW);
	assert_int_equal(run("{\"device\":\"old\",\"data\":{\"v\":1}}", true, out, sizeof(out)),
			 HUB_REJ_INVALID);
	assert_non_null(strstr(out, "no longer loaded"));
	assert_int_equal(run("{\"device\":\"d1\",\"data\":{\"v\":11}}", true, out, sizeof(out)),
			 HUB_REJ_INVALID);
	assert_non_null(strstr(out, "data.v"));
}

/* The first failing check decides: a taken-over device with a bad ts is
 * refused for the device, not the clock. */
static void test_order(void **state)
{
	char out[512];

	(void)state;
	assert_int_equal(run("{\"device\":\"gone\",\"ts\":1,\"data\":{\"v\":99}}", true, out,
			     sizeof(out)), HUB_REJ_UNKNOWN_DEVICE);
	assert_int_equal(run("{\"device\":\"d1\",\"ts\":1,\"data\":{\"v\":99}}", true, out,
			     sizeof(out)), HUB_REJ_CLOCK_SKEW);
}

static void test_rate_limited_entry(void **state)
{
	gw_reading rd = { "d1", 2, 0, false, NULL };
	hub_buf b = { 0 };

	(void)state;
	admit_reject_rate_limited(&b, 7, &rd, 250);
	assert_non_null(strstr(b.data, "\"code\":\"rate_limited\""));
	assert_non_null(strstr(b.data, "\"retry_after_ms\":250}"));
	assert_non_null(strstr(b.data, "\"index\":7"));
	hub_buf_free(&b);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_admitted),
		cmocka_unit_test(test_each_check),
		cmocka_unit_test(test_order),
		cmocka_unit_test(test_rate_limited_entry),
	};

	return cmocka_run_group_tests(tests, setup, teardown);
}
