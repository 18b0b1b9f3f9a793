#include "hub/config.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "hub/log.h"
#include "hub/opts.h"
#include "hub/rollup_core.h"
#include "hub/util.h"

#define O(n, t, f, d, lo, hi, h) { n, t, offsetof(struct hub_config, f), d, lo, hi, h, NULL, 0, NULL, NULL }

static const struct opt opts[] = {
	O("listen", OPT_STR, listen, "127.0.0.1:8080", 0, 0, "address to serve ws/http on (HOST:PORT, port 0 = any free port)"),
	O("redis", OPT_STR, redis, "embedded", 0, 0, "redis://HOST:PORT[/DB], or a comma-separated list of Redis Cluster seed URLs, or embedded to start a private redis-server"),
	O("redis-server", OPT_STR, redis_server, "redis-server", 0, 0, "redis-server binary used in embedded mode"),
	O("data-dir", OPT_STR, data_dir, "./iot-hub-data", 0, 0, "embedded mode: the Redis data directory (append-only file), kept across restarts; one hub at a time (locked)"),
	O("ack-durability", OPT_STR, ack_durability, "accepted", 0, 0, "what a telemetry ack promises: accepted (Redis took it), fsync (Redis must run appendonly yes + appendfsync always, checked) or replicated (WAIT for ack-replicas replicas)"),
	O("ack-replicas", OPT_INT, ack_replicas, "1", 1, 64, "ack-durability replicated: replicas that must confirm a frame before it is acked"),
	O("ack-wait-ms", OPT_INT, ack_wait_ms, "1000", 1, 300000, "ack-durability replicated: longest wait for them, then the frame is answered unavailable (at most half of redis-timeout-ms)"),
	O("schemas", OPT_STR, schemas, "deploy/device-types", 0, 0, "directory of device-type JSON files"),
	O("jwt-alg", OPT_STR, jwt_alg, "HS256", 0, 0, "gateway JWT algorithm: HS256, RS256 or ES256"),
	O("jwt-key", OPT_STR, jwt_key, NULL, 0, 0, "file with the HS256 secret or the PEM public key (unset: ephemeral dev secret)"),
	O("jwt-issuer", OPT_STR, jwt_issuer, NULL, 0, 0, "required iss claim (unset: not checked)"),
	O("jwt-audience", OPT_STR, jwt_audience, NULL, 0, 0, "required aud claim (unset: not checked)"),
	O("jwt-leeway-s", OPT_INT, jwt_leeway_s, "30", 0, 3600, "clock tolerance for exp/nbf, seconds"),
	O("api-keys", OPT_STR, api_keys, NULL, 0, 0, "JSON file of API keys (SHA-256 hashes, scopes, device patterns)"),
	O("tls-cert", OPT_STR, tls_cert, NULL, 0, 0, "PEM server certificate (enables wss/https)"),
	O("tls-key", OPT_STR, tls_key, NULL, 0, 0, "PEM server private key"),
	O("tls-client-ca", OPT_STR, tls_client_ca, NULL, 0, 0, "PEM CA: gateways must present a cert it signed, CN = JWT sub"),
	O("instance-id", OPT_STR, instance_id, NULL, 0, 0, "this hub instance's id (unset: hostname-pid)"),
	O("log-level", OPT_STR, log_level, "info", 0, 0, "error, warn, info or debug"),
	O("max-frame-bytes", OPT_INT, max_frame_bytes, "65536", 256, 16777216, "largest gateway message; over it the hub closes with 1009"),
	O("max-readings-per-frame", OPT_INT, max_readings_per_frame, "1000", 1, 100000, "readings per telemetry frame; more is a bad_message"),
	O("max-inflight-frames", OPT_INT, max_inflight_frames, "32", 1, 4096, "frames awaiting Redis per connection before the hub stops reading it"),
	O("registry-inflight", OPT_INT, registry_inflight, "128", 1, 100000, "connect and announce calls this hub has at Redis at once; more wait in a queue in the hub (a reconnect storm cannot bury its lease renewals)"),
	O("max-devices-per-gateway", OPT_INT, max_devices_per_gateway, "10000", 1, 1000000, "devices one gateway connection may announce"),
	O("device-rate", OPT_DBL, device_rate, "100", 0, 1e9, "readings/s per device (token bucket rate; 0 = unlimited)"),
	O("device-burst", OPT_DBL, device_burst, "200", 1, 1e9, "per-device bucket size"),
	O("gateway-rate", OPT_DBL, gateway_rate, "20000", 0, 1e9, "readings/s per gateway (0 = unlimited)"),
	O("gateway-burst", OPT_DBL, gateway_burst, "40000", 1, 1e9, "per-gateway bucket size"),
	O("announce-rate", OPT_DBL, announce_rate, "100", 0, 1e9, "device announces/s per gateway, kept across reconnects (0 = unlimited)"),
	O("announce-burst", OPT_DBL, announce_burst, "10000", 1, 1e9, "per-gateway announce bucket size"),
	O("command-ack-rate", OPT_DBL, command_ack_rate, "50", 0, 1e9, "command_acks/s per gateway, kept across reconnects (0 = unlimited)"),
	O("command-ack-burst", OPT_DBL, command_ack_burst, "100", 1, 1e9, "per-gateway command_ack bucket size"),
	O("gateway-connect-rate", OPT_DBL, gateway_connect_rate, "1", 0, 1e9, "connections/s per gateway id; over it the hub closes with 4029 (0 = unlimited)"),
	O("gateway-connect-burst", OPT_DBL, gateway_connect_burst, "20", 1, 1e9, "per-gateway connect bucket size"),
	O("max-command-result-bytes", OPT_INT, max_command_result_bytes, "16384", 0, 1048576, "largest command_ack result (compact JSON); larger is a bad_message"),
	O("clock-skew-future-s", OPT_INT, clock_skew_future_s, "300", 0, 31536000, "how far ahead of the hub's clock a reading ts may be"),
	O("clock-skew-past-s", OPT_INT, clock_skew_past_s, "604800", 0, 315360000, "how old a reading ts may be"),
	O("device-stream-maxlen", OPT_LONG, device_stream_maxlen, "100000", 1, 1e12, "approximate entries kept per device stream (XADD MAXLEN ~)"),
	O("feed-stream-maxlen", OPT_LONG, feed_stream_maxlen, "1000000", 0, 1e12, "approximate frames kept in each feed shard stream (0 = no feed)"),
	O("feed-sink-max-lag", OPT_LONG, feed_sink_max_lag, "1000000", 0, 1e12, "frames a sink (a consumer group on the feed) may fall behind: the feed keeps them beyond feed-stream-maxlen; past it the hub alerts and trims anyway (0 = the feed ignores sinks)"),
	O("feed-shards", OPT_INT, feed_shards, "0", 0, 64, "ingest shards (feeds) the telemetry is spread over: 0 = 1 on one Redis, 16 on a Redis Cluster; the first hub on an empty Redis records it, later hubs use the recorded value"),
	O("seq-window", OPT_INT, seq_window, "96", 16, 1000000, "stored seqs remembered per gateway for idempotent resends (at least max-inflight-frames + 16)"),
	O("redis-timeout-ms", OPT_INT, redis_timeout_ms, "2000", 100, 600000, "no Redis reply for this long while commands are pending marks Redis down"),
	O("redis-backoff-max-ms", OPT_INT, redis_backoff_max_ms, "2000", 50, 600000, "longest wait between Redis reconnect attempts"),
	O("lease-ttl-ms", OPT_INT, lease_ttl_ms, "8000", 1000, 600000, "an instance whose lease in Redis was not renewed for this long is dead: another marks its devices offline"),
	O("lease-renew-ms", OPT_INT, lease_renew_ms, "2000", 100, 300000, "how often the hub renews its lease (and checks that Redis still holds its data); at most lease-ttl-ms / 2"),
	O("retry-after-ms", OPT_INT, retry_after_ms, "1000", 1, 600000, "retry_after_ms told to gateways while Redis is down"),
	O("redis-shed-ms", OPT_INT, redis_shed_ms, "5000", 0, 600000, "a telemetry frame that arrives while the hub's oldest command at Redis has waited this long is answered unavailable at once, not queued behind it (0 = never)"),
	O("rx-buffer-bytes", OPT_INT, rx_buffer_bytes, "512", 128, 65536, "lws receive buffer per connection (memory per connection; larger frames are reassembled)"),
	O("history-max-range-s", OPT_LONG, history_max_range_s, "2678400", 1, 315360000, "longest from..to span of one telemetry history request (422 beyond)"),
	O("ping-interval-s", OPT_INT, ping_interval_s, "30", 1, 3600, "WebSocket PING sent to a gateway this long after its last PONG"),
	O("ping-timeout-s", OPT_INT, ping_timeout_s, "75", 2, 7200, "a gateway that answered no PING for this long is disconnected"),
	O("stream-auth-timeout-ms", OPT_INT, stream_auth_timeout_ms, "5000", 100, 600000, "a dashboard without header auth must send its auth message within this time"),
	O("stream-max-subscriptions", OPT_INT, stream_max_subscriptions, "64", 1, 10000, "subscriptions per dashboard connection"),
	O("stream-max-filter-devices", OPT_INT, stream_max_filter_devices, "1000", 1, 100000, "device ids and prefixes in one subscription's filter (more: filter_too_large)"),
	O("stream-max-filter-labels", OPT_INT, stream_max_filter_labels, "16", 1, 64, "labels in one subscription's filter (more: filter_too_large)"),
	O("stream-max-filter-entries", OPT_INT, stream_max_filter_entries, "4096", 1, 10000000, "device ids, prefixes and labels in all the filters of one dashboard connection (more: filter_budget_exceeded)"),
	O("stream-queue-max", OPT_INT, stream_queue_max, "1024", 8, 10000000, "messages queued per dashboard connection before the oldest are dropped"),
	O("stream-queue-max-bytes", OPT_LONG, stream_queue_max_bytes, "1048576", 4096, 1e10, "bytes queued per dashboard connection before the oldest are dropped"),
	O("stream-slow-policy", OPT_STR, stream_slow_policy, "drop", 0, 0, "a dashboard whose queue overflows: drop (oldest, with gap) or close (4008)"),
	O("stream-replay-page", OPT_INT, stream_replay_page, "256", 1, 100000, "feed entries per XRANGE page of a since replay"),
	O("aggregate-grace-ms", OPT_INT, aggregate_grace_ms, "1000", 0, 600000, "how long after a window ends partial aggregates are awaited"),
	O("anomaly-flush-ms", OPT_INT, anomaly_flush_ms, "1000", 10, 600000, "how often changed anomaly models are written to Redis"),
	O("anomaly-state-ttl-s", OPT_INT, anomaly_state_ttl_s, "604800", 60, 315360000, "how long a device's anomaly models stay in Redis after their last write"),
	O("http-header-timeout-s", OPT_INT, http_header_timeout_s, "10", 1, 3600, "a connection must complete its request line and headers within this time"),
	O("http-body-timeout-s", OPT_INT, http_body_timeout_s, "10", 1, 3600, "a request body must arrive completely within this time of its headers"),
	O("http-keepalive-timeout-s", OPT_INT, http_keepalive_timeout_s, "5", 1, 3600, "an idle keep-alive HTTP connection is closed after this time"),
	O("audit-max-entries", OPT_LONG, audit_max_entries, "100000", 1000, 1e8, "operator actions kept in the audit log (oldest trimmed first)"),
	O("audit-retention-days", OPT_INT, audit_retention_days, "90", 1, 36500, "audit entries older than this are trimmed (checked every minute)"),
	O("provenance", OPT_INT, provenance, "0", 0, 1, "1: chain every stored reading to its device stream's previous one (SHA-256) and write signed checkpoints; 0: off, the default (its measured cost is above the 15 % target: docs/provenance.md)"),
	O("provenance-checkpoint-s", OPT_INT, provenance_checkpoint_s, "60", 1, 86400, "period of the signed checkpoints of the chain heads"),
	O("provenance-key", OPT_STR, provenance_key, NULL, 0, 0, "PEM Ed25519 private key that signs checkpoints (unset: data-dir/provenance-key.pem in embedded mode, made on first start; else a key for this run only)"),
	O("provenance-checkpoints-max", OPT_LONG, provenance_checkpoints_max, "10080", 10, 1e8, "approximate checkpoints kept (XADD MAXLEN ~)"),
	O("web-root", OPT_STR, web_root, NULL, 0, 0, "directory of the browser dashboard served at / (unset: not served)"),
	O("rollups", OPT_INT, rollups, "1", 0, 1, "1: every stored reading's numeric fields are rolled up into 1m/1h/1d buckets in Redis for GET /v1/aggregates; 0: off"),
	O("rollup-flush-ms", OPT_INT, rollup_flush_ms, "1000", 50, 60000, "how often the hub merges its rollup partials into the 1m buckets in Redis"),
	O("rollup-coarse-flush-ms", OPT_INT, rollup_coarse_flush_ms, "60000", 50, 600000, "how often the hub merges its rollup partials into the 1h and 1d buckets (they trail the 1m ones by up to this)"),
	O("rollup-retention-1m-s", OPT_LONG, rollup_retention_1m_s, "604800", 3600, 315360000, "how long a 1-minute rollup bucket is kept after it ends"),
	O("rollup-retention-1h-s", OPT_LONG, rollup_retention_1h_s, "7776000", 3600, 315360000, "how long a 1-hour rollup bucket is kept after it ends"),
	O("rollup-retention-1d-s", OPT_LONG, rollup_retention_1d_s, "63072000", 86400, 315360000, "how long a 1-day rollup bucket is kept after it ends"),
	O("aggregates-cache-ttl-ms", OPT_INT, aggregates_cache_ttl_ms, "5000", 0, 3600000, "identical GET /v1/aggregates queries within this time are answered from Redis (0: no cache and no single-flight)"),
	O("aggregates-lock-ms", OPT_INT, aggregates_lock_ms, "5000", 100, 600000, "single-flight: how long the instance computing a query holds its lock before others may compute it too"),
	O("aggregates-max-devices", OPT_INT, aggregates_max_devices, "1000", 1, 100000, "devices one GET /v1/aggregates query may select (422 beyond)"),
	O("api-tiers", OPT_STR, api_tiers, "free:10/1:604800,standard:100/1:7776000,internal:0/1:94867200", 0, 0, "usage tiers of API keys for GET /v1/aggregates: name:requests/window_s:max_range_s, comma-separated (requests 0: unlimited)"),
	O("api-default-tier", OPT_STR, api_default_tier, "standard", 0, 0, "the tier of an API key that names none (or names a tier api-tiers does not define)"),
};

