/* Unit tests of hub/slot.c: key slots against values a real Redis 7.0.15
 * answered to CLUSTER KEYSLOT (hard-coded here), hash tag edge cases, the
 * routing key of commands in argv and RESP form, redirect errors. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include "hub/slot.h"

/* redis-cli -p <cluster node> CLUSTER KEYSLOT <key>, Redis 7.0.15. */
static const struct {
	const char *key;
	unsigned slot;
} known[] = {
	{ "", 0 },
	{ "foo", 12182 },
	{ "bar", 5061 },
	{ "123456789", 12739 },
	{ "{user1000}.following", 3443 },
	{ "{user1000}.followers", 3443 },
	{ "foo{}{bar}", 8363 },        /* empty first tag: the whole key */
	{ "foo{{bar}}zap", 4015 },     /* tag "{bar" */
	{ "foo{bar}{zap}", 5061 },     /* first tag only: "bar" */
	{ "{}", 15257 },               /* empty tag: the whole key */
	{ "{a", 10276 },               /* no closing brace: the whole key */
	{ "a{b}c{d}", 3300 },          /* "b" */
	{ "a{}b", 13694 },
	{ "}a{b}", 3300 },             /* a '}' before the '{' does not count */
	{ "{{}}", 4092 },              /* tag "{" */
	{ "a}b{c", 13587 },
	{ "{b", 6215 },
	{ "x{}{y}", 14166 },
	{ "iot:dev:{kc-1}", 4926 },
	{ "iot:dev:{kc-1}:cmds", 4926 },
	{ "iot:tm:{kc-1}", 4926 },
	{ "iot:feed", 12818 },
	{ "iot:devices", 1321 },
	{ "iot:layout", 13147 },
	{ "iot:cmd:seq", 7216 },
	{ "iot:cmd:timers", 4811 },
	{ "iot:leases", 8623 },
	{ "iot:epoch", 16089 },
	{ "iot:agg:partials", 12454 },
	{ "iot:rollouts:active", 11071 },
	{ "iot:live:presence", 13003 },
};

static void test_known_slots(void **state)
{
	(void)state;
	for (size_t i = 0; i < sizeof(known) / sizeof(known[0]); i++) {
		unsigned s = hub_slot(known[i].key, strlen(known[i].key));

		if (s != known[i].slot)
			fail_msg("slot of \"%s\": %u, Redis says %u", known[i].key, s, known[i].slot);
	}
	/* Binary keys: printf 'k\xff\x00z' | redis-cli -x CLUSTER KEYSLOT. */
	assert_int_equal(hub_slot("k\xff\0z", 4), 6003);
	assert_int_equal(hub_crc16("123456789", 9), 0x31c3); /* the XMODEM check value */
}

static void key_of(const char *const *argv, int argc, const char *want)
{
	const char *k = NULL;
	size_t n = 0;
	bool got = hub_cmd_key(argc, argv, NULL, &k, &n);

	if (!want) {
		assert_false(got);
		return;
	}
	assert_true(got);
	assert_int_equal(n, strlen(want));
	assert_memory_equal(k, want, n);
}

static void test_cmd_key(void **state)
{
	(void)state;
	key_of((const char *[]){ "HGETALL", "iot:dev:{a}" }, 2, "iot:dev:{a}");
	key_of((const char *[]){ "xrange", "iot:tm:{a}", "-", "+" }, 4, "iot:tm:{a}");
	key_of((const char *[]){ "EVALSHA", "abc", "2", "k1", "k2", "x" }, 6, "k1");
	key_of((const char *[]){ "evalsha", "abc", "0", "x" }, 4, NULL);
	key_of((const char *[]){ "EVAL", "return 1", "1", "k" }, 4, "k");
	key_of((const char *[]){ "EVALSHA", "abc", "1" }, 3, NULL);
	key_of((const char *[]){ "XREAD", "COUNT", "5", "STREAMS", "s1", "s2", "0", "0" }, 8, "s1");
	key_of((const char *[]){ "XREADGROUP", "GROUP", "g", "c", "streams", "s", ">" }, 7, "s");
	key_of((const char *[]){ "PING" }, 1, NULL);
	key_of((const char *[]){ "SCRIPT", "LOAD", "return 1" }, 3, NULL);
	key_of((const char *[]){ "WAIT", "1", "100" }, 3, NULL);
	key_of((const char *[]){ "PUBLISH", "ch", "x" }, 3, NULL);
	key_of((const char *[]){ "SPUBLISH", "ch", "x" }, 3, "ch");
	key_of((const char *[]){ "cluster", "slots" }, 2, NULL);
}

