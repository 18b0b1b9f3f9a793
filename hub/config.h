/*
 * config.h - the hub's configuration: one table of options with type, default,
 * bounds and help (docs/configuration.md). Sources apply in this order:
 * defaults, then the config file, then command-line flags, then IOT_HUB_<KEY>
 * environment variables. Every key is accepted in all three forms
 * (`key value` in the file, `--key value` or `--key=value`, IOT_HUB_KEY).
 */
#ifndef HUB_CONFIG_H
#define HUB_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

/* ack-durability: what an ack to a gateway promises (docs/streams.md). */
enum hub_ack_durability {
	HUB_ACK_ACCEPTED,      /* Redis took the write */
	HUB_ACK_FSYNC,         /* ... and Redis runs appendonly yes + appendfsync always */
	HUB_ACK_REPLICATED,    /* ... and WAIT saw ack-replicas replicas confirm it */
};

/* The redis key: one URL, or a comma-separated list of seed URLs of a Redis
 * Cluster. A host is an IP address (IPv6 in brackets) or a DNS name; names
 * are resolved by the Redis bus when it connects, never here. */
#define HUB_REDIS_SEEDS_MAX   16
#define HUB_REDIS_HOST_MAX    256      /* a DNS name is at most 253 bytes */

struct hub_redis_seed {
	char host[HUB_REDIS_HOST_MAX];
	int port;
};

struct hub_config {
	char *config_file;
	char *listen;              /* HOST:PORT */
	char *redis;               /* redis://HOST:PORT[/DB][,redis://HOST:PORT...] or "embedded" */
	char *redis_server;        /* redis-server binary for embedded mode */
	char *data_dir;            /* embedded mode: the Redis data directory */
	char *ack_durability;      /* accepted | fsync | replicated */
	int ack_replicas;
	int ack_wait_ms;
	char *schemas;
	char *jwt_alg;
	char *jwt_key;
	char *jwt_issuer;
	char *jwt_audience;
	int jwt_leeway_s;
	char *api_keys;
	char *tls_cert;
	char *tls_key;
	char *tls_client_ca;
	char *instance_id;
	char *log_level;
	int max_frame_bytes;
	int max_readings_per_frame;
	int max_inflight_frames;
	int max_devices_per_gateway;
	int registry_inflight;
	double device_rate;
	double device_burst;
	double gateway_rate;
	double gateway_burst;
	double announce_rate;
	double announce_burst;
	double command_ack_rate;
	double command_ack_burst;
	double gateway_connect_rate;
	double gateway_connect_burst;
	int max_command_result_bytes;
	int clock_skew_future_s;
	int clock_skew_past_s;
	long device_stream_maxlen;
	long feed_stream_maxlen;
	long feed_sink_max_lag;
	int feed_shards;           /* 0: auto (1 on one Redis, 16 on a cluster) */
	int seq_window;
	int redis_timeout_ms;
	int redis_backoff_max_ms;
	int lease_ttl_ms;
	int lease_renew_ms;
	int retry_after_ms;
	int redis_shed_ms;
	int rx_buffer_bytes;
	int ping_interval_s;
	long history_max_range_s;
	int ping_timeout_s;
	int stream_auth_timeout_ms;
	int stream_max_subscriptions;
	int stream_max_filter_devices;
	int stream_max_filter_labels;
	int stream_max_filter_entries;
	int stream_queue_max;
	long stream_queue_max_bytes;
	char *stream_slow_policy;
	int stream_replay_page;
	int aggregate_grace_ms;
	int anomaly_flush_ms;
	int anomaly_state_ttl_s;
	int http_header_timeout_s;
	int http_body_timeout_s;
	long audit_max_entries;
	int audit_retention_days;
	int http_keepalive_timeout_s;
	char *web_root;
	int provenance;            /* 1: readings chained (docs/provenance.md) */
	int provenance_checkpoint_s;
	char *provenance_key;
	long provenance_checkpoints_max;
	int rollups;               /* 0: readings are not rolled up (docs/analytics.md) */
	int rollup_flush_ms;
	int rollup_coarse_flush_ms;
	long rollup_retention_1m_s;
	long rollup_retention_1h_s;
	long rollup_retention_1d_s;
	int aggregates_cache_ttl_ms;
	int aggregates_lock_ms;
	int aggregates_max_devices;
	char *api_tiers;
	char *api_default_tier;

	/* --dev (command line only): development settings are allowed. */
	bool dev;

	/* Derived by hub_config_validate(). */
	char listen_host[64];
	int listen_port;
	char redis_host[HUB_REDIS_HOST_MAX]; /* the first seed (logs; embedded: 127.0.0.1) */
	int redis_port;
	struct hub_redis_seed redis_seeds[HUB_REDIS_SEEDS_MAX]; /* in the order given */
	int redis_nseeds;          /* 1 unless a comma-separated list was given */
	int redis_db;              /* 0 whenever redis_nseeds > 1 */
	char *redis_password;      /* from any URL; every URL that names one names the same */
	bool redis_embedded;
	enum hub_ack_durability ack_mode;
};

/* Fills cfg from defaults, the config file (--config or IOT_HUB_CONFIG),
 * argv and the environment, then validates. Returns 0, 1 when the caller
 * should exit 0 (--help / --version printed), or -1 with one line in err.
 * Free with hub_config_free(). Start-up only (reads files). */
int hub_config_load(struct hub_config *cfg, int argc, char **argv,
		    char *err, size_t errlen);

/* Checks values and cross-key rules and fills the derived fields.
 * Returns 0 or -1 with one line in err. */
int hub_config_validate(struct hub_config *cfg, char *err, size_t errlen);

void hub_config_free(struct hub_config *cfg);

/* Writes every key with its current value as a config file. */
void hub_config_dump(const struct hub_config *cfg, FILE *out);

/* Writes the usage text (flags and keys with defaults). */
void hub_config_usage(FILE *out);

/* Calls report(var, closest, arg) for each IOT_HUB_* variable of env
 * (NULL-terminated "NAME=value" strings, e.g. environ) that names no key
 * (IOT_HUB_CONFIG is known), with the variable's name and the closest key's
 * variable name; returns how many. A warning, not an error: the IOT_HUB_
 * prefix is shared (Kubernetes service links of a Service named iot-hub
 * define IOT_HUB_SERVICE_HOST, IOT_HUB_PORT, ...). */
size_t hub_config_env_unknown(char **env, void (*report)(const char *var, const char *closest,
							  void *arg), void *arg);

#endif