#define NOPTS (sizeof(opts) / sizeof(opts[0]))

static void seterr(char *err, size_t errlen, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static void seterr(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

void hub_config_usage(FILE *out)
{
	fprintf(out,
		"usage: iot-hub [--config FILE] [--dev] [--KEY VALUE ...]\n"
		"       iot-hub --help | --version | --print-config\n\n"
		"--dev allows development settings that a production hub refuses\n"
		"(no jwt-key: an ephemeral JWT secret and a printed dev token).\n\n"
		"Every key below may be set in the config file (`key value`), as a flag\n"
		"(--key VALUE), or as the environment variable IOT_HUB_<KEY> (upper case,\n"
		"'-' as '_'); the environment overrides flags, flags override the file.\n\n");
	opts_usage(opts, NOPTS, out);
}

void hub_config_dump(const struct hub_config *cfg, FILE *out)
{
	opts_dump(opts, NOPTS, cfg, out);
}

/* What only the command line says: --config (read in the first pass),
 * --print-config and --dev; none is a key of the file or the environment. */
struct cli_only {
	int print;
	int dev;
};

static int ignore(void *obj, const struct opt *o, const char *val, char *err, size_t errlen)
{
	return 0;
}

static const struct opt cli_opts[] = {
	{ "config", OPT_STR, OPT_NO_FIELD, NULL, 0, 0, NULL, NULL, 0, ignore, NULL },
	{ "print-config", OPT_FLAG, offsetof(struct cli_only, print), NULL, 0, 0, NULL, NULL, 0,
	  NULL, NULL },
	{ "dev", OPT_FLAG, offsetof(struct cli_only, dev), NULL, 0, 0, NULL, NULL, 0, NULL, NULL },
};

#define NCLI (sizeof(cli_opts) / sizeof(cli_opts[0]))

/* Edit distance of a and b (both short: key names), for "did you mean". */
static size_t distance(const char *a, const char *b)
{
	size_t la = strlen(a), lb = strlen(b), row[160];

	if (lb + 1 > sizeof(row) / sizeof(row[0]))
		return (size_t)-1;
	for (size_t j = 0; j <= lb; j++)
		row[j] = j;
	for (size_t i = 1; i <= la; i++) {
		size_t diag = row[0];
		row[0] = i;
		for (size_t j = 1; j <= lb; j++) {
			size_t up = row[j], best = diag + (a[i - 1] != b[j - 1]);
			if (up + 1 < best)
				best = up + 1;
			if (row[j - 1] + 1 < best)
				best = row[j - 1] + 1;
			row[j] = best;
			diag = up;
		}
	}
	return row[lb];
}

size_t hub_config_env_unknown(char **env, void (*report)(const char *var, const char *closest,
							  void *arg), void *arg)
{
	static const char prefix[] = "IOT_HUB_";
	size_t found = 0;

	for (char **e = env; e && *e; e++) {
		char key[160];
		const char *name = *e + sizeof(prefix) - 1;
		size_t len = strcspn(*e, "=");

		if (strncmp(*e, prefix, sizeof(prefix) - 1) || len <= sizeof(prefix) - 1 ||
		    len - (sizeof(prefix) - 1) >= sizeof(key))
			continue;
		len -= sizeof(prefix) - 1;
		for (size_t i = 0; i < len; i++)
			key[i] = name[i] == '_' ? '-' : (char)tolower((unsigned char)name[i]);
		key[len] = '\0';
		if (!strcmp(key, "config"))
			continue;
		const char *best = NULL;
		size_t bestd = (size_t)-1;
		for (size_t i = 0; i < NOPTS; i++) {
			size_t d = distance(key, opts[i].name);
			if (d < bestd) {
				bestd = d;
				best = opts[i].name;
			}
		}
		if (bestd == 0)
			continue;
		char var[200], closest[200];
		size_t k = (size_t)snprintf(closest, sizeof(closest), "%s", prefix);
		for (const char *s = best; *s && k + 1 < sizeof(closest); s++)
			closest[k++] = *s == '-' ? '_' : (char)toupper((unsigned char)*s);
		closest[k] = '\0';
		snprintf(var, sizeof(var), "%.*s", (int)(len + sizeof(prefix) - 1), *e);
		report(var, closest, arg);
		found++;
	}
	return found;
}

int hub_config_load(struct hub_config *cfg, int argc, char **argv,
		    char *err, size_t errlen)
{
	const char *file = getenv("IOT_HUB_CONFIG");

	memset(cfg, 0, sizeof(*cfg));
	if (opts_defaults(opts, NOPTS, cfg, err, errlen))
		return -1;

	/* First pass: --help, --version, --config. */
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
			hub_config_usage(stdout);
			return 1;
		}
		if (!strcmp(argv[i], "--version")) {
			printf("iot-hub %s\n", HUB_VERSION);
			return 1;
		}
		if (!strcmp(argv[i], "--config") && i + 1 < argc && !getenv("IOT_HUB_CONFIG"))
			file = argv[i + 1];
		else if (!strncmp(argv[i], "--config=", 9) && !getenv("IOT_HUB_CONFIG"))
			file = argv[i] + 9;
	}
	if (file) {
		cfg->config_file = hub_xstrdup(file);
		if (opts_load_file(opts, NOPTS, cfg, file, err, errlen))
			return -1;
	}

	struct cli_only cli = { 0 };
	const struct opts_tab tabs[] = { { opts, NOPTS, cfg }, { cli_opts, NCLI, &cli } };
	const struct opts_cli c = { tabs, 2, NULL, NULL, "command line" };
	int i = 1;
	if (opts_argv(&c, argc, argv, &i, err, errlen) ||
	    opts_env(opts, NOPTS, cfg, "IOT_HUB_", err, errlen))
		return -1;
	cfg->dev = cli.dev != 0;

	if (hub_config_validate(cfg, err, errlen))
		return -1;
	if (cli.print) {
		hub_config_dump(cfg, stdout);
		return 1;
	}
	return 0;
}