static void resp_key_of(const char *resp, const char *want)
{
	const char *k = NULL;
	size_t n = 0;
	bool got = hub_resp_cmd_key(resp, strlen(resp), &k, &n);

	if (!want) {
		assert_false(got);
		return;
	}
	assert_true(got);
	assert_int_equal(n, strlen(want));
	assert_memory_equal(k, want, n);
}

static void test_resp_key(void **state)
{
	(void)state;
	resp_key_of("*2\r\n$4\r\nHGET\r\n$11\r\niot:dev:{a}\r\n", "iot:dev:{a}");
	resp_key_of("*5\r\n$7\r\nEVALSHA\r\n$3\r\nabc\r\n$1\r\n1\r\n$8\r\niot:feed\r\n$1\r\nx\r\n",
		    "iot:feed");
	resp_key_of("*4\r\n$7\r\nEVALSHA\r\n$3\r\nabc\r\n$1\r\n0\r\n$1\r\nx\r\n", NULL);
	resp_key_of("*6\r\n$5\r\nXREAD\r\n$5\r\nBLOCK\r\n$1\r\n0\r\n$7\r\nSTREAMS\r\n$1\r\ns\r\n"
		    "$1\r\n$\r\n", "s");
	resp_key_of("*1\r\n$4\r\nPING\r\n", NULL);
	/* Malformed: no routing key rather than a read past the end. */
	resp_key_of("*2\r\n$4\r\nHGET\r\n$11\r\niot:dev", NULL);
	resp_key_of("*2\r\n$4\r\nHGET\r\n$x\r\n", NULL);
	resp_key_of("$4\r\nHGET\r\n", NULL);
	resp_key_of("", NULL);
	/* Binary-safe: a key with CR LF inside. */
	resp_key_of("*2\r\n$3\r\nGET\r\n$4\r\na\r\nb\r\n", "a\r\nb");
}

static void test_redirect(void **state)
{
	char host[64];
	int slot = -1, port = -1;

	(void)state;
	assert_int_equal(hub_parse_redirect("MOVED 3999 127.0.0.1:6381", 25, &slot, host,
					    sizeof(host), &port), 1);
	assert_int_equal(slot, 3999);
	assert_string_equal(host, "127.0.0.1");
	assert_int_equal(port, 6381);
	assert_int_equal(hub_parse_redirect("ASK 0 ::1:41002", 15, &slot, host, sizeof(host),
					    &port), 2);
	assert_int_equal(slot, 0);
	assert_string_equal(host, "::1");
	assert_int_equal(port, 41002);
	assert_int_equal(hub_parse_redirect("MOVED 16383 :7000", 17, &slot, host, sizeof(host),
					    &port), 1);
	assert_string_equal(host, "");
	assert_int_equal(slot, 16383);
	assert_int_equal(hub_parse_redirect("MOVED 16384 h:1", 15, &slot, host, sizeof(host),
					    &port), 0);
	assert_int_equal(hub_parse_redirect("MOVED 1 h:0", 11, &slot, host, sizeof(host), &port), 0);
	assert_int_equal(hub_parse_redirect("MOVED 1 h", 9, &slot, host, sizeof(host), &port), 0);
	assert_int_equal(hub_parse_redirect("MOVED x h:1", 11, &slot, host, sizeof(host), &port), 0);
	assert_int_equal(hub_parse_redirect("ERR MOVED", 9, &slot, host, sizeof(host), &port), 0);
	assert_int_equal(hub_parse_redirect("CROSSSLOT Keys in request don't hash to the same slot",
					    53, &slot, host, sizeof(host), &port), 0);
	assert_int_equal(hub_parse_redirect("MOVED 1 hostname-that-is-too-long:1", 35, &slot, host,
					    8, &port), 0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_known_slots),
		cmocka_unit_test(test_cmd_key),
		cmocka_unit_test(test_resp_key),
		cmocka_unit_test(test_redirect),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
