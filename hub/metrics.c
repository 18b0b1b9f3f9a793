/*
 * metrics.c - the histogram buckets (hub/metrics.h). The counters are plain
 * fields bumped where things happen; hub/exposition.c renders them.
 */
#include "hub/metrics.h"

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
