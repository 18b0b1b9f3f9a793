/*
 * exposition.c - GET /metrics: the counters of struct hub_metrics and the
 * gauges of the hub's state in the Prometheus text format (0.0.4). Names:
 * iot_hub_<what>[_<unit>][_total]; a label set is a fixed table here.
 */
#include "hub/exposition.h"

#include <dirent.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/resource.h>

#include "hub/anomaly.h"
#include "hub/durability.h"
#include "hub/feedtrim.h"
#include "hub/http.h"
#include "hub/hub.h"
#include "hub/redis.h"

static const char *const ws_protocols[HUB_WS__COUNT] = { "gateway", "dashboard" };

static const char *const http_refusals[HUB_HTTP_REFUSAL__COUNT] = {
	"headers_too_large", "uri_too_long", "body_too_large", "chunked_body",
	"body_timeout", "pipelined_body",
};

static const char *const byte_protocols[HUB_WS__COUNT + 1] = { "gateway", "dashboard", "http" };

static const char *const disconnect_reasons[HUB_DISC__COUNT] = {
	"peer_close", "ping_timeout", "lost", "takeover", "connect_rate", "protocol_error",
	"shutdown", "write_failed", "revoked",
};

static const char *const frame_results[HUB_FRAME__COUNT] = {
	"acked", "duplicate", "bad_json", "bad_message", "unavailable", "shed",
};

static void counter(hub_buf *o, const char *name, const char *help, uint64_t v)
{
	hub_buf_printf(o, "# HELP %s %s\n# TYPE %s counter\n%s %llu\n", name, help,
		       name, name, (unsigned long long)v);
}

/* One counter with a label: a sample per value of the label. */
static void counters(hub_buf *o, const char *name, const char *help, const char *label,
		     const char *const *values, const uint64_t *v, int n)
{
	hub_buf_printf(o, "# HELP %s %s\n# TYPE %s counter\n", name, help, name);
	for (int i = 0; i < n; i++)
		hub_buf_printf(o, "%s{%s=\"%s\"} %llu\n", name, label, values[i],
			       (unsigned long long)v[i]);
}

static void gauge(hub_buf *o, const char *name, const char *help, double v)
{
	hub_buf_printf(o, "# HELP %s %s\n# TYPE %s gauge\n%s %g\n", name, help, name,
		       name, v);
}

/* The buckets, sum and count of h under a label set ("" for none; no
 * HELP/TYPE). */
static void histogram_samples(hub_buf *o, const char *name, const char *labels,
			      const struct hub_histogram *h)
{
	const char *sep = *labels ? "," : "", *lo = *labels ? "{" : "", *lc = *labels ? "}" : "";
	uint64_t cum = 0;

	for (int i = 0; i < HUB_HIST_NBOUNDS; i++) {
		cum += h->counts[i];
		hub_buf_printf(o, "%s_bucket{%s%sle=\"%g\"} %llu\n", name, labels, sep,
			       hub_hist_bounds[i], (unsigned long long)cum);
	}
	cum += h->counts[HUB_HIST_NBOUNDS];
	hub_buf_printf(o, "%s_bucket{%s%sle=\"+Inf\"} %llu\n%s_sum%s%s%s %.9g\n%s_count%s%s%s %llu\n",
		       name, labels, sep, (unsigned long long)cum, name, lo, labels, lc, h->sum,
		       name, lo, labels, lc, (unsigned long long)h->count);
}

