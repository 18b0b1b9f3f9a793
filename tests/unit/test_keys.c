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
	hub_key_idx_type(k, sizeof(k), 0, "thermostat");
	assert_string_equal(k, "iot:idx:{3560}:type:thermostat");
	assert_int_equal(hub_slot(k, strlen(k)), 0);
	hub_key_idx_devices(k, sizeof(k), hub_dev_slot("kc-1"));
	assert_int_equal(hub_slot(k, strlen(k)), hub_slot("iot:dev:{kc-1}", 14));
	for (unsigned s = 0; s < HUB_SLOTS; s += 97) {
		hub_key_idx_timers(k, sizeof(k), s);
		assert_int_equal(hub_slot(k, strlen(k)), s);
	}
	assert_int_equal(hub_ch_raw(k, sizeof(k), "power-meter"), strlen("iot:live:raw:power-meter"));
	assert_string_equal(k, "iot:live:raw:power-meter");
	hub_ch_ctl_cmd(k, sizeof(k), "hub-1");
	assert_string_equal(k, "iot:ctl:cmd:{hub-1}");
}

/* Ingest shards: the tag first, the name last; the shard of a gateway is
 * FNV-1a % n (the test harness's rkeys.shard_of computes the same). */
static void test_ingest_shards(void **state)
{
	char k[HUB_KEY_MAX], name[HUB_ID_MAX + 2];

	(void)state;
	assert_int_equal(hub_key_tm_shard(k, sizeof(k), 3, "kc-1"), strlen("iot:tm:{i3}:kc-1"));
	assert_string_equal(k, "iot:tm:{i3}:kc-1");
	hub_key_seqs(k, sizeof(k), 15, "g:seqs");
	assert_string_equal(k, "iot:seqs:{i15}:g:seqs");
	assert_int_equal(hub_key_feed(k, sizeof(k), 0), strlen("iot:feed:{i0}"));
	assert_string_equal(k, "iot:feed:{i0}");
	hub_ch_raw_shard(k, sizeof(k), 7, "power-meter");
	assert_string_equal(k, "iot:live:{i7}:raw:power-meter");
	assert_int_equal(hub_key_feed(k, sizeof(k), HUB_FEED_SHARDS_MAX), 0);
	assert_int_equal(hub_key_tm_shard(k, sizeof(k), 0, ""), 0);
	memset(name, 'x', HUB_ID_MAX);
	name[HUB_ID_MAX] = '\0';
	assert_true(hub_key_tm_shard(k, sizeof(k), 63, name) > 0);
	assert_true(hub_ch_raw_shard(k, sizeof(k), 63, name) > 0);
	assert_true(hub_key_seqs(k, sizeof(k), 63, name) > 0);
	name[HUB_ID_MAX] = 'x';
	name[HUB_ID_MAX + 1] = '\0';
	assert_int_equal(hub_key_tm_shard(k, sizeof(k), 0, name), 0);
	assert_int_equal(hub_ingest_shard_of("anything", 1), 0);
	assert_int_equal(hub_ingest_shard_of("", 16), 2166136261u % 16);
	assert_int_equal(hub_ingest_shard_of("a", 16), ((2166136261u ^ 'a') * 16777619u) % 16);
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

/* The keys the scripts get in KEYS (hub/lua/). */
static void test_script_keys(void **state)
{
	char k[HUB_KEY_MAX], run[HUB_KEY_MAX], idem[HUB_KEY_IDEM_MAX], id[HUB_ID_MAX + 1];

	(void)state;
	hub_key_dev_cmds(k, sizeof(k), "d:1");
	assert_string_equal(k, "iot:dev:{d:1}:cmds");
	hub_key_dev_cmdlog(k, sizeof(k), "d");
	assert_string_equal(k, "iot:dev:{d}:cmdlog");
	assert_int_equal(hub_key_cmd(k, sizeof(k), "c_ab"), strlen("iot:cmd:{c_ab}"));
	assert_string_equal(k, "iot:cmd:{c_ab}");
	assert_int_equal(hub_key_cmd_log(k, sizeof(k), "c_ab"), strlen("iot:cmd:{c_ab}:log"));
	assert_string_equal(k, "iot:cmd:{c_ab}:log");
	hub_key_rollout(k, sizeof(k), "r_1");
	assert_string_equal(k, "iot:rollout:{r_1}");
	hub_key_rollout_cmds(k, sizeof(k), "r_1");
	assert_string_equal(k, "iot:rollout:{r_1}:cmds");
	assert_int_equal(hub_key_cmd(k, sizeof(k), ""), 0);
	assert_string_equal(k, "");

	assert_int_equal(hub_key_idem(idem, sizeof(idem), "d-1", "ops", "k-1"),
			 strlen("iot:idem:{d-1}:{ops}:k-1"));
	assert_string_equal(idem, "iot:idem:{d-1}:{ops}:k-1");
	hub_key_idem(idem, sizeof(idem), "d", "", "k");
	assert_string_equal(idem, "iot:idem:{d}:{}:k");
	assert_int_equal(hub_key_idem(idem, sizeof(idem), "d", "ops", ""), 0);
	memset(id, 'a', HUB_ID_MAX);
	id[HUB_ID_MAX] = '\0';
	/* Both at their longest fit HUB_KEY_IDEM_MAX. */
	assert_int_equal(hub_key_idem(idem, sizeof(idem), id, id, id), 3 * HUB_ID_MAX + 15);

	/* A connection id's run, and the run's keys. */
	assert_int_equal(hub_run_of_conn(run, sizeof(run), "hub-1:0123456789ab:42"),
			 strlen("hub-1:0123456789ab"));
	assert_string_equal(run, "hub-1:0123456789ab");
	assert_int_equal(hub_run_of_conn(run, sizeof(run), "a:b:0123456789ab:7"),
			 strlen("a:b:0123456789ab"));
	assert_int_equal(hub_run_of_conn(run, sizeof(run), "hub-1:42"), 0);
	assert_string_equal(run, "");
	assert_int_equal(hub_run_of_conn(run, sizeof(run), "hub-1:0123456789AB:1"), 0);
	assert_int_equal(hub_run_of_conn(run, sizeof(run), "hub-1:0123456789ab:"), 0);
	assert_int_equal(hub_run_of_conn(run, sizeof(run), ":0123456789ab:1"), 0);
	assert_int_equal(hub_key_run(k, sizeof(k), "a:b:0123456789ab"),
			 strlen("iot:inst:{a:b}:0123456789ab"));
	assert_string_equal(k, "iot:inst:{a:b}:0123456789ab");
	hub_key_run_reaper(k, sizeof(k), "hub-1:0123456789ab");
	assert_string_equal(k, "iot:{hub}:reaper:hub-1:0123456789ab");
	assert_int_equal(hub_key_run(k, sizeof(k), "hub-1"), 0);
	assert_string_equal(k, "");
	/* A run's slot-local set and its slot bitmap. */
	assert_int_equal(hub_key_idx_run(k, sizeof(k), 0, "a:b:0123456789ab"),
			 strlen("iot:idx:{3560}:run:a:b:0123456789ab"));
	assert_string_equal(k, "iot:idx:{3560}:run:a:b:0123456789ab");
	assert_int_equal(hub_slot(k, strlen(k)), 0);
	assert_int_equal(hub_key_idx_run(k, sizeof(k), 0, "hub-1"), 0);
	assert_string_equal(k, "");
	hub_key_runslots(k, sizeof(k), "hub-1:0123456789ab");
	assert_string_equal(k, "iot:{hub}:runslots:hub-1:0123456789ab");
	assert_int_equal(hub_key_runslots(k, sizeof(k), "hub-1"), 0);
	/* The longest: an instance id of HUB_ID_MAX, its reaper claim, its
	 * bitmap and its set of a slot with a 6-digit tag. */
	memcpy(run, id, HUB_ID_MAX);
	memcpy(run + HUB_ID_MAX, ":0123456789ab", 14);
	assert_int_equal(hub_key_run_reaper(k, sizeof(k), run), HUB_ID_MAX + 13 + 17);
	assert_int_equal(hub_key_run_reaper(k, HUB_ID_MAX + 13 + 17, run), 0);
	assert_int_equal(hub_key_runslots(k, sizeof(k), run), HUB_ID_MAX + 13 + 19);
	for (unsigned s = 0; s < HUB_SLOTS; s++) {
		char tag[HUB_SLOT_TAG_MAX];
		size_t tl = hub_slot_tag(s, tag);
		assert_int_equal(hub_key_idx_run(k, sizeof(k), s, run), 8 + tl + 2 + 5 + HUB_ID_MAX + 13);
	}
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_names),
		cmocka_unit_test(test_ingest_shards),
		cmocka_unit_test(test_no_collision),
		cmocka_unit_test(test_limits),
		cmocka_unit_test(test_script_keys),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
