/* Unit tests of the key-name builders (hub/keys.h). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <cmocka.h>

#include "hub/keys.h"

static void test_names(void **state)
{
	char k[HUB_KEY_MAX];

	(void)state;
	assert_int_equal(hub_key_dev(k, sizeof(k), "kc-1"), strlen("iot:dev:{kc-1}"));
	assert_string_equal(k, "iot:dev:{kc-1}");
	hub_key_dev(k, sizeof(k), "kc-1:cmds");
	assert_string_equal(k, "iot:dev:{kc-1:cmds}");
	hub_key_dev_cancels(k, sizeof(k), "x");
	assert_string_equal(k, "iot:dev:{x}:cancels");
	hub_key_tm(k, sizeof(k), "a:tm");
	assert_string_equal(k, "iot:tm:{a:tm}");
	hub_key_gw_seqs(k, sizeof(k), "g");
	assert_string_equal(k, "iot:gw:{g}:seqs");
	hub_key_gw_epoch(k, sizeof(k), "g:seqs");
	assert_string_equal(k, "iot:gw:{g:seqs}:epoch");
	hub_key_type(k, sizeof(k), "thermostat");
	assert_string_equal(k, "iot:type:{thermostat}");
	assert_int_equal(hub_ch_raw(k, sizeof(k), "power-meter"), strlen("iot:live:raw:power-meter"));
	assert_string_equal(k, "iot:live:raw:power-meter");
	hub_ch_ctl_cmd(k, sizeof(k), "hub-1");
	assert_string_equal(k, "iot:ctl:cmd:hub-1");
}

/* The layout-1 collision: device kc-1:cmds's hash was device kc-1's queue. */
static void test_no_collision(void **state)
{
	char a[HUB_KEY_MAX], b[HUB_KEY_MAX];

	(void)state;
	hub_key_dev(a, sizeof(a), "kc-1:cmds");
	snprintf(b, sizeof(b), "%s", "iot:dev:{kc-1}:cmds");
	assert_string_not_equal(a, b);
	hub_key_dev(a, sizeof(a), "x:cancels");
	hub_key_dev_cancels(b, sizeof(b), "x");
	assert_string_not_equal(a, b);
}

static void test_limits(void **state)
{
	char id[HUB_ID_MAX + 2], k[HUB_KEY_MAX], small[16];

	(void)state;
	memset(id, 'a', HUB_ID_MAX);
	id[HUB_ID_MAX] = '\0';
	/* The longest key of a valid id fits HUB_KEY_MAX. */
	assert_int_equal(hub_key_dev_cancels(k, sizeof(k), id), HUB_ID_MAX + 18);
	assert_int_equal(strlen(k), HUB_ID_MAX + 18);
	assert_int_equal(hub_key_gw_epoch(k, sizeof(k), id), HUB_ID_MAX + 15);
	/* Longer than an id, empty, or too small a buffer: 0 and "". */
	id[HUB_ID_MAX] = 'a';
	id[HUB_ID_MAX + 1] = '\0';
	assert_int_equal(hub_key_dev(k, sizeof(k), id), 0);
	assert_string_equal(k, "");
	assert_int_equal(hub_ch_raw(k, sizeof(k), id), 0);
	assert_string_equal(k, "");
	assert_int_equal(hub_key_tm(k, sizeof(k), ""), 0);
	assert_int_equal(hub_key_tm(small, sizeof(small), "abcdefg"), 0);
	assert_string_equal(small, "");
	/* Exactly fitting: "iot:tm:{" + 6 + "}" + NUL = 16 bytes. */
	assert_int_equal(hub_key_tm(small, sizeof(small), "abcdef"), 15);
	assert_string_equal(small, "iot:tm:{abcdef}");
}

/* The Lua helpers spell the same names. */
static void test_lua_spelling(void **state)
{
	(void)state;
	assert_non_null(strstr(HUB_LUA_KDEV, "return 'iot:dev:{' .. d .. '}' end"));
	assert_non_null(strstr(HUB_LUA_KCMDS, "return 'iot:dev:{' .. d .. '}:cmds' end"));
	assert_non_null(strstr(HUB_LUA_KCMDLOG, "return 'iot:dev:{' .. d .. '}:cmdlog' end"));
	assert_non_null(strstr(HUB_LUA_KCANCELS, "return 'iot:dev:{' .. d .. '}:cancels' end"));
	assert_non_null(strstr(HUB_LUA_KTYPE, "return 'iot:type:{' .. t .. '}' end"));
	assert_non_null(strstr(HUB_LUA_KIDEM, "return 'iot:idem:{' .. owner .. '}:' .. key end"));
	assert_non_null(strstr(HUB_LUA_KCMD, "return 'iot:cmd:' .. id .. ':log' end"));
	assert_non_null(strstr(HUB_LUA_KROLLOUT, "return 'iot:rollout:' .. id .. ':cmds' end"));
	assert_non_null(strstr(HUB_LUA_FIXED, "'iot:cmd:timers'"));
	assert_non_null(strstr(HUB_LUA_FIXED, "'iot:leases', 'iot:epoch'"));
	assert_non_null(strstr(HUB_LUA_KRUN, "local TOKEN_LEN = 12\n"));
	assert_non_null(strstr(HUB_LUA_KRUN, "return 'iot:inst:{' .. string.sub(r, 1, -TOKEN_LEN - 2)"));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_names),
		cmocka_unit_test(test_no_collision),
		cmocka_unit_test(test_limits),
		cmocka_unit_test(test_lua_spelling),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