static int parse_hostport(const char *s, char *host, size_t hostlen, int *port)
{
	const char *colon;
	size_t hl;

	if (*s == '[') {
		const char *rb = strchr(s, ']');
		if (!rb || rb[1] != ':')
			return -1;
		hl = (size_t)(rb - s - 1);
		s++;
		colon = rb + 1;
	} else {
		colon = strrchr(s, ':');
		if (!colon)
			return -1;
		hl = (size_t)(colon - s);
	}
	if (!hl || hl >= hostlen)
		return -1;
	memcpy(host, s, hl);
	host[hl] = '\0';
	char *end;
	long p = strtol(colon + 1, &end, 10);
	if (end == colon + 1 || *end || p < 0 || p > 65535)
		return -1;
	*port = (int)p;
	return 0;
}

/* A host of a redis URL: an IP address, [IPv6], or a DNS name. Names are
 * only checked for their characters here; the Redis bus resolves them. */
static bool redis_host_ok(const char *h, bool bracketed)
{
	unsigned char a6[16];

	if (bracketed)
		return inet_pton(AF_INET6, h, a6) == 1;
	for (const char *p = h; *p; p++)
		if (!isalnum((unsigned char)*p) && *p != '.' && *p != '-' && *p != '_')
			return false;
	return true;
}

