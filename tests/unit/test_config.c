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

static void test_redis_seeds(void **state)
{
	struct hub_config c;
	char err[256], path[] = "/tmp/hubcfgXXXXXX";
	int fd;
	FILE *f;

	(void)state;
	/* One URL: one seed, the same as redis_host/redis_port. */
	assert_int_equal(load(&c, err, 2, "--redis", "redis://redis.example:6379/2"), 0);
	assert_int_equal(c.redis_nseeds, 1);
	assert_string_equal(c.redis_seeds[0].host, "redis.example");
	assert_int_equal(c.redis_seeds[0].port, 6379);
	assert_string_equal(c.redis_host, "redis.example");
	assert_int_equal(c.redis_db, 2);
	assert_null(c.redis_password);
	hub_config_free(&c);
	/* A seed list: names, IPv4, IPv6, with or without the scheme, spaces. */
	assert_int_equal(load(&c, err, 2, "--redis",
			      "redis://h1:7001,redis://10.0.0.2:7002, [::1]:7003 ,node-4.local:7004"), 0);
	assert_int_equal(c.redis_nseeds, 4);
	assert_string_equal(c.redis_seeds[0].host, "h1");
	assert_int_equal(c.redis_seeds[0].port, 7001);
	assert_string_equal(c.redis_seeds[1].host, "10.0.0.2");
	assert_int_equal(c.redis_seeds[1].port, 7002);
	assert_string_equal(c.redis_seeds[2].host, "::1");
	assert_int_equal(c.redis_seeds[2].port, 7003);
	assert_string_equal(c.redis_seeds[3].host, "node-4.local");
	assert_int_equal(c.redis_seeds[3].port, 7004);
	assert_string_equal(c.redis_host, "h1");
	assert_int_equal(c.redis_port, 7001);
	assert_int_equal(c.redis_db, 0);
	hub_config_free(&c);
	/* A password given once applies to every seed; given twice, the same. */
	assert_int_equal(load(&c, err, 2, "--redis", "redis://h1:1,redis://:pw@h2:2"), 0);
	assert_string_equal(c.redis_password, "pw");
	hub_config_free(&c);
	assert_int_equal(load(&c, err, 2, "--redis", "redis://u:pw@h1:1,redis://:pw@h2:2"), 0);
	assert_string_equal(c.redis_password, "pw");
	hub_config_free(&c);
	assert_int_equal(load(&c, err, 2, "--redis", "redis://:a@h1:1,redis://:b@h2:2"), -1);
	assert_string_equal(err, "redis: the seed URLs name different passwords");
	hub_config_free(&c);
	/* /DB: refused with several seeds (a cluster has database 0 only). */
	assert_int_equal(load(&c, err, 2, "--redis", "redis://h1:1/3,redis://h2:2"), -1);
	assert_string_equal(err, "redis: a database number (/3) is refused with several seed "
			    "URLs: a Redis Cluster has database 0 only");
	hub_config_free(&c);
	assert_int_equal(load(&c, err, 2, "--redis", "redis://h1:1,redis://h2:2/0"), 0);
	hub_config_free(&c);
	/* Malformed seeds. */
	assert_int_equal(load(&c, err, 2, "--redis", "redis://h1:1,"), -1);
	assert_string_equal(err, "redis: expected redis://HOST:PORT[/DB] (or several, "
			    "comma-separated) or embedded, got \"\"");
	hub_config_free(&c);
	assert_int_equal(load(&c, err, 2, "--redis", "redis://h1:1,redis://h_2"), -1);
	assert_non_null(strstr(err, "got \"redis://h_2\""));
	hub_config_free(&c);
	assert_int_equal(load(&c, err, 2, "--redis", "redis://h1:0"), -1);
	hub_config_free(&c);
	assert_int_equal(load(&c, err, 2, "--redis", "redis://bad/host:1"), -1);
	hub_config_free(&c);
	assert_int_equal(load(&c, err, 2, "--redis", "redis://[nope]:1"), -1);
	hub_config_free(&c);
	assert_int_equal(load(&c, err, 2, "--redis", "redis://h1:1/x"), -1);
	assert_string_equal(err, "redis: bad database number in \"redis://h1:1/x\"");
	hub_config_free(&c);
	assert_int_equal(load(&c, err, 2, "--redis", "a:1,b:2,c:3,d:4,e:5,f:6,g:7,h:8,i:9,j:10,"
			      "k:11,l:12,m:13,n:14,o:15,p:16,q:17"), -1);
	assert_string_equal(err, "redis: at most 16 seed URLs");
	hub_config_free(&c);
	/* The config file and the environment take the same list. */
	fd = mkstemp(path);
	f = fdopen(fd, "w");
	fprintf(f, "redis redis://127.0.0.1:41001,redis://127.0.0.1:41002\n");
	fclose(f);
	assert_int_equal(load(&c, err, 2, "--config", path), 0);
	assert_int_equal(c.redis_nseeds, 2);
	assert_int_equal(c.redis_seeds[1].port, 41002);
	hub_config_free(&c);
	setenv("IOT_HUB_REDIS", "redis://localhost:41003,redis://localhost:41004", 1);
	assert_int_equal(load(&c, err, 2, "--config", path), 0);
	assert_int_equal(c.redis_nseeds, 2);
	assert_string_equal(c.redis_seeds[0].host, "localhost");
	assert_int_equal(c.redis_seeds[1].port, 41004);
	hub_config_free(&c);
	unsetenv("IOT_HUB_REDIS");
	unlink(path);
}

struct reported {
	int n;
	char var[4][64], closest[4][64];
};

static void report(const char *var, const char *closest, void *arg)
{
	struct reported *r = arg;

	if (r->n < 4) {
		snprintf(r->var[r->n], sizeof(r->var[0]), "%s", var);
		snprintf(r->closest[r->n], sizeof(r->closest[0]), "%s", closest);
	}
	r->n++;
}

static void test_dev_and_unknown_env(void **state)
{
	struct hub_config c;
	char err[256];
	char *env[] = { "PATH=/bin", "IOT_HUB_JWT_KYE=/x", "IOT_HUB_CONFIG=/etc/x.conf",
			"IOT_HUB_MAX_FRAME_BYTES=1", "IOT_HUB_LISTN=1", "IOT_HUB_=", "iot_hub_lower=1",
			NULL };
	struct reported r = { 0 };

	(void)state;
	assert_int_equal(load(&c, err, 0), 0);
	assert_false(c.dev);
	hub_config_free(&c);
	assert_int_equal(load(&c, err, 1, "--dev"), 0);
	assert_true(c.dev);
	hub_config_free(&c);
	assert_int_equal(load(&c, err, 1, "--dev=1"), -1); /* a flag takes no value */
	hub_config_free(&c);

	assert_int_equal(hub_config_env_unknown(env, report, &r), 2);
	assert_string_equal(r.var[0], "IOT_HUB_JWT_KYE");
	assert_string_equal(r.closest[0], "IOT_HUB_JWT_KEY");
	assert_string_equal(r.var[1], "IOT_HUB_LISTN");
	assert_string_equal(r.closest[1], "IOT_HUB_LISTEN");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_defaults),
		cmocka_unit_test(test_flags_and_redis_url),
		cmocka_unit_test(test_errors),
		cmocka_unit_test(test_precedence),
		cmocka_unit_test(test_durability),
		cmocka_unit_test(test_redis_seeds),
		cmocka_unit_test(test_dev_and_unknown_env),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
