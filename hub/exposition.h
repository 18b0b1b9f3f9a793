/*
 * exposition.h - the hub's metrics in the Prometheus text format.
 */
#ifndef HUB_EXPOSITION_H
#define HUB_EXPOSITION_H

#include "hub/util.h"

struct hub;

/* Appends every metric of hub to out. */
void hub_metrics_render(const struct hub *hub, hub_buf *out);

#endif