static void histogram(hub_buf *o, const char *name, const char *help,
		      const struct hub_histogram *h)
{
	hub_buf_printf(o, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
	histogram_samples(o, name, "", h);
}

static void analytics_metrics(hub_buf *o, const struct hub_analytics_metrics *a)
{
	counter(o, "iot_hub_rollup_flushes_total", "Rollup flushes merged into Redis.",
		a->rollup_flushes);
	counter(o, "iot_hub_rollup_partials_total",
		"Rollup partials (device, field, bucket) merged into Redis.", a->rollup_partials);
	counter(o, "iot_hub_rollup_retries_total", "Rollup flushes sent again after a lost reply.",
		a->rollup_retries);
	counter(o, "iot_hub_rollup_lost_total", "Rollup flushes given up (Redis away too long).",
		a->rollup_lost);
	counter(o, "iot_hub_aggregate_queries_total", "GET /v1/aggregates answers (200).",
		a->queries);
	counter(o, "iot_hub_aggregate_cache_hits_total",
		"GET /v1/aggregates answers found in the cache.", a->cache_hits);
	counter(o, "iot_hub_aggregate_cache_shared_total",
		"GET /v1/aggregates answers computed by another request while this one waited.",
		a->cache_shared);
	counter(o, "iot_hub_aggregate_computations_total",
		"GET /v1/aggregates answers computed from the rollups by this instance.",
		a->computations);
	counter(o, "iot_hub_aggregate_busy_total",
		"GET /v1/aggregates answered 503 because too many queries were computing here.",
		a->busy);
	if (a->ntiers) {
		counters(o, "iot_hub_tier_requests_total",
			 "GET /v1/aggregates requests by the tier of their API key.", "tier",
			 a->tier_names, a->tier_requests, a->ntiers);
		counters(o, "iot_hub_tier_rate_limited_total",
			 "GET /v1/aggregates requests refused with 429 by the tier's request rate.",
			 "tier", a->tier_names, a->tier_refused_rate, a->ntiers);
		counters(o, "iot_hub_tier_range_refused_total",
			 "GET /v1/aggregates requests refused with 422: range over the tier's.",
			 "tier", a->tier_names, a->tier_refused_range, a->ntiers);
	}
	histogram(o, "iot_hub_aggregate_query_seconds",
		  "GET /v1/aggregates: request to answer started.", &a->query_latency);
}

static void route_answers(const struct hub_route_stat *s, void *arg)
{
	for (int i = 0; i <= HUB_HTTP_CODES; i++) {
		if (!s->answers[i])
			continue;
		if (i < HUB_HTTP_CODES)
			hub_buf_printf(arg, "iot_hub_http_requests_total{method=\"%s\",route=\"%s\","
				       "code=\"%u\"} %llu\n", s->method, s->route, hub_http_codes[i],
				       (unsigned long long)s->answers[i]);
		else
			hub_buf_printf(arg, "iot_hub_http_requests_total{method=\"%s\",route=\"%s\","
				       "code=\"other\"} %llu\n", s->method, s->route,
				       (unsigned long long)s->answers[i]);
	}
}

static void route_latency(const struct hub_route_stat *s, void *arg)
{
	char labels[320];

	if (!s->latency.count)
		return;
	snprintf(labels, sizeof(labels), "method=\"%s\",route=\"%s\"", s->method, s->route);
	histogram_samples(arg, "iot_hub_http_request_duration_seconds", labels, &s->latency);
}

/* The standard process_* metrics, from /proc/self. */
static void process_metrics(hub_buf *o)
{
	unsigned long utime = 0, stime = 0, vsize = 0;
	unsigned long long start = 0;
	long rss = 0, ticks = sysconf(_SC_CLK_TCK), page = sysconf(_SC_PAGESIZE);
	double btime = 0;
	char buf[1024], *p;
	FILE *f;
	size_t nfd = 0;
	DIR *d;
	struct rlimit rl;

	if ((f = fopen("/proc/self/stat", "r"))) {
		size_t n = fread(buf, 1, sizeof(buf) - 1, f);
		buf[n] = '\0';
		fclose(f);
		/* Fields after the command, which may hold spaces: from the last ')'. */
		if ((p = strrchr(buf, ')')))
			sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu "
			       "%*d %*d %*d %*d %*d %*d %llu %lu %ld", &utime, &stime, &start,
			       &vsize, &rss);
	}
	if ((f = fopen("/proc/stat", "r"))) {
		while (fgets(buf, sizeof(buf), f))
			if (sscanf(buf, "btime %lf", &btime) == 1)
				break;
		fclose(f);
	}
	if ((d = opendir("/proc/self/fd"))) {
		while (readdir(d))
			nfd++;
		closedir(d);
		nfd = nfd > 3 ? nfd - 3 : 0; /* ".", ".." and the directory's own */
	}
	if (getrlimit(RLIMIT_NOFILE, &rl))
		rl.rlim_cur = 0;
	hub_buf_printf(o, "# HELP process_cpu_seconds_total User and system CPU time spent.\n"
		       "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total %.2f\n",
		       ticks > 0 ? (double)(utime + stime) / (double)ticks : 0);
	hub_buf_printf(o, "# HELP process_resident_memory_bytes Resident memory size.\n"
		       "# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes %ld\n",
		       rss * page);
	hub_buf_printf(o, "# HELP process_virtual_memory_bytes Virtual memory size.\n"
		       "# TYPE process_virtual_memory_bytes gauge\nprocess_virtual_memory_bytes %lu\n",
		       vsize);
	hub_buf_printf(o, "# HELP process_open_fds Open file descriptors.\n"
		       "# TYPE process_open_fds gauge\nprocess_open_fds %zu\n", nfd);
	hub_buf_printf(o, "# HELP process_max_fds The file descriptor limit.\n"
		       "# TYPE process_max_fds gauge\nprocess_max_fds %llu\n",
		       (unsigned long long)rl.rlim_cur);
	hub_buf_printf(o, "# HELP process_start_time_seconds Start time since the epoch.\n"
		       "# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds %.2f\n",
		       ticks > 0 ? btime + (double)start / (double)ticks : 0);
}

