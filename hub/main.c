/*
 * iot-hub: a WebSocket gateway hub. See README.md and docs/.
 */
#include <errno.h>
#include <jwt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <openssl/err.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>

#include "commands/cmd_api.h"
#include "commands/commands.h"
#include "hub/analytics.h"
#include "hub/api.h"
#include "hub/audit.h"
#include "hub/revoke.h"
#include "hub/rollup.h"
#include "hub/durability.h"
#include "hub/embedded_redis.h"
#include "hub/http.h"
#include "hub/events.h"
#include "hub/hub.h"
#include "hub/jarena.h"
#include "hub/keys.h"
#include "hub/lease.h"
#include "hub/lifecycle.h"
#include "hub/listener.h"
#include "hub/log.h"
#include "hub/loop.h"
#include "hub/migrate.h"
#include "hub/module.h"
#include "hub/ops.h"
#include "hub/redis.h"
#include "hub/ingest.h"
#include "hub/provenance.h"
#include "hub/feedtrim.h"
#include "protocols/anomaly.h"
#include "hub/registry.h"
#include "protocols/gateway.h"
#include "protocols/agg.h"
#include "protocols/stream.h"
#include "hub_lua.h"

#define STARTUP_TICK_US (10 * 1000)

static lws_sorted_usec_list_t sul_startup;
static int64_t startup_deadline_us;
static struct hub *the_hub;

/* Tests only, undocumented on purpose: with IOT_HUB_TEST_STALL_MS=N in the
 * environment each SIGHUP also holds the event loop for N ms, as a hub
 * swamped with work would (tests/integration/test_lease.py: a busy loop
 * keeps its lease, a stuck one loses it). */
static void test_stall(void)
{
	const char *v = getenv("IOT_HUB_TEST_STALL_MS");
	long ms = v ? strtol(v, NULL, 10) : 0;
	struct timespec ts;

	if (ms <= 0 || ms > 600000)
		return;
	hub_warn("IOT_HUB_TEST_STALL_MS: holding the event loop for %ld ms (tests only)", ms);
	ts.tv_sec = ms / 1000;
	ts.tv_nsec = (ms % 1000) * 1000000;
	while (nanosleep(&ts, &ts) && errno == EINTR)
		;
}

static void on_signal_timer(lws_sorted_usec_list_t *sul)
{
	struct hub *hub = lws_container_of(sul, struct hub, sul_signal);

	if (hub->sig_hup) {
		hub->sig_hup = 0;
		hub_info("SIGHUP: reloading device types and keys");
		hub_audit(hub, NULL, "reload", "",
			  hub_reload(hub, false) ? "{\"ok\":false}" : "{\"ok\":true}");
		test_stall();
	}
	if (hub->sig_term) {
		hub->sig_term = 0;
		hub_begin_shutdown(hub);
	}
}

static void print_dev_token(struct hub *hub)
{
	jwt_t *jwt = NULL;
	char *tok = NULL;
	int64_t exp = hub_now_ms() / 1000 + 86400;

	if (jwt_new(&jwt) || jwt_add_grant(jwt, "sub", "dev-gw") ||
	    jwt_add_grant_int(jwt, "exp", (long)exp) ||
	    jwt_add_grants_json(jwt, "{\"devices\":[\"*\"]}") ||
	    jwt_set_alg(jwt, JWT_ALG_HS256, (const unsigned char *)hub->jwt_key,
			(int)hub->jwt_key_len) ||
	    !(tok = jwt_encode_str(jwt))) {
		hub_warn("could not mint the dev token");
	} else {
		printf("\nNo jwt-key configured: using an ephemeral HS256 secret for this run.\n"
		       "Dev gateway token (sub dev-gw, all devices, valid 24 h):\n\n  %s\n\n"
		       "Connect a gateway:  ws%s://%s:%d/v1/gateway  subprotocol iot-gateway.v1\n"
		       "                    header  Authorization: Bearer <token>\n"
		       "Simulate gateways:  build/tools/gw-sim --url ws://%s:%d/v1/gateway --token <token>\n\n",
		       tok, hub->cfg.tls_cert ? "s" : "", hub->cfg.listen_host,
		       hub_listener_port(hub->listener), hub->cfg.listen_host,
		       hub_listener_port(hub->listener));
		fflush(stdout);
	}
	free(tok);
	jwt_free(jwt);
}