/* One URL of the redis key, [redis://][[USER]:PW@]HOST:PORT[/DB], n bytes
 * of it: fills seed, *db (0 when absent) and *pw (NULL when absent; a
 * pointer into u, *pwlen bytes). */
static int parse_redis_url(const char *u, size_t n, struct hub_redis_seed *seed, int *db,
			   const char **pw, size_t *pwlen)
{
	const char *end = u + n, *at, *slash;
	char hp[HUB_REDIS_HOST_MAX + 16];

	if (n >= 8 && !strncmp(u, "redis://", 8))
		u += 8;
	*pw = NULL;
	*pwlen = 0;
	at = NULL;
	for (const char *q = u; q < end; q++)
		if (*q == '@')
			at = q;
	if (at) {
		const char *colon = memchr(u, ':', (size_t)(at - u));
		*pw = colon ? colon + 1 : u;
		*pwlen = (size_t)(at - *pw);
		u = at + 1;
	}
	slash = memchr(u, '/', (size_t)(end - u));
	if (!slash)
		slash = end;
	if ((size_t)(slash - u) >= sizeof(hp))
		return -1;
	memcpy(hp, u, (size_t)(slash - u));
	hp[slash - u] = '\0';
	if (parse_hostport(hp, seed->host, sizeof(seed->host), &seed->port) || !seed->port ||
	    !redis_host_ok(seed->host, hp[0] == '['))
		return -1;
	*db = 0;
	if (slash < end) {
		char num[16], *e;
		long v;

		if ((size_t)(end - slash - 1) >= sizeof(num))
			return -2;
		memcpy(num, slash + 1, (size_t)(end - slash - 1));
		num[end - slash - 1] = '\0';
		v = strtol(num, &e, 10);
		if (e == num || *e || v < 0 || v > 1000)
			return -2;
		*db = (int)v;
	}
	return 0;
}

