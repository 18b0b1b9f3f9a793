/* Unit tests of the config loader: defaults, file, flags, env precedence. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include "hub/config.h"

static int load(struct hub_config *c, char *err, int argc, ...)
{
	char *argv[32] = { "iot-hub" };
	va_list ap;

	va_start(ap, argc);
	for (int i = 0; i < argc; i++)
		argv[i + 1] = va_arg(ap, char *);
	va_end(ap);
	return hub_config_load(c, argc + 1, argv, err, 256);
}

static void test_defaults(void **state)
{
	struct hub_config c;
	char err[256];

	(void)state;
	assert_int_equal(load(&c, err, 0), 0);
	assert_string_equal(c.listen_host, "127.0.0.1");
	assert_int_equal(c.listen_port, 8080);
	assert_true(c.redis_embedded);
	assert_int_equal(c.max_frame_bytes, 65536);
	assert_string_equal(c.jwt_alg, "HS256");
	assert_int_equal(c.lease_ttl_ms, 8000);
	assert_int_equal(c.lease_renew_ms, 2000);
	hub_config_free(&c);
}

static void test_flags_and_redis_url(void **state)
{
	struct hub_config c;
	char err[256];

	(void)state;
	assert_int_equal(load(&c, err, 3, "--redis", "redis://:pw@127.0.0.1:6390/3",
			      "--listen=[::1]:0"), 0);
	assert_false(c.redis_embedded);
	assert_string_equal(c.redis_host, "127.0.0.1");
	assert_int_equal(c.redis_port, 6390);
	assert_int_equal(c.redis_db, 3);
	assert_string_equal(c.redis_password, "pw");
	assert_string_equal(c.listen_host, "::1");
	assert_int_equal(c.listen_port, 0);
	hub_config_free(&c);
}

static void test_errors(void **state)
{
	struct hub_config c;
	char err[256];

	(void)state;
	assert_int_equal(load(&c, err, 1, "--nope"), -1);
	assert_string_equal(err, "unknown flag --nope (see --help)");
	hub_config_free(&c);
	assert_int_equal(load(&c, err, 2, "--max-frame-bytes", "10"), -1);
	assert_non_null(strstr(err, "max-frame-bytes must be an integer in [256"));
	hub_config_free(&c);
	assert_int_equal(load(&c, err, 2, "--jwt-alg", "none"), -1);
	hub_config_free(&c);
	assert_int_equal(load(&c, err, 2, "--jwt-alg", "RS256"), -1);
	assert_string_equal(err, "jwt-alg RS256 needs jwt-key (the PEM public key)");
	hub_config_free(&c);
	assert_int_equal(load(&c, err, 2, "--tls-cert", "x.pem"), -1);
	hub_config_free(&c);
	assert_int_equal(load(&c, err, 2, "--redis", "localhost"), -1);
	hub_config_free(&c);
	assert_int_equal(load(&c, err, 1, "--listen"), -1);
	assert_string_equal(err, "flag --listen needs a value");
	hub_config_free(&c);
	assert_int_equal(load(&c, err, 2, "--lease-renew-ms", "5000"), -1);
	assert_string_equal(err, "lease-renew-ms must be at most half of lease-ttl-ms");
	hub_config_free(&c);
	assert_int_equal(load(&c, err, 4, "--lease-renew-ms", "500", "--lease-ttl-ms", "1000"), 0);
	assert_int_equal(c.lease_ttl_ms, 1000);
	assert_int_equal(c.lease_renew_ms, 500);
	hub_config_free(&c);
}

static void test_precedence(void **state)
{
	struct hub_config c;
	char err[256], path[] = "/tmp/hubcfgXXXXXX";
	int fd = mkstemp(path);
	FILE *f = fdopen(fd, "w");

	(void)state;
	fprintf(f, "# comment\nmax-frame-bytes 4096\ndevice-rate = 5\nlog-level \"debug\"\n");
	fclose(f);
	/* file < flag < env */
	assert_int_equal(load(&c, err, 4, "--config", path, "--device-rate", "7"), 0);
	assert_int_equal(c.max_frame_bytes, 4096);
	assert_true(c.device_rate == 7);
	assert_string_equal(c.log_level, "debug");
	hub_config_free(&c);
	setenv("IOT_HUB_DEVICE_RATE", "9", 1);
	assert_int_equal(load(&c, err, 4, "--config", path, "--device-rate", "7"), 0);
	assert_true(c.device_rate == 9);
	hub_config_free(&c);
	unsetenv("IOT_HUB_DEVICE_RATE");

	f = fopen(path, "w");
	fprintf(f, "bogus-key 1\n");
	fclose(f);
	assert_int_equal(load(&c, err, 2, "--config", path), -1);
	assert_non_null(strstr(err, ":1: unknown key \"bogus-key\""));
	hub_config_free(&c);
	unlink(path);
}

static void test_durability(void **state)
{
	struct hub_config c;
	char err[256];

	(void)state;
	assert_int_equal(load(&c, err, 0), 0);
	assert_string_equal(c.data_dir, "./iot-hub-data");
	assert_int_equal(c.ack_mode, HUB_ACK_ACCEPTED);
	assert_int_equal(c.ack_replicas, 1);
	assert_int_equal(c.ack_wait_ms, 1000);
	hub_config_free(&c);
	assert_int_equal(load(&c, err, 4, "--ack-durability", "fsync", "--data-dir", "/var/lib/x"), 0);
	assert_int_equal(c.ack_mode, HUB_ACK_FSYNC);
	assert_string_equal(c.data_dir, "/var/lib/x");
	hub_config_free(&c);
	assert_int_equal(load(&c, err, 8, "--ack-durability", "replicated", "--redis",
			      "redis://127.0.0.1:6379", "--ack-replicas", "2", "--ack-wait-ms", "1000"), 0);
	assert_int_equal(c.ack_mode, HUB_ACK_REPLICATED);
	assert_int_equal(c.ack_replicas, 2);
	hub_config_free(&c);
	/* No replicas behind the embedded Redis. */
	assert_int_equal(load(&c, err, 2, "--ack-durability", "replicated"), -1);
	assert_non_null(strstr(err, "ack-durability replicated needs a Redis with replicas"));
	hub_config_free(&c);
	/* A WAIT must leave the watchdog room. */
	assert_int_equal(load(&c, err, 6, "--ack-durability", "replicated", "--redis",
			      "redis://127.0.0.1:6379", "--ack-wait-ms", "1001"), -1);
	assert_string_equal(err, "ack-wait-ms 1001 must be at most half of redis-timeout-ms 2000");
	hub_config_free(&c);
	assert_int_equal(load(&c, err, 2, "--ack-durability", "Fsync"), -1);
	assert_string_equal(err, "ack-durability: expected accepted, fsync or replicated, got \"Fsync\"");
	hub_config_free(&c);
	assert_int_equal(load(&c, err, 2, "--data-dir", ""), -1);
	assert_string_equal(err, "data-dir: a directory is required with redis embedded");
	hub_config_free(&c);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_defaults),
		cmocka_unit_test(test_flags_and_redis_url),
		cmocka_unit_test(test_errors),
		cmocka_unit_test(test_precedence),
		cmocka_unit_test(test_durability),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
