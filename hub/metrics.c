/*
 * metrics.c - the histogram buckets (hub/metrics.h). The counters are plain
 * fields bumped where things happen; hub/exposition.c renders them.
 */
#include "hub/metrics.h"

#include <string.h>

const double hub_hist_bounds[HUB_HIST_NBOUNDS] = {
	0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
	0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
};

void hub_hist_observe(struct hub_histogram *h, double seconds)
{
	int i = 0;

	while (i < HUB_HIST_NBOUNDS && seconds > hub_hist_bounds[i])
		i++;
	h->counts[i]++;
	h->count++;
	h->sum += seconds;
}

const char *const hub_stream_kinds[HUB_STREAM_KINDS] = {
	"raw", "1s", "10s", "1m", "presence", "commands", "anomalies",
};

const char *const hub_cmd_final_states[HUB_CMD_FINAL_STATES] = {
	"succeeded", "failed", "rejected", "timed_out", "expired", "canceled",
};

void hub_metrics_command_final(struct hub_metrics *m, const char *state)
{
	for (int i = 0; state && i < HUB_CMD_FINAL_STATES; i++)
		if (!strcmp(state, hub_cmd_final_states[i])) {
			m->commands_finished[i]++;
			return;
		}
}

const unsigned hub_http_codes[HUB_HTTP_CODES] = {
	200, 201, 202, 204, 206, 304, 400, 401, 403, 404, 405, 409, 411, 413, 414, 422,
	429, 500, 503,
};

void hub_route_stat_observe(struct hub_route_stat *s, unsigned status, double seconds)
{
	int i = 0;

	while (i < HUB_HTTP_CODES && hub_http_codes[i] != status)
		i++;
	s->answers[i]++;
	hub_hist_observe(&s->latency, seconds);
}
