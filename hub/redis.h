/*
 * redis.h - the hub's Redis bus: one connection for commands, one that only
 * subscribes (a subscribed hiredis context takes nothing else:
 * docs/pitfalls.md); on a Redis Cluster, one command connection per primary
 * (docs/streams.md "Redis Cluster").
 *
 * The mode is learnt, not configured: the first seed URL that answers
 * INFO cluster says whether it is a cluster node. On one Redis everything
 * runs as it always did (no copy, no slot lookup per command). On a cluster
 * the bus reads the slot map (CLUSTER SLOTS), connects to every primary,
 * sends each command to the primary of the slot of its routing key (KEYS[1]
 * of a script, else the first key: hub/slot.h; or the slot the caller
 * gives), keeps the command until its reply so that MOVED (the map is
 * updated, read again soon, the command resent), ASK (ASKING + the command
 * on the target, once) and NOSCRIPT (SCRIPT LOAD + the command, on that
 * node) are followed without the caller knowing, at most 5 hops. The map is
 * read again after a redirect, when a primary's connection is lost (every
 * 0.5 s until it serves again, as a replica takes over) and every 5 s.
 * Each primary's connection has its own pending ring, watchdog deadlines,
 * scripts (SCRIPT LOAD on connect), gates and reconnect with backoff. A
 * command that crosses slots is refused by Redis (CROSSSLOT, an error reply):
 * the key layout must keep each call to one slot.
 *
 * hiredis 0.14.1 async contexts run on the lws loop: each socket is dup()ed
 * and adopted into lws as a raw file (this file is the only adapter between
 * the two libraries). hiredis has no timeouts or reconnect of its own, so this
 * module adds them on lws_sul timers: a watchdog that drops the connection
 * when a reply is later than redis-timeout-ms (a SIGSTOPped Redis gives no
 * error), a PING when idle, and reconnect with capped exponential backoff and
 * jitter. Well before that drop, a Redis that stops answering no longer
 * counts as up (hub_redis_up).
 * Replies on the command connection arrive in order, so pending callbacks sit
 * in a ring: no allocation per command.
 */
#ifndef HUB_REDIS_H
#define HUB_REDIS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <hiredis/hiredis.h>

#include "hub/util.h"

struct hub;
struct hub_redis;

/* Called once per command: reply is borrowed (dies when the callback returns)
 * and is NULL when the command failed for want of Redis (connection lost,
 * timed out, or the hub is stopping). An error reply is REDIS_REPLY_ERROR. */
typedef void (*hub_redis_cb)(redisReply *reply, void *arg);

/* Called for each message on a subscribed channel; payload is borrowed. */
typedef void (*hub_redis_msg_cb)(const char *channel, const char *payload,
				 size_t len, void *arg);

/* Creates the bus for hub->cfg's Redis address; connects on hub_redis_start(). */
struct hub_redis *hub_redis_new(struct hub *hub);

/* fn(arg) runs (once) when the Redis found can never be used with this
 * configuration: a cluster with a database number in the URL, or a seed
 * that turned from one Redis into a cluster node (or back). The bus logged
 * why and stops connecting; the hub should exit. */
void hub_redis_set_fatal(struct hub_redis *r, void (*fn)(void *), void *arg);

/* Registers a Lua script (before start); returns its index. The script is
 * loaded with SCRIPT LOAD on every (re)connect, ahead of any other command.
 * lua is one of the embedded hub/lua scripts (hub_lua.h): at most
 * HUB_LUA_COUNT of them, each registered once. */
int hub_redis_add_script(struct hub_redis *r, const char *lua);

/* The 40-hex SHA1 of script idx (NUL-terminated, lives as long as r). */
const char *hub_redis_script_sha(const struct hub_redis *r, int idx);

/* A gate: argv (copied) is sent on every (re)connect of the command
 * connection, after the setup commands and before anything else, and the
 * connection counts as up (hub_redis_up(), commands accepted) only once
 * check(reply, arg) returned true for every gate, in the order they were
 * added (each sent once the one before passed). False drops the connection; it is retried with the usual backoff.
 * With recheck_ms > 0 the gate is also sent every recheck_ms while the
 * connection is up, and false then drops it too. reply is borrowed and never
 * NULL (check is not called when the connection is lost first). At most 4
 * gates; before hub_redis_start() only. hub_redis_set_gate adds one with no
 * recheck. */
typedef bool (*hub_redis_gate_cb)(redisReply *reply, void *arg);
void hub_redis_add_gate(struct hub_redis *r, int argc, const char **argv,
			hub_redis_gate_cb check, void *arg, int recheck_ms);