/* The redis key: one URL, or seed URLs separated by commas (Redis Cluster:
 * database 0 only, which the bus checks again once it knows the server is
 * a cluster). */
static int parse_redis(struct hub_config *cfg, char *err, size_t errlen)
{
	const char *p = cfg->redis;

	for (;;) {
		size_t n = strcspn(p, ",");
		struct hub_redis_seed *seed = &cfg->redis_seeds[cfg->redis_nseeds];
		const char *pw;
		size_t pwlen;
		int db, rc;

		if (cfg->redis_nseeds == HUB_REDIS_SEEDS_MAX) {
			seterr(err, errlen, "redis: at most %d seed URLs", HUB_REDIS_SEEDS_MAX);
			return -1;
		}
		while (n && isspace((unsigned char)*p)) {
			p++;
			n--;
		}
		while (n && isspace((unsigned char)p[n - 1]))
			n--;
		rc = parse_redis_url(p, n, seed, &db, &pw, &pwlen);
		if (rc) {
			seterr(err, errlen, rc == -2 ? "redis: bad database number in \"%.*s\"" :
			       "redis: expected redis://HOST:PORT[/DB] (or several, comma-separated) "
			       "or embedded, got \"%.*s\"", (int)n, p);
			return -1;
		}
		if (pw && cfg->redis_password && (strlen(cfg->redis_password) != pwlen ||
						  memcmp(cfg->redis_password, pw, pwlen))) {
			seterr(err, errlen, "redis: the seed URLs name different passwords");
			return -1;
		}
		if (pw && !cfg->redis_password) {
			cfg->redis_password = hub_xmalloc(pwlen + 1);
			memcpy(cfg->redis_password, pw, pwlen);
			cfg->redis_password[pwlen] = '\0';
		}
		if (db)
			cfg->redis_db = db;
		cfg->redis_nseeds++;
		p += strcspn(p, ",");
		if (!*p)
			break;
		p++;
	}
	if (cfg->redis_nseeds > 1 && cfg->redis_db) {
		seterr(err, errlen, "redis: a database number (/%d) is refused with several seed "
		       "URLs: a Redis Cluster has database 0 only", cfg->redis_db);
		return -1;
	}
	snprintf(cfg->redis_host, sizeof(cfg->redis_host), "%s", cfg->redis_seeds[0].host);
	cfg->redis_port = cfg->redis_seeds[0].port;
	return 0;
}