void hub_metrics_render(const struct hub *hub, hub_buf *o)
{
	const struct hub_metrics *m = &hub->metrics;

	hub_buf_printf(o, "# HELP iot_hub_info Build and instance.\n# TYPE iot_hub_info gauge\n"
		       "iot_hub_info{version=\"%s\",instance=\"%s\"} 1\n",
		       HUB_VERSION, hub->instance_id);
	hub_buf_printf(o, "# HELP iot_hub_connections Open connections by kind.\n"
		       "# TYPE iot_hub_connections gauge\n"
		       "iot_hub_connections{kind=\"gateway\"} %zu\n"
		       "iot_hub_connections{kind=\"dashboard\"} %zu\n",
		       hub->metrics.gateway_connections, hub->metrics.stream_connections);
	counter(o, "iot_hub_gateway_connections_total", "Gateway WebSockets established.",
		m->connections_total);
	counter(o, "iot_hub_auth_failures_total", "Gateway WebSocket upgrades refused with 401.",
		m->auth_failures_total);
	counter(o, "iot_hub_api_auth_failures_total", "HTTP API requests answered 401.",
		m->api_auth_failures_total);
	counters(o, "iot_hub_http_refused_total",
		 "HTTP requests refused or cut before routing, by reason.", "reason",
		 http_refusals, m->http_refused, HUB_HTTP_REFUSAL__COUNT);
	counters(o, "iot_hub_frames_total", "Gateway frames by outcome.", "result",
		 frame_results, m->frames, HUB_FRAME__COUNT);
	counter(o, "iot_hub_readings_accepted_total", "Readings stored in Redis.",
		m->readings_accepted);
	/* From HUB_REJ_INVALID: HUB_REJ_NONE is not a refusal. */
	counters(o, "iot_hub_readings_rejected_total", "Readings refused, by code.", "code",
		 hub_reject_names + HUB_REJ_INVALID, m->readings_rejected + HUB_REJ_INVALID,
		 HUB_REJ__COUNT - HUB_REJ_INVALID);
	counter(o, "iot_hub_acks_total", "Acks sent to gateways.", m->acks_total);
	counter(o, "iot_hub_announces_total", "Announce messages handled.", m->announces_total);
	counter(o, "iot_hub_announce_rejected_total", "Announced devices refused.",
		m->devices_rejected_total);
	counter(o, "iot_hub_takeovers_total", "Gateway connections closed by a takeover.",
		m->takeovers_total);
	counter(o, "iot_hub_frames_too_large_total", "Connections closed with 1009.",
		m->frames_too_large_total);
	counters(o, "iot_hub_binary_closed_total",
		 "Connections closed with 1003 for sending a binary message, by protocol.",
		 "protocol", ws_protocols, m->binary_closed, HUB_WS__COUNT);
	counter(o, "iot_hub_flow_paused_total", "Times a gateway socket stopped being read.",
		m->flow_paused_total);
	counter(o, "iot_hub_stream_connections_total", "Dashboard WebSockets established.",
		m->stream_connections_total);
	counter(o, "iot_hub_stream_auth_failures_total", "Dashboard auth refused (upgrade or first message).",
		m->stream_auth_failures_total);
	gauge(o, "iot_hub_stream_subscriptions", "Live dashboard subscriptions.",
	      (double)hub->metrics.stream_subscriptions);
	counter(o, "iot_hub_stream_messages_total", "Messages written to dashboards.",
		m->stream_messages_total);
	counters(o, "iot_hub_stream_dropped_total",
		 "Queued dashboard messages dropped (slow consumers), by subscription stream.",
		 "stream", hub_stream_kinds, m->stream_dropped, HUB_STREAM_KINDS);
	counter(o, "iot_hub_stream_slow_closed_total", "Dashboards closed for reading too slowly.",
		m->stream_slow_closed_total);
	counter(o, "iot_hub_stream_replayed_total", "Readings replayed from the feed for since.",
		m->stream_replayed_total);
	counters(o, "iot_hub_anomalies_total",
		 "Fields of readings flagged by their anomaly model on this instance, by kind.",
		 "kind", anom_kind_names + 1, m->anomalies + 1, HUB_ANOM_KINDS - 1);
	counter(o, "iot_hub_aggregate_late_readings_total", "Readings too old to aggregate.",
		m->aggregate_late_readings_total);
	counter(o, "iot_hub_aggregate_late_partials_total", "Partial aggregates that came after their window was emitted.",
		m->aggregate_late_partials_total);
	analytics_metrics(o, &m->analytics);
	counter(o, "iot_hub_commands_created_total", "Commands created over HTTP.",
		m->commands_created_total);
	counter(o, "iot_hub_commands_sent_total", "Command messages sent to gateways (resends included).",
		m->commands_sent_total);
	counter(o, "iot_hub_command_acks_total", "command_ack messages handled.",
		m->command_acks_total);
	counter(o, "iot_hub_command_acks_limited_total", "command_acks answered rate_limited.",
		m->command_acks_limited_total);
	counter(o, "iot_hub_gateway_connects_refused_total",
		"Gateway connections closed with 4029 (gateway-connect-rate).",
		m->gateway_connects_refused_total);
	counter(o, "iot_hub_devices_taken_total",
		"Devices of this instance's connections announced by another connection.",
		m->devices_taken_total);
	counter(o, "iot_hub_redis_connects_total", "Redis command-connection attempts.",
		m->redis_reconnects_total);
	counter(o, "iot_hub_redis_errors_total", "Redis error replies.", m->redis_errors_total);
	counter(o, "iot_hub_redis_waits_total",
		"WAITs answered (ack-durability replicated: one covers the store batches sent before it).",
		m->redis_waits_total);
	counter(o, "iot_hub_redis_waits_short_total",
		"WAITs that counted fewer than ack-replicas replicas: what they covered was answered unavailable.",
		m->redis_waits_short_total);
	counter(o, "iot_hub_redis_moved_total",
		"Redis Cluster MOVED redirects followed (a slot had a new primary).",
		m->redis_moved_total);
	counter(o, "iot_hub_redis_ask_total",
		"Redis Cluster ASK redirects followed (a key of a migrating slot).",
		m->redis_ask_total);
	counter(o, "iot_hub_redis_cluster_map_refreshes_total",
		"Redis Cluster slot maps read.", m->redis_map_refreshes_total);
	gauge(o, "iot_hub_redis_up",
	      "1 while the Redis command connection is up and answering (no reply pending for long).",
	      hub_redis_up(hub->redis) ? 1 : 0);
	{
		enum hub_persistence p = hub_durability_persistence(hub);

		hub_buf_printf(o, "# HELP iot_hub_redis_persistence Redis's own persistence as last "
			       "checked (INFO persistence, CONFIG GET save): 1 for the mode found "
			       "(none: a Redis restart loses everything).\n"
			       "# TYPE iot_hub_redis_persistence gauge\n");
		for (int i = HUB_PERSIST_UNKNOWN; i < HUB__PERSIST_COUNT; i++)
			hub_buf_printf(o, "iot_hub_redis_persistence{mode=\"%s\"} %d\n",
				       hub_persistence_name((enum hub_persistence)i), (int)p == i);
	}
	gauge(o, "iot_hub_redis_pending", "Redis commands awaiting a reply.",
	      hub->redis ? (double)hub_redis_pending(hub->redis) : 0);
	gauge(o, "iot_hub_registry_inflight",
	      "Gateway connection registry calls (connect, announce, offline) at Redis (at most registry-inflight).",
	      (double)hub->metrics.registry_inflight);
	gauge(o, "iot_hub_registry_inflight_max",
	      "The most gateway connection registry calls at Redis at once since start.",
	      (double)hub->metrics.registry_inflight_max);
	gauge(o, "iot_hub_registry_queued",
	      "Gateway connection registry calls waiting in the hub for room at Redis.",
	      (double)hub->metrics.registry_queued);
	counter(o, "iot_hub_registry_queued_total",
		"Gateway connection registry calls that waited for room at Redis.",
		hub->metrics.registry_queued_total);
	counter(o, "iot_hub_registry_cancelled_total",
		"Waiting connect and announce calls dropped unsent because their connection closed.",
		hub->metrics.registry_cancelled_total);
	gauge(o, "iot_hub_device_types", "Device types loaded.",
	      hub->schemas ? (double)schema_set_count(hub->schemas) : 0);
	histogram(o, "iot_hub_redis_rtt_seconds", "Redis command round trip.", &m->redis_rtt);
	histogram(o, "iot_hub_loop_lag_seconds",
		  "How late the event loop ran a 20 ms timer (time spent in other work).", &m->loop_lag);
	histogram(o, "iot_hub_ack_latency_seconds", "Gateway frame received to ack queued.",
		  &m->ack_latency);
	histogram(o, "iot_hub_stream_delivery_seconds",
		  "Raw reading stored in Redis (its feed id's time) to written to a dashboard.",
		  &m->stream_delivery);
	counters(o, "iot_hub_commands_finished_total",
		 "Commands that reached a final state through this instance, by state.", "state",
		 hub_cmd_final_states, m->commands_finished, HUB_CMD_FINAL_STATES);
	gauge(o, "iot_hub_rollouts_active", "Running rollouts (read by the sweep every second).",
	      (double)m->rollouts_active);
	gauge(o, "iot_hub_devices_online", "Devices announced on this instance's gateway connections.",
	      (double)m->devices_online);
	counters(o, "iot_hub_gateway_disconnects_total", "Gateway connections ended, by reason.",
		 "reason", disconnect_reasons, m->gateway_disconnects, HUB_DISC__COUNT);
	counters(o, "iot_hub_received_bytes_total",
		 "Bytes received: WebSocket message payloads, and HTTP request bodies.", "protocol",
		 byte_protocols, m->bytes_received, HUB_WS__COUNT + 1);
	counters(o, "iot_hub_sent_bytes_total",
		 "Bytes sent: WebSocket message payloads, and whole HTTP answers.", "protocol",
		 byte_protocols, m->bytes_sent, HUB_WS__COUNT + 1);
	hub_buf_puts(o, "# HELP iot_hub_http_requests_total HTTP requests answered, by route and "
		     "status code.\n# TYPE iot_hub_http_requests_total counter\n");
	hub_http_each_route_stat(hub, route_answers, o);
	hub_buf_puts(o, "# HELP iot_hub_http_request_duration_seconds Request head complete to "
		     "answer started, by route.\n# TYPE iot_hub_http_request_duration_seconds "
		     "histogram\n");
	hub_http_each_route_stat(hub, route_latency, o);
	hub_feedtrim_expose(hub, o);
	process_metrics(o);
}
_Static_assert(ANOM__COUNT == HUB_ANOM_KINDS, "HUB_ANOM_KINDS follows enum anom_kind");