void hub_redis_set_gate(struct hub_redis *r, int argc, const char **argv,
			hub_redis_gate_cb check, void *arg);

void hub_redis_start(struct hub_redis *r);

/* True while the command connection is established, passed its gates, and
 * answers: while it owes replies, one came within 750 ms (plus ack-wait-ms
 * while a WAIT is in flight) of the last reply or of the oldest pending
 * command's sending; while idle (PINGed every 500 ms), within about 1.5 s
 * (a reply waiting unread in the socket counts). /readyz, iot_hub_redis_up and the telemetry path all ask this, so they
 * agree. */
bool hub_redis_up(const struct hub_redis *r);

/* Batching: fn runs in the command connection's writeable callback, right
 * before hiredis writes its buffer (the end of the loop turn that asked for
 * it with hub_redis_want_flush), and may queue commands then. */
void hub_redis_set_flush(struct hub_redis *r, void (*fn)(void *), void *arg);
void hub_redis_want_flush(struct hub_redis *r);

/* Commands in flight on the command connection(s). */
size_t hub_redis_pending(const struct hub_redis *r);

/* How far behind Redis is for this hub: how long the oldest command still
 * unanswered on the command connection (on a cluster, that of slot's
 * primary; any slot < 0: the most behind) has waited, less the ack-wait-ms
 * a WAIT in flight may hold it. 0 when nothing is pending. A Redis that is
 * down is not "behind": ask hub_redis_up(). */
int64_t hub_redis_backlog_us(const struct hub_redis *r, int slot, int64_t now_us);

/* True once the seed said it is a Redis Cluster node (false before any
 * seed answered). The key layout and the scripts' choice of PUBLISH or
 * SPUBLISH may depend on it; nothing else should. */
bool hub_redis_cluster(const struct hub_redis *r);

/* Whether calls whose keys would span hash slots go as one call per slot
 * (or per device): on a cluster; on one Redis they stay one call, which
 * is cheaper. IOT_HUB_TEST_PER_SLOT=1 in the environment (tests only,
 * undocumented on purpose) takes the per-slot paths on one Redis too, so
 * that the integration tests run them. */
bool hub_redis_split(const struct hub_redis *r);

/* Cluster mode: whether the primary of slot is connected and answering
 * (hub_redis_up for the whole bus; on one Redis the same as it). */
bool hub_redis_slot_up(const struct hub_redis *r, int slot);

/* Primaries that serve slots (1 on one Redis): the shards a walk over every
 * key (SCAN, a sharded index) visits with hub_redis_command_argv_shard.
 * Their order changes when the map does: a walk that sees the count change
 * starts over. */
int hub_redis_shards(const struct hub_redis *r);

/* Queues a command. Returns 0 (cb will be called exactly once), or -1 when
 * Redis is down (cb is NOT called). Safe from any callback, including a reply
 * callback. argvlen may be NULL for NUL-terminated arguments. */
int hub_redis_command_argv(struct hub_redis *r, hub_redis_cb cb, void *arg,
			   int argc, const char **argv, const size_t *argvlen);

/* As hub_redis_command_argv, for a command already in RESP form (an array of
 * bulk strings; hiredis copies it). Saves hiredis's formatting, which
 * allocates per argument, on the per-frame path. */
int hub_redis_command_formatted(struct hub_redis *r, hub_redis_cb cb, void *arg,
				const char *cmd, size_t len);

/* The same, sent to the primary of slot (hub_slot() of the key the caller
 * built) instead of the slot of the command's routing key (hub/slot.h:
 * KEYS[1] of a script, else the first key), which saves reading the
 * command again; HUB_REDIS_SLOT_AUTO reads it, HUB_REDIS_SLOT_ANY sends a
 * keyless command to any primary. The slot is ignored on one Redis. In
 * cluster mode the command is copied (kept for a redirect) and -1 also
 * means the slot's primary is not connected. */
#define HUB_REDIS_SLOT_AUTO  (-1)
#define HUB_REDIS_SLOT_ANY   (-2)
int hub_redis_command_argv_slot(struct hub_redis *r, int slot, hub_redis_cb cb, void *arg,
				int argc, const char **argv, const size_t *argvlen);
int hub_redis_command_formatted_slot(struct hub_redis *r, int slot, hub_redis_cb cb, void *arg,
				     const char *cmd, size_t len);

/* A keyless command (SCAN, DBSIZE, ...) to shard i of hub_redis_shards()
 * (0 on one Redis). Not redirected. -1 when that shard is not connected or
 * does not exist. */
int hub_redis_command_argv_shard(struct hub_redis *r, int shard, hub_redis_cb cb, void *arg,
				 int argc, const char **argv, const size_t *argvlen);

