/*
 * rc.h - a blocking Redis client: one Redis or a Redis Cluster, synchronous
 * (hiredis 0.14's blocking API). The sink's Redis (sink/), and the hub's
 * lease renewer, which runs on a thread of its own (hub/lease.c). A command goes to the node owning its
 * key's slot (the slot map read with CLUSTER SLOTS, redirections followed:
 * MOVED refreshes the map, ASK is sent once with ASKING); a connection
 * that fails is dropped and opened again on the next command.
 *
 * Not thread-safe: one rc belongs to one thread.
 */
#ifndef HUB_RC_H
#define HUB_RC_H

#include <stdbool.h>
#include <stddef.h>
#include <hiredis/hiredis.h>

struct rc;

/* url: redis://[:PASSWORD@]HOST:PORT[/DB], or several (comma-separated)
 * seed URLs of one cluster. Nothing is connected yet. NULL with a message
 * in err when url does not parse. */
struct rc *rc_new(const char *url, int timeout_ms, char *err, size_t errlen);

/* The same from seeds already parsed (the hub's redis key): n hosts and
 * ports, the password (NULL: none) and database of every one. NULL when
 * n is 0 or more than rc takes. */
struct rc *rc_new_seeds(const char *const *hosts, const int *ports, int n,
			const char *password, int db, int timeout_ms);
void rc_free(struct rc *rc);

/* Connects to a seed and learns whether it is a cluster (and its map).
 * 0, or -1 with rc_error() set. Called again after a failure. */
int rc_connect(struct rc *rc);

bool rc_is_cluster(const struct rc *rc);

/* Sends argv to the node of key (NULL: any node) and returns the reply
 * (the caller frees it with freeReplyObject), or NULL when no node
 * answered (rc_error() says why). An error reply is returned as one. */
redisReply *rc_cmd(struct rc *rc, const char *key, int argc, const char **argv,
		   const size_t *argvlen);

/* The last failure, for logs. */
const char *rc_error(const struct rc *rc);

#endif
