/*
 * metrics.h - counters and histograms, rendered in the Prometheus text
 * format by hub/exposition.c (GET /metrics). Plain integers bumped on the loop thread: no atomics needed.
 */
#ifndef HUB_METRICS_H
#define HUB_METRICS_H

#include <stdint.h>

#include "hub/util.h"
#include "protocols/admit.h"   /* enum hub_reject_code */

enum hub_frame_result {
	HUB_FRAME_ACKED,        /* ack sent after store (or nothing to store) */
	HUB_FRAME_DUPLICATE,    /* seq already durable: acked again, not stored */
	HUB_FRAME_BAD_JSON,
	HUB_FRAME_BAD_MESSAGE,
	HUB_FRAME_UNAVAILABLE,  /* Redis down: error sent, nothing acked */
	HUB_FRAME_SHED,         /* Redis behind (redis-shed-ms): unavailable, not queued */
	HUB_FRAME__COUNT
};

/* HTTP requests refused or cut before a route saw them. */
enum hub_http_refusal {
	HUB_HTTP_HEADERS_TOO_LARGE,  /* 431 */
	HUB_HTTP_URI_TOO_LONG,       /* 414 */
	HUB_HTTP_BODY_TOO_LARGE,     /* 413 */
	HUB_HTTP_CHUNKED_BODY,       /* 411 */
	HUB_HTTP_BODY_TIMEOUT,       /* closed: body not complete in time */
	HUB_HTTP_PIPELINE_CLOSED,    /* closed: a pipelined request with a body */
	HUB_HTTP_REFUSAL__COUNT
};

/* The two WebSocket protocols, for per-protocol counters. */
enum hub_ws_proto { HUB_WS_GATEWAY, HUB_WS_DASHBOARD, HUB_WS__COUNT };

#define HUB_HIST_NBOUNDS 15

struct hub_histogram {
	uint64_t counts[HUB_HIST_NBOUNDS + 1]; /* last = +Inf */
	uint64_t count;
	double sum;
};

/* Rollups and the analytics API (docs/analytics.md, docs/metrics.md). The
 * tier counters are indexed like api-tiers; tier_names holds its names. */
#define HUB_TIERS_MAX 8
struct hub_analytics_metrics {
	uint64_t rollup_flushes;           /* rollup_apply calls answered */
	uint64_t rollup_partials;          /* (device, field, bucket) partials merged */
	uint64_t rollup_retries;           /* flushes sent again after a lost reply */
	uint64_t rollup_lost;              /* flushes given up (Redis away too long) */
	uint64_t queries;                  /* GET /v1/aggregates answered 200 */
	uint64_t cache_hits;               /* ... from the cache */
	uint64_t cache_shared;             /* ... computed by another request meanwhile */
	uint64_t computations;             /* queries computed from the rollups here */
	uint64_t busy;                     /* 503: too many computing at once here */
	uint64_t tier_requests[HUB_TIERS_MAX];
	uint64_t tier_refused_rate[HUB_TIERS_MAX];  /* 429 */
	uint64_t tier_refused_range[HUB_TIERS_MAX]; /* 422: range over the tier's */
	const char *tier_names[HUB_TIERS_MAX];
	int ntiers;
	struct hub_histogram query_latency; /* request -> answer started */
};

/* Upper bounds, seconds: 100us .. 5s. */
extern const double hub_hist_bounds[HUB_HIST_NBOUNDS];

/* The dashboard subscription kinds (docs/dashboard.md `stream`), in the
 * order of protocols/stream.c's enum st_kind. */
#define HUB_STREAM_KINDS 7

/* enum anom_kind's size (hub/anomaly.h): iot_hub_anomalies_total{kind}. */
#define HUB_ANOM_KINDS 5

/* The final states of a command (docs/commands.md), for
 * iot_hub_commands_finished_total. */
#define HUB_CMD_FINAL_STATES 6
extern const char *const hub_cmd_final_states[HUB_CMD_FINAL_STATES];
/* Counts a command that reached state on this instance (ignores others). */
struct hub_metrics;
void hub_metrics_command_final(struct hub_metrics *m, const char *state);
extern const char *const hub_stream_kinds[HUB_STREAM_KINDS];

/* HTTP requests of one route (hub/http.c keeps one per registered route,
 * one for the static files and one for requests no route took): answers
 * by status code, and the time from the request's head to its answer. */
#define HUB_HTTP_CODES 19
extern const unsigned hub_http_codes[HUB_HTTP_CODES]; /* the last slot counts any other */
struct hub_route_stat {
	const char *method, *route;
	uint64_t answers[HUB_HTTP_CODES + 1];
	struct hub_histogram latency;
};
void hub_route_stat_observe(struct hub_route_stat *s, unsigned status, double seconds);

