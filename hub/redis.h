/*
 * redis.h - the hub's Redis bus: one connection for commands, one that only
 * subscribes (a subscribed hiredis context takes nothing else:
 * docs/pitfalls.md).
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

/* Commands in flight on the command connection. */
size_t hub_redis_pending(const struct hub_redis *r);

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

/* Subscribes for the life of the bus (re-subscribed after reconnects). */
void hub_redis_subscribe(struct hub_redis *r, const char *channel,
			 hub_redis_msg_cb cb, void *arg);

/* Publishes on the command connection, fire and forget (dropped while down). */
void hub_redis_publish(struct hub_redis *r, const char *channel,
		       const char *payload, size_t len);

/* Disconnects both connections for shutdown; pending callbacks get NULL.
 * Not from inside a hiredis callback. */
void hub_redis_stop(struct hub_redis *r);

/* NULL-safe; call after hub_redis_stop() once the loop is done with r. */
void hub_redis_free(struct hub_redis *r);

/* The lws protocol that carries the adopted Redis sockets. */
extern const struct lws_protocols hub_redis_protocol;

#endif