/* api-tiers parses and names api-default-tier (docs/analytics.md). */
static int validate_tiers(const struct hub_config *cfg, char *err, size_t errlen)
{
	struct ru_tiers t;
	char why[160];

	if (!cfg->api_tiers || ru_tiers_parse(cfg->api_tiers, &t, why, sizeof(why))) {
		seterr(err, errlen, "api-tiers: %s", cfg->api_tiers ? why : "required");
		return -1;
	}
	if (!cfg->api_default_tier || !ru_tiers_find(&t, cfg->api_default_tier)) {
		seterr(err, errlen, "api-default-tier: \"%s\" is not a tier of api-tiers",
		       cfg->api_default_tier ? cfg->api_default_tier : "");
		return -1;
	}
	return 0;
}

int hub_config_validate(struct hub_config *cfg, char *err, size_t errlen)
{
	if (!cfg->listen || parse_hostport(cfg->listen, cfg->listen_host,
					   sizeof(cfg->listen_host), &cfg->listen_port)) {
		seterr(err, errlen, "listen: expected HOST:PORT, got \"%s\"",
		       cfg->listen ? cfg->listen : "");
		return -1;
	}
	cfg->redis_embedded = !cfg->redis || !strcmp(cfg->redis, "embedded");
	free(cfg->redis_password);
	cfg->redis_password = NULL;
	cfg->redis_nseeds = 0;
	cfg->redis_db = 0;
	if (!cfg->redis_embedded && parse_redis(cfg, err, errlen))
		return -1;
	if (cfg->redis_embedded && (!cfg->data_dir || !*cfg->data_dir)) {
		seterr(err, errlen, "data-dir: a directory is required with redis embedded");
		return -1;
	}
	if (validate_tiers(cfg, err, errlen))
		return -1;
	if (cfg->ack_durability && !strcmp(cfg->ack_durability, "accepted")) {
		cfg->ack_mode = HUB_ACK_ACCEPTED;
	} else if (cfg->ack_durability && !strcmp(cfg->ack_durability, "fsync")) {
		cfg->ack_mode = HUB_ACK_FSYNC;
	} else if (cfg->ack_durability && !strcmp(cfg->ack_durability, "replicated")) {
		cfg->ack_mode = HUB_ACK_REPLICATED;
	} else {
		seterr(err, errlen, "ack-durability: expected accepted, fsync or replicated, got \"%s\"",
		       cfg->ack_durability ? cfg->ack_durability : "");
		return -1;
	}
	if (cfg->ack_mode == HUB_ACK_REPLICATED && cfg->redis_embedded) {
		seterr(err, errlen, "ack-durability replicated needs a Redis with replicas "
		       "(redis redis://...); the embedded Redis has none");
		return -1;
	}
	/* A WAIT holds the command connection; the watchdog must not take a
	 * full wait (and the commands queued behind it) for a stalled Redis. */
	if (cfg->ack_mode == HUB_ACK_REPLICATED && cfg->ack_wait_ms * 2 > cfg->redis_timeout_ms) {
		seterr(err, errlen, "ack-wait-ms %d must be at most half of redis-timeout-ms %d",
		       cfg->ack_wait_ms, cfg->redis_timeout_ms);
		return -1;
	}
	if (!cfg->jwt_alg || (strcmp(cfg->jwt_alg, "HS256") && strcmp(cfg->jwt_alg, "RS256") &&
			      strcmp(cfg->jwt_alg, "ES256"))) {
		seterr(err, errlen, "jwt-alg: expected HS256, RS256 or ES256, got \"%s\"",
		       cfg->jwt_alg ? cfg->jwt_alg : "");
		return -1;
	}
	if (strcmp(cfg->jwt_alg, "HS256") && !cfg->jwt_key) {
		seterr(err, errlen, "jwt-alg %s needs jwt-key (the PEM public key)", cfg->jwt_alg);
		return -1;
	}
	if (hub_log_parse_level(cfg->log_level) < 0) {
		seterr(err, errlen, "log-level: expected error, warn, info or debug, got \"%s\"",
		       cfg->log_level ? cfg->log_level : "");
		return -1;
	}
	if (!cfg->tls_cert != !cfg->tls_key) {
		seterr(err, errlen, "tls-cert and tls-key must be given together");
		return -1;
	}
	if (cfg->tls_client_ca && !cfg->tls_cert) {
		seterr(err, errlen, "tls-client-ca needs tls-cert and tls-key");
		return -1;
	}
	if (cfg->instance_id && !hub_id_valid(cfg->instance_id, strlen(cfg->instance_id))) {
		seterr(err, errlen, "instance-id: must match [A-Za-z0-9._:-]{1,128}");
		return -1;
	}
	if (cfg->device_burst < 1 || cfg->gateway_burst < 1) {
		seterr(err, errlen, "device-burst and gateway-burst must be >= 1");
		return -1;
	}
	if (cfg->lease_renew_ms * 2 > cfg->lease_ttl_ms) {
		seterr(err, errlen, "lease-renew-ms must be at most half of lease-ttl-ms");
		return -1;
	}
	if (cfg->ping_timeout_s <= cfg->ping_interval_s) {
		seterr(err, errlen, "ping-timeout-s must be greater than ping-interval-s");
		return -1;
	}
	if (!cfg->stream_slow_policy ||
	    (strcmp(cfg->stream_slow_policy, "drop") && strcmp(cfg->stream_slow_policy, "close"))) {
		seterr(err, errlen, "stream-slow-policy: expected drop or close, got \"%s\"",
		       cfg->stream_slow_policy ? cfg->stream_slow_policy : "");
		return -1;
	}
	if (!cfg->schemas || !*cfg->schemas) {
		seterr(err, errlen, "schemas: a directory is required");
		return -1;
	}
	return 0;
}

void hub_config_free(struct hub_config *cfg)
{
	opts_free(opts, NOPTS, cfg);
	free(cfg->config_file);
	free(cfg->redis_password);
	cfg->config_file = cfg->redis_password = NULL;
}