/* The key layout (hub/keys.h) is checked on every (re)connect, before any
 * other command (a gate of the Redis bus), by hub/lua/layout.lua. */
static bool layout_refused;

static void refuse_tick(lws_sorted_usec_list_t *sul)
{
	(void)sul;
	the_hub->exit_code = 1;
	hub_begin_shutdown(the_hub);
}

/* The Redis bus found a Redis this configuration cannot use (it logged why). */
static void redis_fatal(void *arg)
{
	struct hub *hub = arg;

	lws_sul_cancel(&sul_startup);
	lws_sul_schedule(hub->ctx, 0, &sul_startup, refuse_tick, 1);
}

static bool layout_gate(redisReply *r, void *arg)
{
	struct hub *hub = arg;
	const redisReply *ok, *v;

	if (r->type == REDIS_REPLY_ERROR && !strncmp(r->str, "CROSSSLOT", 9)) {
		/* A Redis Cluster: the check reads the layout-1/2 keys beside
		 * iot:{hub}:layout, which a cluster never held (those layouts
		 * did not run on one); lease_renew checks the version there
		 * (docs/streams.md "Redis Cluster"). */
		hub_emit(hub, HUB_EV_REDIS_READY, NULL);
		return true;
	}
	if (r->type != REDIS_REPLY_ARRAY || r->elements != 2 ||
	    (ok = r->element[0])->type != REDIS_REPLY_INTEGER ||
	    (v = r->element[1])->type != REDIS_REPLY_STRING) {
		hub_err("redis: the key layout check failed: %s",
			r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
		return false; /* retried on the next connection */
	}
	if (ok->integer == 1) {
		hub_emit(hub, HUB_EV_REDIS_READY, NULL);
		return true;
	}
	if (!layout_refused) {
		layout_refused = true;
		if (!strcmp(v->str, "2"))
			hub_err("Redis %s:%d db %d holds key layout 2 (iot:layout): this hub writes "
				"layout " HUB_LAYOUT_VERSION " and migrates layout 2 only at start: "
				"restart it (docs/streams.md)", hub->cfg.redis_host,
				hub->cfg.redis_port, hub->cfg.redis_db);
		else if (*v->str)
			hub_err("Redis %s:%d db %d holds key layout %.32s (" HUB_LAYOUT_KEY "), this "
				"hub writes layout " HUB_LAYOUT_VERSION ": not running beside it "
				"(tools/migrate-layout converts layout 1 only)", hub->cfg.redis_host,
				hub->cfg.redis_port, hub->cfg.redis_db, v->str);
		else
			hub_err("Redis %s:%d db %d holds iot-hub data in the old key layout (no "
				HUB_LAYOUT_KEY "): stop every hub, run tools/migrate-layout --redis "
				"redis://%s:%d/%d, then start again (docs/streams.md)",
				hub->cfg.redis_host, hub->cfg.redis_port, hub->cfg.redis_db,
				hub->cfg.redis_host, hub->cfg.redis_port, hub->cfg.redis_db);
		lws_sul_cancel(&sul_startup);
		lws_sul_schedule(hub->ctx, 0, &sul_startup, refuse_tick, 1);
	}
	return false;
}

/* Starts accepting once Redis answered (or redis-timeout-ms passed), so the
 * first frames after `listening on` are not refused as unavailable. */
static void startup_tick(lws_sorted_usec_list_t *sul)
{
	struct hub *hub = the_hub;

	if (hub->draining)
		return; /* refused (key layout, durability) before it listened */
	/* Up, told the ingest shard count (after the layout-2 migration), the
	 * revocation list read, and (a cluster) the sharded channel that
	 * commands are routed to this instance on subscribed: gateways are
	 * accepted from the first connection on. */
	if ((!hub_redis_up(hub->redis) || !hub_ingest_shards(hub) ||
	     !hub_revocations_loaded(hub) || !cmd_routable(hub)) &&
	    hub_mono_us() < startup_deadline_us) {
		lws_sul_schedule(hub->ctx, 0, sul, startup_tick, STARTUP_TICK_US);
		return;
	}
	if (!hub_redis_up(hub->redis))
		hub_warn("Redis is not reachable yet: serving, telemetry answers unavailable");
	if (hub_listener_start(hub->listener)) {
		hub_err("cannot adopt the listening socket");
		hub->exit_code = 1;
		hub_begin_shutdown(hub);
		return;
	}
	hub_info("%zu device types from %s; instance %s; redis %s:%d%s%s%s; ack-durability %s",
		 schema_set_count(hub->schemas), hub->cfg.schemas, hub->instance_id,
		 hub->cfg.redis_host, hub->cfg.redis_port,
		 hub->embedded ? " (embedded, data dir " : "",
		 hub->embedded ? hub_embedded_redis_dir(hub->embedded) : "",
		 hub->embedded ? ")" : "", hub->cfg.ack_durability);
	if (hub->jwt_ephemeral)
		hub_warn("no jwt-key configured: using an ephemeral dev secret (dev only)");
	if (hub->cfg.seq_window < hub->cfg.max_inflight_frames + 16)
		hub_warn("seq-window %d is under max-inflight-frames + 16 (%d): a frame stored but "
			 "not acked when its connection dropped can be stored twice when resent",
			 hub->cfg.seq_window, hub->cfg.max_inflight_frames + 16);
	fprintf(stderr, "listening on %s:%d\n", hub->cfg.listen_host,
		hub_listener_port(hub->listener));
	fflush(stderr);
	if (hub->jwt_ephemeral)
		print_dev_token(hub);
}

/* Checks the TLS files up front so a bad one fails start-up with one line
 * (lws would log several). */
static int check_tls_files(const struct hub_config *cfg, char *err, size_t errlen)
{
	SSL_CTX *ctx;
	int rc = -1;

	if (!cfg->tls_cert)
		return 0;
	ctx = SSL_CTX_new(TLS_server_method());
	if (!ctx) {
		snprintf(err, errlen, "TLS: cannot create a context");
		return -1;
	}
	if (SSL_CTX_use_certificate_chain_file(ctx, cfg->tls_cert) != 1)
		snprintf(err, errlen, "tls-cert %s: not a readable PEM certificate", cfg->tls_cert);
	else if (SSL_CTX_use_PrivateKey_file(ctx, cfg->tls_key, SSL_FILETYPE_PEM) != 1)
		snprintf(err, errlen, "tls-key %s: not a readable PEM private key", cfg->tls_key);
	else if (SSL_CTX_check_private_key(ctx) != 1)
		snprintf(err, errlen, "tls-key %s does not match tls-cert %s", cfg->tls_key,
			 cfg->tls_cert);
	else if (cfg->tls_client_ca &&
		 SSL_CTX_load_verify_locations(ctx, cfg->tls_client_ca, NULL) != 1)
		snprintf(err, errlen, "tls-client-ca %s: not a readable PEM CA certificate",
			 cfg->tls_client_ca);
	else
		rc = 0;
	ERR_clear_error();
	SSL_CTX_free(ctx);
	return rc;
}

/* The hub, in start order (stopped in reverse): see hub/module.h. */
static const struct hub_module *const modules[] = {
	&hub_http_module,      /* HTTP on the port; routes and upgrades register here */
	&hub_registry_module,  /* the device registry */
	&hub_ingest_module,    /* the reading store, in ingest shards */
	&hub_prov_module,      /* chained readings, checkpoints, device signatures */
	&hub_feedtrim_module,  /* the feed follows its slowest sink */
	&hub_lease_module,     /* this run's lease; dead runs' devices go offline */
	&agg_module,           /* 1 s partials out, merged windows in */
	&hub_rollup_module,    /* 1m/1h/1d rollups of stored readings */
	&anom_module,          /* anomaly models (before gw: stopped after it) */
	&gw_module,            /* gateways: /v1/gateway */
	&stream_module,        /* dashboards: /v1/stream (aggregates from agg) */
	&cmd_module,           /* the command lifecycle */
	&cmd_api_module,       /* its routes */
	&hub_api_module,       /* device and telemetry routes */
	&hub_analytics_module, /* GET /v1/aggregates: rollups, cache, tiers */
	&hub_audit_module,     /* the audit log of operator actions */
	&hub_revoke_module,    /* revoked gateway credentials */
	&hub_ops_module,       /* health, readiness, metrics, API document, web-root */
};

/* ---- production guards (docs/configuration.md "Production and --dev") ---- */

extern char **environ;

static void report_env(const char *var, const char *closest, void *arg)
{
	(void)arg;
	hub_warn("environment variable %s is not a configuration key and is ignored "
		 "(closest key: %s)", var, closest);
}

/* Exit status 2 when the configuration is a development one without --dev. */
static int production_guards(const struct hub_config *cfg)
{
	hub_config_env_unknown(environ, report_env, NULL);
	if (!cfg->jwt_key && !cfg->dev) {
		fprintf(stderr, "iot-hub: no jwt-key: refusing to start with an ephemeral JWT "
			"secret (tokens would die with the process). Set jwt-key to a file holding "
			"the HS256 secret (e.g. `openssl rand -hex 32 > /etc/iot-hub/jwt.secret`) "
			"or the RS256/ES256 PEM public key, or pass --dev for a development run\n");
		return 2;
	}
	return 0;
}

static void hub_cleanup(struct hub *hub)
{
	hub_modules_free(hub);
	hub_events_free(hub);
	hub_redis_free(hub->redis);
	hub_durability_free(hub);
	hub_listener_free(hub->listener);
	hub_embedded_redis_stop(hub->embedded);
	schema_set_free(hub->schemas);
	auth_free(hub->auth);
	free(hub->jwt_key);
	hub_config_free(&hub->cfg);
}

int main(int argc, char **argv)
{
	static struct hub hub;
	char err[512] = "";
	int rc;

	the_hub = &hub;
	hub.modules = modules;
	hub.nmodules = sizeof(modules) / sizeof(modules[0]);
	hub_jarena_install();
	rc = hub_config_load(&hub.cfg, argc, argv, err, sizeof(err));
	if (rc) {
		if (rc < 0)
			fprintf(stderr, "iot-hub: %s\n", err);
		hub_config_free(&hub.cfg);
		return rc < 0 ? 2 : 0;
	}
	hub_log_threshold = hub_log_parse_level(hub.cfg.log_level);
	if (hub.cfg.instance_id) {
		snprintf(hub.instance_id, sizeof(hub.instance_id), "%s", hub.cfg.instance_id);
	} else {
		char host[64] = "hub";
		gethostname(host, sizeof(host) - 1);
		for (char *p = host; *p; p++)
			if (!hub_id_valid(p, 1))
				*p = '-';
		snprintf(hub.instance_id, sizeof(hub.instance_id), "%.64s-%d", host, (int)getpid());
	}
	hub_log_set_tag(hub.instance_id);
	rc = production_guards(&hub.cfg);
	if (rc) {
		hub_config_free(&hub.cfg);
		return rc;
	}
	srand((unsigned)(hub_mono_us() ^ getpid()));
	{
		unsigned char raw[HUB_RUN_TOKEN_LEN / 2];
		if (RAND_bytes(raw, sizeof(raw)) != 1) {
			fprintf(stderr, "iot-hub: no randomness for the run token\n");
			hub_config_free(&hub.cfg);
			return 1;
		}
		for (size_t i = 0; i < sizeof(raw); i++)
			snprintf(hub.run_token + 2 * i, 3, "%02x", raw[i]);
	}

	if (check_tls_files(&hub.cfg, err, sizeof(err))) {
		fprintf(stderr, "iot-hub: %s\n", err);
		hub_config_free(&hub.cfg);
		return 1;
	}
	if (!hub.cfg.jwt_key) {
		unsigned char raw[32];
		if (RAND_bytes(raw, sizeof(raw)) != 1) {
			fprintf(stderr, "iot-hub: no randomness for the ephemeral JWT secret\n");
			return 1;
		}
		hub.jwt_key = hub_xmalloc(65);
		for (int i = 0; i < 32; i++)
			snprintf(hub.jwt_key + i * 2, 3, "%02x", raw[i]);
		hub.jwt_key_len = 64;
		hub.jwt_ephemeral = true;
	}
	if (hub_reload(&hub, true)) {
		hub_cleanup(&hub);
		return 1;
	}
	hub.listener = hub_listener_open(&hub, err, sizeof(err));
	if (!hub.listener) {
		fprintf(stderr, "iot-hub: %s\n", err);
		hub_cleanup(&hub);
		return 1;
	}
	if (hub.cfg.redis_embedded) {
		hub.embedded = hub_embedded_redis_start(hub.cfg.redis_server, hub.cfg.data_dir,
							hub.cfg.ack_mode == HUB_ACK_FSYNC,
							&hub.cfg.redis_port, err, sizeof(err));
		if (!hub.embedded) {
			fprintf(stderr, "iot-hub: %s\n", err);
			hub_cleanup(&hub);
			return 1;
		}
		snprintf(hub.cfg.redis_host, sizeof(hub.cfg.redis_host), "127.0.0.1");
		hub.cfg.redis_seeds[0] = (struct hub_redis_seed){ "127.0.0.1", hub.cfg.redis_port };
		hub.cfg.redis_nseeds = 1;
	}
	/* Layout 2 on one Redis: migrated here, before anything else writes. */
	if (hub_migrate_start(&hub)) {
		hub_cleanup(&hub);
		return 1;
	}
	if (hub_loop_create(&hub, err, sizeof(err))) {
		fprintf(stderr, "iot-hub: %s\n", err);
		hub_loop_destroy(&hub);
		hub_cleanup(&hub);
		return 1;
	}
	hub.sul_signal.cb = on_signal_timer;
	hub.redis = hub_redis_new(&hub);
	hub_durability_init(&hub); /* its check runs before the layout script writes */
	const char *gate[] = { "EVAL", hub_lua_layout, "4", HUB_LAYOUT_KEY, "iot:layout",
			       "iot:devices", "iot:cmd:seq", HUB_LAYOUT_VERSION };
	hub_redis_set_gate(hub.redis, 8, gate, layout_gate, &hub);
	hub_redis_set_fatal(hub.redis, redis_fatal, &hub);
	if (hub_modules_start(&hub, err, sizeof(err))) {
		fprintf(stderr, "iot-hub: %s\n", err);
		hub_loop_destroy(&hub);
		hub.nmodules = 0; /* freed */
		hub_cleanup(&hub);
		return 1;
	}
	hub_redis_start(hub.redis);
	startup_deadline_us = hub_mono_us() + (int64_t)hub.cfg.redis_timeout_ms * 1000;
	lws_sul_schedule(hub.ctx, 0, &sul_startup, startup_tick, 1);

	hub_loop_run(&hub);

	hub_loop_destroy(&hub);
	rc = hub.exit_code;
	hub_info("exiting with status %d", rc);
	hub_cleanup(&hub);
	return rc;
}
