/*
 * hub.h - the one struct that owns the process's state, shared by the modules
 * of hub/ and protocols/. Single-threaded: everything runs on the lws loop.
 */
#ifndef HUB_HUB_H
#define HUB_HUB_H

#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <libwebsockets.h>

#include "hub/auth.h"
#include "hub/config.h"
#include "hub/keepalive.h"
#include "hub/metrics.h"
#include "hub/strmap.h"
#include "protocols/schema.h"

struct hub_redis;
struct hub_listener;
struct hub_embedded_redis;
struct hub_module;
struct hub_observers;
struct hub_http;
struct hub_lease;
struct hub_durability;
struct cmd_engine;
struct cmd_api;
struct hub_audit;
struct hub_revocations;
struct hub_registry;
struct hub_ingest;
struct hub_prov;
struct hub_feedtrim;
struct agg;
struct stream;
struct gateways;
struct hub_rollup;
struct analytics;

struct hub {
	struct hub_config cfg;
	char instance_id[HUB_ID_MAX + 1];
	char run_token[16];        /* HUB_RUN_TOKEN_LEN random hex digits (hub/keys.h):
				    * tells this process from earlier runs of the
				    * same instance id */

	struct lws_context *ctx;
	struct lws_vhost *vh;
	struct hub_listener *listener;
	struct hub_redis *redis;
	struct hub_embedded_redis *embedded;

	schema_set *schemas;       /* current set; swapped whole on reload */
	uint32_t schemas_gen;      /* bumped on every successful reload */
	hub_auth *auth;            /* swapped whole on reload */
	char *jwt_key;             /* bytes of jwt-key (or the ephemeral secret) */
	size_t jwt_key_len;
	bool jwt_ephemeral;


	/* The modules (hub/module.h), in start order, and their objects. */
	const struct hub_module *const *modules;
	size_t nmodules;
	struct hub_observers *observers;   /* hub/events.h */
	struct hub_link *(*link_lookup)(void *ctx, const char *device); /* hub/link.h */
	void *link_lookup_ctx;
	struct hub_http *http;
	struct hub_registry *registry;
	struct hub_ingest *ingest;
	struct hub_prov *prov;     /* hub/provenance.c */
	struct hub_feedtrim *feedtrim;   /* hub/feedtrim.c */
	struct hub_lease *lease;
	struct hub_durability *durability; /* hub/durability.c */
	struct cmd_engine *cmd;            /* commands/commands.c */
	struct cmd_api *cmd_api;           /* commands/cmd_api.c */
	struct hub_audit *audit;           /* hub/audit.c */
	struct hub_revocations *revoked;   /* hub/revoke.c */
	struct agg *agg;
	struct gateways *gw;
	struct stream *stream;
	struct hub_rollup *rollup;         /* hub/rollup.c (NULL with rollups 0) */
	struct analytics *analytics;       /* hub/analytics.c */
	struct anom *anom;                 /* protocols/anomaly.c */

	struct hub_metrics metrics;

	volatile sig_atomic_t sig_term, sig_hup;
	lws_sorted_usec_list_t sul_signal;
	lws_sorted_usec_list_t sul_drain;
	/* WebSocket liveness of every gateway and dashboard (hub/loop.c) */
	struct hub_ka ka;
	lws_sorted_usec_list_t sul_keepalive;
	int64_t ka_armed_us;       /* deadline the keepalive timer is set for, 0 none */
	bool draining;
	bool modules_stopped;
	int64_t drain_deadline_us;
	bool exiting;
	int exit_code;
};

/* Loads (or reloads) schemas and API keys. On a reload failure keeps the old
 * sets and returns -1 after logging why. Start-up and SIGHUP only. */
int hub_reload(struct hub *hub, bool initial);

#endif