/* ---- commands built in RESP form ------------------------------------------
 * An array of bulk strings, argument by argument into a hub_buf, sent with
 * hub_redis_command_formatted: a script call whose KEYS and ARGV are
 * counted up front. hub_resp_head starts it (argc arguments follow). */
void hub_resp_head(hub_buf *b, size_t argc);
void hub_resp_arg(hub_buf *b, const char *p, size_t n);
void hub_resp_str(hub_buf *b, const char *s);
void hub_resp_int(hub_buf *b, int64_t v);
/* EVALSHA <sha of script> <nkeys>, after a hub_resp_head of 3 + nkeys +
 * the number of ARGV. */
void hub_resp_evalsha(hub_buf *b, const struct hub_redis *r, int script, size_t nkeys);
/* As hub_redis_command_formatted, for a write whose reply the caller will
 * acknowledge to a client. With ack-durability replicated the bus follows
 * it with WAIT ack-replicas ack-wait-ms on the same connection (at most one
 * WAIT in flight: writes sent while one is pending share the next), and cb
 * runs only once that WAIT answered: with the command's reply (a copy,
 * borrowed as usual) when at least ack-replicas replicas confirmed or when
 * it is an error reply, else with NULL (short, or the connection failed).
 * In the other modes it is hub_redis_command_formatted. */
int hub_redis_command_durable(struct hub_redis *r, hub_redis_cb cb, void *arg,
			      const char *cmd, size_t len);

/* Reference-counted subscriptions. hub_redis_channel_get() takes a reference
 * on a channel (or a PSUBSCRIBE pattern), subscribing on first use; the bus
 * re-subscribes after every reconnect. cb gets every message (channel is the
 * one it was published on); state_cb (may be NULL) is told when the
 * subscription becomes active (Redis confirmed it: from now on every message
 * published reaches cb) and when it stops being active (connection lost).
 * cb/state_cb/arg are per channel name: the latest get() sets them. After the
 * last put() the subscription lingers a few seconds, then is dropped. */
struct hub_redis_channel;
typedef void (*hub_redis_state_cb)(struct hub_redis_channel *ch, bool active,
				   void *arg);
struct hub_redis_channel *hub_redis_channel_get(struct hub_redis *r, const char *name,
						bool pattern, hub_redis_msg_cb cb,
						hub_redis_state_cb state_cb, void *arg);
void hub_redis_channel_put(struct hub_redis_channel *ch);
bool hub_redis_channel_active(const struct hub_redis_channel *ch);
const char *hub_redis_channel_name(const struct hub_redis_channel *ch);

/* A sharded channel (SSUBSCRIBE, Redis 7.0), for messages sent with
 * SPUBLISH (hub_redis_spublish, or redis.call('SPUBLISH', ...) in a script
 * whose keys share the channel's slot). The same reference counting and
 * callbacks as hub_redis_channel_get; no patterns. On a cluster it is
 * subscribed on the primary that serves the channel's slot (one pub/sub
 * connection per primary that has channels) and moves with the slot:
 * when Redis drops it (the slot left that primary) it is inactive until
 * subscribed again where the map says, so a user that must not miss a
 * message watches state_cb and recovers from a log (a stream). On one Redis
 * a connection of its own carries every sharded channel. */
struct hub_redis_channel *hub_redis_schannel_get(struct hub_redis *r, const char *name,
						 hub_redis_msg_cb cb,
						 hub_redis_state_cb state_cb, void *arg);

/* Subscribes for the life of the bus (re-subscribed after reconnects). */
void hub_redis_subscribe(struct hub_redis *r, const char *channel,
			 hub_redis_msg_cb cb, void *arg);

/* Publishes on the command connection, fire and forget (dropped while down).
 * On a cluster a classic PUBLISH reaches every node (it does not scale):
 * prefer sharded channels there. */
void hub_redis_publish(struct hub_redis *r, const char *channel,
		       const char *payload, size_t len);

/* SPUBLISH on the primary of the channel's slot; cb (may be NULL) gets the
 * number of subscribers reached. Returns as hub_redis_command_argv. */
int hub_redis_spublish(struct hub_redis *r, const char *channel, const char *payload,
		       size_t len, hub_redis_cb cb, void *arg);

/* Disconnects every connection for shutdown; pending callbacks get NULL.
 * Not from inside a hiredis callback. */
void hub_redis_stop(struct hub_redis *r);

/* NULL-safe; call after hub_redis_stop() once the loop is done with r. */
void hub_redis_free(struct hub_redis *r);

/* The lws protocol that carries the adopted Redis sockets. */
extern const struct lws_protocols hub_redis_protocol;

#endif
