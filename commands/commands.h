/*
 * commands.h - the command lifecycle engine (docs/commands.md): state lives
 * in Redis and every transition is one atomic Lua script; this module routes
 * deliveries and cancels to the instance holding the device (pub/sub per
 * instance), delivers a device's pending commands when it is announced, takes
 * gateway acks, and runs the timers (ttl, ack timeout, overall timeout) on the
 * event loop: one heap, one lws timer, plus a once-a-second sweep of overdue
 * deadlines in Redis that covers restarted or crashed instances.
 */
#ifndef HUB_COMMANDS_H
#define HUB_COMMANDS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "hub/redis.h"

/* Longest command or rollout id the hub makes: "c_" + 32 hex + "_" + a
 * rollout index. */
#define CMD_ID_MAX 63

struct hub;

/* The module (hub/module.h): the engine (its HTTP routes are cmd_api.h). */
struct hub_module;
extern const struct hub_module cmd_module;

void cmd_init(struct hub *hub);   /* before hub_redis_start (registers scripts) */
void cmd_stop(struct hub *hub);   /* timers, while the loop exists */
void cmd_free(struct hub *hub);

/* The ten states; final ones cannot change. */
bool cmd_state_valid(const char *s);
bool cmd_state_final(const char *s);
/* True for ids this hub makes: c_<32 hex>[_<n>] and r_<32 hex>. */
bool cmd_id_valid(const char *id);

/* ---- for the HTTP API (commands/cmd_api.c) -------------------------------- */

struct cmd_spec {
	const char *id, *device, *type, *name;
	const char *params;          /* compact JSON */
	int ack_timeout_s, timeout_s, ttl_s, max_attempts;
	const char *idem;            /* NULL: none */
	const char *owner;           /* API key name (idempotency scope) */
	const char *rollout;         /* NULL: none */
};

/* Creates the command (reply: {1,id} created, {0,id} idempotent repeat,
 * {-1} device unknown) and, once created, routes it to the device. */
int cmd_create(struct hub *hub, const struct cmd_spec *spec, hub_redis_cb cb, void *arg);

/* After a create reply: deliver to the device if it is online here, or hand
 * it to the instance that holds it (instance/online from the create reply). */
void cmd_route(struct hub *hub, const char *id, const char *device, const char *instance,
	       bool online);

/* Reply: {1, was-status, device} canceled, {0, status} already final, {-1}. */
int cmd_cancel(struct hub *hub, const char *id, hub_redis_cb cb, void *arg);

/* After a cancel reply: tells the device's gateway (wherever it is). */
void cmd_route_cancel(struct hub *hub, const char *id, const char *device);

/* Reply: {hash fields..., log entries...} as two arrays; {} when unknown. */
int cmd_get(struct hub *hub, const char *id, hub_redis_cb cb, void *arg);

/* Reply: array of HGETALL arrays, newest first. */
int cmd_list(struct hub *hub, const char *device, const char *status, int limit,
	     hub_redis_cb cb, void *arg);

/* Fleet rollouts (docs/commands.md). sp->id is the rollout id "r_…", sp->type
 * the target device type; labels (JSON object or NULL) and patterns (JSON
 * array of the key's device patterns, NULL: all) narrow the target.
 * Reply: integer, the number of commands created. */
int cmd_rollout_create(struct hub *hub, const struct cmd_spec *sp, const char *labels,
		       const char *patterns, int max_per_minute, double ratio, int min_finished,
		       bool online_only, hub_redis_cb cb, void *arg);
/* Pauses, resumes or cancels rollout id (action "pause", "resume",
 * "cancel"; hub/lua/rollout_ctl.lua): reply {1, new status} | {0, status}
 * | {-1}. After a cancel, cmd_rollout_kick finishes it. */
int cmd_rollout_ctl(struct hub *hub, const char *id, const char *action, hub_redis_cb cb,
		    void *arg);
/* Reply: {hash, {status, count, ...}} ({}, {} when unknown). */
int cmd_rollout_get(struct hub *hub, const char *id, hub_redis_cb cb, void *arg);
/* Runs a release step now (after create: the first command goes at once). */
void cmd_rollout_kick(struct hub *hub, const char *id);

/* A random id "<prefix>_<32 hex>" into out[35]. With a device (a command's
 * id), the id is drawn in the device's Redis Cluster slot: its keys
 * (iot:cmd:{<id>}) share the slot of the device's keys (hub_slot_fit_id). */
void cmd_new_id(char out[35], char prefix);
void cmd_new_id_for(char out[35], const char *device);
/* A rollout id "r_<32 hex>" drawn in the slot of {hub}: a rollout's keys
 * (iot:rollout:{<id>}) share the slot of the active set on a cluster. */
void cmd_new_rollout_id(char out[35]);

/* Whether commands routed to this instance by others reach it: on a Redis
 * Cluster, once its sharded control channel is subscribed (the hub listens
 * only then); on one Redis always (the pub/sub connection comes first). */
bool cmd_routable(const struct hub *hub);

/* Tracks a deadline locally (the engine arms its timer). */
void cmd_track(struct hub *hub, const char *id, int64_t deadline_ms);

#endif