/* Why a gateway connection ended (iot_hub_gateway_disconnects_total). */
enum hub_disconnect {
	HUB_DISC_PEER_CLOSE,       /* the gateway sent a close frame */
	HUB_DISC_PING_TIMEOUT,     /* no pong within ping-timeout-s */
	HUB_DISC_LOST,             /* the socket ended without a close frame */
	HUB_DISC_TAKEOVER,         /* 4001: the gateway connected again */
	HUB_DISC_CONNECT_RATE,     /* 4029 */
	HUB_DISC_PROTOCOL,         /* 1003 binary, 1009 too large, 1002/1007 */
	HUB_DISC_SHUTDOWN,         /* 1001: the hub drained */
	HUB_DISC_WRITE_FAILED,
	HUB_DISC_REVOKED,          /* 4401: its credentials were revoked */
	HUB_DISC__COUNT
};

struct hub_metrics {
	/* gauges */
	size_t gateway_connections;        /* gateway WebSockets open (one per gateway) */
	size_t stream_connections;         /* dashboard WebSockets open */
	size_t stream_subscriptions;       /* their live subscriptions */
	size_t devices_online;             /* devices announced on this instance's connections */
	size_t rollouts_active;            /* running rollouts, as the last sweep read them */
	size_t registry_inflight;          /* connect/announce calls at Redis (hub/registry.c) */
	size_t registry_inflight_max;      /* ... the most at once since start */
	size_t registry_queued;            /* ... waiting in the hub for room */
	/* counters */
	uint64_t connections_total;        /* gateway WebSockets established */
	uint64_t auth_failures_total;      /* gateway upgrades refused with 401 */
	uint64_t api_auth_failures_total;  /* HTTP API requests answered 401 */
	uint64_t http_refused[HUB_HTTP_REFUSAL__COUNT];
	uint64_t frames[HUB_FRAME__COUNT];
	uint64_t readings_accepted;
	uint64_t readings_rejected[HUB_REJ__COUNT]; /* by code; [HUB_REJ_NONE] unused */
	uint64_t acks_total;
	uint64_t announces_total;
	uint64_t devices_rejected_total;   /* announce entries refused */
	uint64_t registry_queued_total;    /* connect/announce calls that had to wait */
	uint64_t registry_cancelled_total; /* ... dropped while waiting (connection closed) */
	uint64_t takeovers_total;
	uint64_t frames_too_large_total;
	uint64_t binary_closed[HUB_WS__COUNT]; /* connections closed with 1003 */
	uint64_t redis_reconnects_total;
	uint64_t redis_errors_total;       /* error replies and failed commands */
	uint64_t redis_waits_total;        /* WAITs answered (ack-durability replicated) */
	uint64_t redis_waits_short_total;  /* ... with fewer than ack-replicas replicas */
	uint64_t redis_moved_total;        /* cluster: MOVED redirects followed */
	uint64_t redis_ask_total;          /* cluster: ASK redirects followed */
	uint64_t redis_map_refreshes_total; /* cluster: slot maps read (CLUSTER SLOTS) */
	uint64_t flow_paused_total;        /* times a gateway socket was paused */
	uint64_t stream_connections_total; /* dashboard WebSockets established */
	uint64_t stream_auth_failures_total;
	uint64_t stream_messages_total;    /* messages written to dashboards */
	uint64_t stream_dropped[HUB_STREAM_KINDS]; /* queued messages dropped (slow dashboards), by stream */
	uint64_t stream_slow_closed_total; /* dashboards closed by stream-slow-policy close */
	uint64_t stream_replayed_total;    /* readings sent from the feed for `since` */
	uint64_t anomalies[HUB_ANOM_KINDS]; /* fields flagged on this instance, by kind; [0] unused */
	uint64_t aggregate_late_readings_total; /* too old to aggregate */
	uint64_t commands_created_total;
	uint64_t commands_sent_total;      /* command messages written to gateways (with resends) */
	uint64_t command_acks_total;
	uint64_t command_acks_limited_total; /* answered rate_limited */
	uint64_t gateway_connects_refused_total; /* closed 4029 */
	uint64_t devices_taken_total;      /* local devices announced by another connection */
	uint64_t aggregate_late_partials_total; /* partials after their window was emitted */
	uint64_t gateway_disconnects[HUB_DISC__COUNT];
	uint64_t commands_finished[HUB_CMD_FINAL_STATES]; /* final transitions made here */
	uint64_t bytes_received[HUB_WS__COUNT + 1]; /* gateway, dashboard, http (bodies) */
	uint64_t bytes_sent[HUB_WS__COUNT + 1];     /* ... http: whole answers */
	struct hub_histogram redis_rtt;    /* command sent -> reply */
	struct hub_histogram loop_lag;     /* how late a 20 ms timer ran (hub/loop.c) */
	struct hub_histogram ack_latency;  /* frame received -> ack queued */
	struct hub_histogram stream_delivery; /* raw reading stored (feed id time) -> written to a dashboard */
	struct hub_analytics_metrics analytics; /* hub/rollup.c, hub/analytics.c */
};

void hub_hist_observe(struct hub_histogram *h, double seconds);


#endif
