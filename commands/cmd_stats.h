/*
 * cmd_stats.h - command transitions counted per minute, for the fleet
 * overview (GET /v1/commands/stats, docs/commands.md "Commands by state").
 *
 * Every hub listens to the dashboards' commands channel (a pattern
 * subscription of its own, beside the stream module's) and counts each
 * status event by the minute of its `at`, by state and by device type, for
 * the last hour. Every 2 s it writes the minutes that changed to Redis
 * (hub/lua/cmd_stats_put.lua: each count keeps the larger of the stored and
 * its own), so the hubs of one Redis agree without double counting and the
 * counts outlive a hub. A window is read in one call (one slot, {cstats}).
 * Counting costs one parse of a short line per transition; nothing is added
 * to the command scripts. Events published while no hub was subscribed are
 * not counted.
 */
#ifndef CMD_STATS_H
#define CMD_STATS_H

struct hub;
struct hub_req;
struct hub_query;
struct cmd_stats;

/* At start (before Redis connects): subscribes and arms the flush timer.
 * Never NULL (aborts when out of memory). */
struct cmd_stats *cmd_stats_new(struct hub *hub);
/* Cancels the timer (the loop still up); then free. Both NULL-safe. */
void cmd_stats_stop(struct cmd_stats *s);
void cmd_stats_free(struct cmd_stats *s);

/* Answers GET /v1/commands/stats?window=... (rq's key checked by the route). */
void cmd_stats_answer(struct cmd_stats *s, struct hub_req *rq, const struct hub_query *q);

#endif
